#!/usr/bin/env bash
# One H200, about 5 minutes: GPU decode tests, the decode FFN benchmark (old vs new kernels),
# end-to-end decode (dense vs MoC). Writes a few files into OUT_DIR and prints a summary.
#   bash benchmarks/decode_gpu_session.sh OUT_DIR      (repo root as cwd; .whl/ carried along)
# Each step has a hard time limit; the benchmarks write their JSON after every case, so a cut
# keeps what was measured (most telling cases first).
set -uo pipefail
out=${1:?usage: benchmarks/decode_gpu_session.sh OUT_DIR}
mkdir -p "$out"
t0=$SECONDS
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 || echo "wheel install failed (decode_e2e may not import)"
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
git rev-parse HEAD >"$out/commit.txt" 2>/dev/null || true
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader >>"$out/commit.txt" 2>&1

echo "== 1. GPU decode tests (limit 70 s)"
timeout 70 python3 -m pytest -v -m gpu -p no:cacheprovider -rfE tests/test_kernels_decode.py \
  >"$out/gpu_tests.txt" 2>&1
echo "rc=$? after $((SECONDS - t0)) s" >>"$out/gpu_tests.txt"
tail -n 12 "$out/gpu_tests.txt"

echo "== 2. decode FFN benchmark (limit 135 s)"
timeout 135 python3 benchmarks/decode_ffn.py --out "$out/decode_ffn.json" --budget_s 115 \
  >"$out/decode_ffn.log" 2>&1
echo "rc=$? after $((SECONDS - t0)) s" >>"$out/decode_ffn.log"
python3 - "$out/decode_ffn.json" <<'PY' || tail -n 20 "$out/decode_ffn.log"
import json, sys
sys.path.insert(0, "benchmarks")
from decode_ffn import print_table
print_table(json.load(open(sys.argv[1])))
PY

left=$((290 - (SECONDS - t0)))
echo "== 3. end-to-end decode (limit ${left} s)"
if [ "$left" -gt 20 ]; then
  timeout "$left" python3 benchmarks/decode_e2e.py --d_ff=5464 --trials 3 --skip moc_xla \
    --out "$out/decode_e2e.json" >"$out/decode_e2e.log" 2>&1
  echo "rc=$? after $((SECONDS - t0)) s" >>"$out/decode_e2e.log"
fi
python3 - "$out/decode_e2e.json" <<'PY' || tail -n 20 "$out/decode_e2e.log"
import json, sys
r = json.load(open(sys.argv[1]))
for name, row in r["rows"].items():
  print(f"{name:16s} {row.get('decode_tokens_per_s', row.get('error'))}")
print("MoC/dense (best of each):", r.get("moc_over_dense"))
PY
echo "total $((SECONDS - t0)) s"
