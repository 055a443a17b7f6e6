#!/usr/bin/env bash
# One H200, TOTAL_S seconds (default 260; the 2026-11-28b run was cut by the caller at ~285 s):
#   1. GPU decode tests (T = 4 first: it has never finished on the GPU), 45 s, 25 s per test
#   2. decode FFN, part A: stage times and T = 1 totals at the 1B shape, then T = 4 (never
#      measured on the GPU) at all shapes (decode_ffn.json)
#   3. end-to-end decode, dense_kernel / moc_kernel / dense_xla / no_ffn (decode_e2e.json), 95 s
#   4. decode FFN, part B with what is left: sweep, T = 1 at d = 4096, T = 16 (decode_ffn_b.json)
#   bash benchmarks/decode_gpu_session.sh OUT_DIR      (repo root as cwd; .whl/ carried along)
# Every step has a hard limit and its own log with an rc line; the benchmarks write their JSON
# after every case, and decode_ffn lists what its budget cut as skipped without building it.
set -uo pipefail
out=${1:?usage: benchmarks/decode_gpu_session.sh OUT_DIR}
total=${TOTAL_S:-260}
mkdir -p "$out"
t0=$SECONDS
left() { echo $((total - (SECONDS - t0))); }
if [ -z "${MOC_WHEELS_INSTALLED:-}" ] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    >/dev/null 2>&1 || echo "wheel install failed (decode_e2e may not import)"
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
git rev-parse HEAD >"$out/commit.txt" 2>/dev/null || true  # may be stale in a snapshot: hash the code
sha1sum pallas_kernels/*decode*.py benchmarks/decode_*.py tests/test_kernels_decode.py \
  >>"$out/commit.txt" 2>&1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader >>"$out/commit.txt" 2>&1

step() {  # step NAME LIMIT_S LOG CMD...: run with a hard limit, append rc and elapsed to LOG
  local name=$1 limit=$2 log=$3
  shift 3
  echo "== $name (limit ${limit} s, at $((SECONDS - t0)) s)"
  timeout "$limit" "$@" >"$log" 2>&1
  echo "rc=$? after $((SECONDS - t0)) s" >>"$log"
}

per_test=()
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=25)
step "1. GPU decode tests" 45 "$out/gpu_tests.txt" python3 -m pytest -v -m gpu -p no:cacheprovider \
  -rfE --durations=0 "${per_test[@]}" tests/test_kernels_decode.py
tail -n 16 "$out/gpu_tests.txt"

ffn_table() {
  python3 - "$1" <<'PY' || echo "(no table from $1)"
import json, sys
sys.path.insert(0, "benchmarks")
from decode_ffn import print_table
print_table(json.load(open(sys.argv[1])))
PY
}

a_limit=$(($(left) - 95 - 10))  # 95 s kept for the e2e step
if [ "$a_limit" -gt 30 ]; then
  step "2. decode FFN part A" "$a_limit" "$out/decode_ffn.log" python3 benchmarks/decode_ffn.py \
    --phases stages,t4 --out "$out/decode_ffn.json" --budget_s $((a_limit - 25))
  ffn_table "$out/decode_ffn.json"
fi

e_limit=$(($(left) - 5))
[ "$e_limit" -gt 95 ] && e_limit=95
if [ "$e_limit" -gt 30 ]; then
  step "3. end-to-end decode" "$e_limit" "$out/decode_e2e.log" python3 benchmarks/decode_e2e.py \
    --d_ff=5464 --trials 3 --skip moc_xla,moc_kernel_mask --out "$out/decode_e2e.json"
  python3 - "$out/decode_e2e.json" <<'PY' || tail -n 20 "$out/decode_e2e.log"
import json, sys
r = json.load(open(sys.argv[1]))
for name, row in r["rows"].items():
  print(f"{name:16s} {row.get('decode_tokens_per_s', row.get('error'))}")
print("MoC/dense (best of each):", r.get("moc_over_dense"))
PY
fi

b_limit=$(($(left) - 5))
if [ "$b_limit" -gt 30 ]; then
  step "4. decode FFN part B" "$b_limit" "$out/decode_ffn_b.log" python3 benchmarks/decode_ffn.py \
    --phases sweep,t1,t16 --out "$out/decode_ffn_b.json" --budget_s $((b_limit - 25))
  ffn_table "$out/decode_ffn_b.json"
fi
echo "total $((SECONDS - t0)) s"
