#!/usr/bin/env bash
# One device call, several independent questions, run one after another on GPU 0 so it works on
# any lent kind (one H200 is enough). Each section has a hard time limit and its own log:
#   gcp     MoC vs MoC+GCP, 300 steps of the study config with deterministic kernels, both runs
#           at once on the one GPU: do the loss traces agree bit for bit (issue 5)?
#   topk    the top-K kernel session (benchmarks/topk_gpu_session.py, issue 6)
#   decode  the decode session (benchmarks/decode_gpu_session.sh, issue 3)
#   remat   1b model step at batch 256: dense / MoC with and without rematerialisation (issue 6)
#   profile Nsight Compute reports of the top-K and forward-epilogue kernels
#           (benchmarks/kernel_profile.sh; configs in $PROFILE_CONFIGS)
#   stepprof where the 1b train step's device time goes, dense vs MoC vs GCP (step_profile.py)
#   linear  GPU tests of the decode GEMV (`linear`) and the list select, then the GEMV config
#           sweep at the 1b decode shapes (T = 1; GEMV_SHAPES overrides)
#   ffn     GPU tests of the decode kernels (list, linear), then decode_ffn: the main rows at T = 1
#           at all shapes, the select's knobs on the MoC default, then T = 4
#   e2e     end-to-end decode, dense_kernel / moc_kernel / dense_xla / no_ffn, with a profile,
#           the variants timed in interleaved rounds (E2E_ROUNDS, default 5; E2E_SKIP: the
#           decode_e2e variants to leave out, default moc_xla,moc_kernel_mask; E2E_ARGS: more
#           decode_e2e flags, e.g. "--only=dense_kernel,moc_kernel_awarm16 --attn_warm_mb=16")
#   step64  1b model step at batch 64: dense / MoC / MoC+GCP (tokens/s, MFU, peak memory)
#   flags   the same step under each XLA_FLAGS set in $FLAG_SETS ('|'-separated, default one
#           blank set) and each train.compiler_options value in $OPTION_SETS (default
#           'auto|none'); variants $FLAG_VARIANTS, default dense: which compiler options pay?
#   graphs  end-to-end decode with XLA's default command buffers, then with the decode loop
#           itself captured too (WHILE, CONDITIONAL): is the non-FFN time launch overhead?
#   gemms   each GEMM of the 1b step ($GEMM_VARIANT, default dense): shape, ms, TFLOP/s
#   layer   FFN layer fwd and fwd+bwd at the four preset shapes (+ 5461): dense vs MoC Pallas
#           (LAYER_ARGS adds ffn_layer.py flags, e.g. --d_models=2048 --protocols=...)
#   tests   `pytest -m gpu` on $GPU_TESTS (default: the train and top-K kernel tests;
#           GPU_TESTS=tests: all 37, ~6 min plus ~2 min for each of the two F = 16384 top-K
#           cases, nearly all compile; GPU_TESTS_K: a pytest -k expression, e.g. 'not 16384')
#   mgpu    the Mosaic GPU radix select (benchmarks/mgpu_select_probe.py), exact-checked, then
#           timed beside the Triton selection; and at T = 1 by kernel time (decode)
#   attn    one decode step's attention + cache update, XLA vs the Pallas kernel, at 256 /
#           1024 / 4096 slots (benchmarks/decode_attention_bench.py)
#   stream  the train epilogues' streaming passes, each walk of the bitmask vs XLA's elementwise
#           passes (benchmarks/stream_sweep.py; STREAM_ONLY, STREAM_SHAPES narrow it)
# STREAM_ARGS adds stream_sweep.py flags (e.g. --no_walks: the selection rows only).
# TOPK_ONLY (a regex on topk_variants.SWEEP names) narrows the topk section's sweep, TOPK_SHAPES
# (a count) its shapes section; STEP_VARIANTS overrides step64's variants (its `_split` ones take
# the topk section's fastest forward epilogue, or MOC_SPLIT_CONFIG, see step_variants.py);
# STEPPROF_VARIANTS overrides stepprof's (STEPPROF_ARGS adds step_profile.py flags),
# REMAT_VARIANTS remat's (its _split ones likewise);
# STEP_ARGS adds model_step.py flags to step64 (e.g. --estimate_max_batch).
#   bash benchmarks/gpu_session.sh OUT_DIR SECTION[:LIMIT_S] ...   e.g. gcp:170 topk:260
# Run from the repo root or a `git archive` snapshot of it (GIT_COMMIT set), with .whl
# (/work/shared/tools/device-wheels) and, for gcp, .corpus (benchmarks/make_code_corpus.py + the
# tokenizer, see configs/study_60m_code.py) beside it; from a snapshot in .snap/, link
# .snap/.corpus -> ../.corpus (the wheels are also found in ../.whl). Everything lands in
# OUT_DIR/session.tgz plus OUT_DIR/summary.txt, since the device tool returns at most 8 files.
# DRY=1: the same wiring on a CPU (tiny model, top-K --dry_run, no decode or remat).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_session.sh OUT_DIR SECTION[:LIMIT_S] ...}
shift
work=$(mktemp -d)
wheels=$(ls .whl/*.whl ../.whl/*.whl 2>/dev/null)
if [ -n "$wheels" ] && [ -z "${DRY:-}" ] && [ -z "${MOC_WHEELS_INSTALLED:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site $wheels || exit 1
  export PYTHONPATH=/tmp/site:$PWD MOC_WHEELS_INSTALLED=1
fi
export PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
nvidia-smi -L >"$work/gpus.txt" 2>&1
t0=$SECONDS

gcp() {  # two processes on one GPU: each gets under half of its memory
  local steps=300 small=()
  if [ -n "${DRY:-}" ]; then
    steps=4 small=(--override=model.preset=tiny --override=train.batch_size=4
      --override=train.seq_len=64 --override=data.num_workers=0 --override=eval.batches=1
      --override=train.log_every=2)
  fi
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 python3 benchmarks/convergence.py --gpus=0,0 \
    --variants=moc,moc_gcp --workroot="$work/gcp" --usage_batches=1 \
    --override=train.deterministic=True --override=train.steps=$steps --override=eval.every=100 \
    "${small[@]}" --deadline_s=$(($1 - 20))
  python3 benchmarks/compare_traces.py "$work/gcp/moc" "$work/gcp/moc_gcp" \
    --out="$work/gcp/verdict.json"
  rm -rf "$work"/gcp/*/checkpoints*  # hundreds of MB; the traces are what matter
}

topk() {
  local extra=()
  [ -n "${DRY:-}" ] && extra=(--dry_run)
  [ -n "${TOPK_ONLY:-}" ] && extra+=(--only="$TOPK_ONLY")
  [ -n "${TOPK_SHAPES:-}" ] && extra+=(--shapes="$TOPK_SHAPES")
  python3 benchmarks/topk_gpu_session.py "$work/topk" --budget=$(($1 - 40)) "${extra[@]}"
}

profile() {
  [ -n "${DRY:-}" ] && { echo "profile skipped (DRY)"; return 0; }
  bash benchmarks/kernel_profile.sh "$work/profile" ${PROFILE_CONFIGS:-row_default row_c512_t}
}

decode() {
  [ -n "${DRY:-}" ] && { echo "decode session skipped (DRY)"; return 0; }
  TOTAL_S=$(($1 - 10)) bash benchmarks/decode_gpu_session.sh "$work/decode"
}

split_config() {  # the _split variants take the topk section's fastest forward epilogue
  local best="$work/topk/topk_gpu_session.json"
  [ -z "${MOC_SPLIT_CONFIG:-}" ] && [ -f "$best" ] && export MOC_SPLIT_CONFIG="$best"
  return 0
}

remat() {
  [ -n "${DRY:-}" ] && { echo "remat comparison skipped (DRY)"; return 0; }
  split_config
  local variants=moc,moc_gcp,dense_remat_ffn,dense,dense_remat_full,moc_remat_ffn
  python3 benchmarks/model_step.py --preset=1b --batch=256 --steps=6 --warmup=2 \
    --variants=${REMAT_VARIANTS:-$variants} --reference=dense_remat_ffn \
    --out="$work/model_step_1b_b256.json"
}

stepprof() {
  [ -n "${DRY:-}" ] && { echo "step profile skipped (DRY)"; return 0; }
  python3 benchmarks/step_profile.py --preset=1b --variants=${STEPPROF_VARIANTS:-dense,moc,moc_gcp} \
    --top=60 ${STEPPROF_ARGS:-} --out="$work/step_profile_1b.json"
}

linear() {
  local shapes=${GEMV_SHAPES:-2048x6144,2048x2048,2048x32000,2048x5464}
  if [ -n "${DRY:-}" ]; then
    python3 benchmarks/gemv_sweep.py --quick --out "$work/gemv_sweep.json"
    return
  fi
  timeout 80 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --durations=0 \
    tests/test_decode_linear.py tests/test_kernels_decode.py -k "linear or 1-moc-list"
  python3 benchmarks/gemv_sweep.py --tokens 1 --shapes "$shapes" --budget_s $(($1 - 110)) \
    --out "$work/gemv_sweep.json"
}

ffn() {  # FFN_PHASES, FFN_TESTS (a pytest -k expression) override the defaults
  local args=(--phases "${FFN_PHASES:-main1,selsweep,t4}")
  [ -n "${DRY:-}" ] && args=(--quick --phases main1 --trials 1)
  if [ -z "${DRY:-}" ]; then
    timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --durations=0 \
      tests/test_decode_linear.py tests/test_kernels_decode.py -k "${FFN_TESTS:-linear or list}"
  fi
  python3 benchmarks/decode_ffn.py "${args[@]}" --budget_s $(($1 - 100)) \
    --out "$work/decode_ffn.json"
  python3 -c "import json, sys; sys.path.insert(0, 'benchmarks'); import decode_ffn as d; \
d.print_table(json.load(open('$work/decode_ffn.json')))"
}

e2e() {  # e2e LIMIT [OUT_NAME]: the decode_e2e rows, each with a device profile (graphs too)
  # every variant compiled first (for at most 60% of the limit), then timed in E2E_ROUNDS rounds
  local skip=${E2E_SKIP:-moc_xla,moc_kernel_mask} budget=$(( ${1:-300} * 6 / 10 ))
  local args=(--d_ff=5464 --interleave "${E2E_ROUNDS:-5}" --build_budget_s "$budget")
  args+=(--profile --skip "$skip")
  [ -n "${DRY:-}" ] && args=(--quick --interleave 2 --profile --skip "$skip")
  # shellcheck disable=SC2086  # E2E_ARGS is a list of flags
  python3 benchmarks/decode_e2e.py "${args[@]}" ${E2E_ARGS:-} --out "$work/${2:-decode_e2e}.json"
}

step_1b_64() {  # the 1b model step at batch 64; model_step.py flags follow
  python3 benchmarks/model_step.py --preset=1b --batch=64 --steps=8 --warmup=3 "$@"
}

step64() {
  [ -n "${DRY:-}" ] && { echo "model step skipped (DRY)"; return 0; }
  split_config
  step_1b_64 ${STEP_ARGS:-} --variants=${STEP_VARIANTS:-dense,moc,moc_gcp} \
    --out="$work/model_step_1b.json"
}

flags() {
  [ -n "${DRY:-}" ] && { echo "flag sets skipped (DRY)"; return 0; }
  local i=0 set opts
  IFS='|' read -ra sets <<<"${FLAG_SETS:-}"
  IFS='|' read -ra option_sets <<<"${OPTION_SETS:-auto|none}"
  for set in "${sets[@]:-}"; do
    for opts in "${option_sets[@]}"; do
      echo "-- XLA_FLAGS='$set' --compiler_options=$opts"
      (  # XLA reads a blank XLA_FLAGS as a file name: unset it instead
        flags=$(echo ${XLA_FLAGS:-} $set)
        if [ -n "$flags" ]; then export XLA_FLAGS=$flags; else unset XLA_FLAGS; fi
        step_1b_64 --variants=${FLAG_VARIANTS:-dense} --compiler_options="$opts" \
          --out="$work/model_step_1b_flags$i.json"
      )
      i=$((i + 1))
    done
  done
}

gemms() {  # every GEMM of the 1b step with its achieved TFLOP/s (command buffers off)
  [ -n "${DRY:-}" ] && { echo "GEMM report skipped (DRY)"; return 0; }
  python3 benchmarks/gemm_report.py --preset=1b --variant=${GEMM_VARIANT:-dense} --profile \
    --top=30 --out="$work/gemm_report_1b.json"
}

layer() {
  local args=(--quick --methods=${LAYER_METHODS:-dense,moc_pallas,moc_pallas_gcp})
  [ -n "${DRY:-}" ] && { echo "FFN layer skipped (DRY)"; return 0; }
  python3 benchmarks/ffn_layer.py "${args[@]}" ${LAYER_ARGS:-} --out "$work/ffn_layer.json"
}

tests() {
  [ -n "${DRY:-}" ] && { echo "GPU tests skipped (DRY)"; return 0; }
  python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --durations=0 ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} \
    ${GPU_TESTS:-tests/test_kernels_train.py tests/test_kernels_topk.py}
}

stream() {
  local extra=()
  [ -n "${DRY:-}" ] && extra=(--dry_run)
  [ -n "${STREAM_ONLY:-}" ] && extra+=(--only="$STREAM_ONLY")
  python3 benchmarks/stream_sweep.py --shapes="${STREAM_SHAPES:-1b,60m,130m,350m}" "${extra[@]}" ${STREAM_ARGS:-} \
    --out="$work/stream_sweep.json"
}

attn() {
  local args=()
  [ -n "${DRY:-}" ] && args=(--quick --trials 1)
  python3 benchmarks/decode_attention_bench.py "${args[@]}" --out "$work/decode_attention.json"
}

graphs() {
  local graph_flags="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
  graph_flags+=",DYNAMIC_SLICE_FUSION,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
  e2e "$(( $1 / 2 ))" decode_e2e_default
  XLA_FLAGS="${XLA_FLAGS:-} $graph_flags" e2e "$(( $1 / 2 ))" decode_e2e_graphs
}

mgpu() {  # the Mosaic GPU radix select probe at 5632, the 1B and 60m layers' words, CTA counts;
  # then one row (decode, T = 1) by kernel time from a profile
  [ -n "${DRY:-}" ] && { echo "Mosaic GPU probes skipped (DRY)"; return 0; }
  local ctas=${MGPU_CTAS:-1024,528,660,792,924,1056,2048,4096}
  python3 benchmarks/mgpu_select_probe.py --ctas=$ctas --out "$work/mgpu_select_probe.json"
  python3 benchmarks/mgpu_select_probe.py --f=5504 --num_valid=5461 --ctas=$ctas \
    --out "$work/mgpu_select_1b.json"
  # the 60m layer's rows (11 keys a thread, fewer registers): do more CTAs per SM pay there?
  python3 benchmarks/mgpu_select_probe.py --f=1408 --num_valid=1376 --k=256 \
    --ctas=${MGPU_SMALL_CTAS:-1056,1584,2112} --out "$work/mgpu_select_60m.json"
  python3 benchmarks/mgpu_select_probe.py --t=1 --f=5504 --ctas=1 --device_time \
    --out "$work/mgpu_select_t1.json"
}

sections="gcp topk decode remat profile stepprof linear ffn e2e step64 flags gemms graphs tests layer stream mgpu attn"
export work
export -f $sections split_config step_1b_64
for spec in "$@"; do
  name=${spec%%:*} limit=${spec#*:}
  [ "$limit" = "$spec" ] && limit=300
  [[ " $sections " == *" $name "* ]] || { echo "unknown section $name"; continue; }
  echo "== $name (limit $limit s, at $((SECONDS - t0)) s)" | tee -a "$out/summary.txt"
  timeout "$limit" bash -c "$name $limit" >"$work/$name.log" 2>&1
  echo "rc=$? after $((SECONDS - t0)) s" >>"$work/$name.log"
  tail -n 25 "$work/$name.log" >>"$out/summary.txt"
done
tar czf "$out/session.tgz" -C "$work" .
ls -la "$out"
