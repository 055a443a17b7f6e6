#!/usr/bin/env bash
# One call on a 4-GPU machine (~6 min), three independent questions at once:
#   GPUs 0,1  MoC vs MoC+GCP, 300 steps of the study config with deterministic kernels: do the
#             loss traces agree bit for bit (issue 5)?
#   GPU 2     the top-K kernel session (benchmarks/topk_gpu_session.py, issue 6)
#   GPU 3     the decode session (benchmarks/decode_gpu_session.sh, issue 3)
#   bash benchmarks/gpu_session_x4.sh OUT_DIR
# Run from the repo root or a `git archive` snapshot of it (GIT_COMMIT set), with .corpus
# (benchmarks/make_code_corpus.py + the tokenizer, see configs/study_60m_code.py) and .whl
# (/work/shared/tools/device-wheels) beside it; from a snapshot in .snap/, link
# .snap/.corpus -> ../.corpus (the wheels are found in ../.whl). Everything lands in OUT_DIR/session.tgz plus
# OUT_DIR/summary.txt, since the device tool returns at most 8 files.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_session_x4.sh OUT_DIR}
work=$(mktemp -d)
wheels=$(ls .whl/*.whl ../.whl/*.whl 2>/dev/null)
if [ -n "$wheels" ] && [ -z "${DRY:-}" ]; then  # the wheels are for the GPU image
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $wheels || exit 1
  export PYTHONPATH=/tmp/site:$PWD MOC_WHEELS_INSTALLED=1
fi
export PYTHONUNBUFFERED=1
nvidia-smi -L >"$work/gpus.txt" 2>&1
# DRY=1: the same wiring on a CPU (tiny model, top-K --dry_run, no decode session).
topk_args=() decode=(bash benchmarks/decode_gpu_session.sh "$work/decode") small=()
if [ -n "${DRY:-}" ]; then
  topk_args=(--dry_run) decode=(echo "decode session skipped (DRY)")
  small=(--override=model.preset=tiny --override=train.batch_size=4 --override=train.seq_len=64
    --override=data.num_workers=0 --override=eval.batches=1 --override=train.log_every=2)
fi

(CUDA_VISIBLE_DEVICES=2 timeout 260 python3 benchmarks/topk_gpu_session.py "$work/topk" \
  "${topk_args[@]}" >"$work/topk.log" 2>&1; echo "rc=$?" >>"$work/topk.log") &
(CUDA_VISIBLE_DEVICES=3 timeout 290 "${decode[@]}" >"$work/decode.log" 2>&1
  echo "rc=$?" >>"$work/decode.log") &
steps=300
[ -n "${DRY:-}" ] && steps=4
python3 benchmarks/convergence.py --gpus=0,1 --variants=moc,moc_gcp --workroot="$work/gcp" \
  --override=train.deterministic=True --override=train.steps=$steps --override=eval.every=100 \
  "${small[@]}" --deadline_s=280 >"$work/gcp.log" 2>&1
python3 - "$work/gcp" >"$work/gcp_traces.txt" 2>&1 <<'PY'
import json, sys
def losses(v):
  with open(f"{sys.argv[1]}/{v}/metrics.jsonl") as f:
    return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["kind"] == "train"]
a, b = losses("moc"), losses("moc_gcp")
diff = [(s, x, y) for (s, x), (_, y) in zip(a, b) if x != y]
print(f"{len(a)} / {len(b)} logged steps; identical: {not diff and len(a) == len(b) > 0}")
print("first differences:", diff[:3])
PY
wait
cat "$work/gcp_traces.txt" >"$out/summary.txt"
tail -n 25 "$work/topk.log" "$work/decode.log" >>"$out/summary.txt" 2>&1
rm -rf "$work"/gcp/*/checkpoints*  # hundreds of MB; the traces are what matter
tar czf "$out/session.tgz" -C "$work" .
ls -la "$out"
