#!/usr/bin/env bash
# Nsight Compute on the top-K and forward-epilogue kernels, one report per config (GPU only;
# ncu reads hardware counters on the Firecracker H200 machines, see the device notes):
#   bash benchmarks/kernel_profile.sh OUT_DIR CONFIG...      (topk_variants.SWEEP names)
#   bash benchmarks/kernel_profile.sh OUT_DIR decode         (the FFN decode kernels, T = 1)
#   bash benchmarks/kernel_profile.sh OUT_DIR epilogue MODE:WORDS:WARPS...  (bitmask epilogues)
#   bash benchmarks/kernel_profile.sh OUT_DIR mgpu F:NUM_VALID:K...  (the Mosaic selects' words
#     at T = 16384, with the source counters' stall sampling: OUT_DIR/ncu_mgpu_<F>.{txt,sass.csv})
# OUT_DIR/ncu_<kernel>_<config>.txt: the details page (launch stats, occupancy, speed of light,
# warp-state stall reasons). Each profile has a hard time limit; one failure does not stop the rest.
set -uo pipefail
out=${1:?usage: benchmarks/kernel_profile.sh OUT_DIR CONFIG...}
shift
mkdir -p "$out"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
[ -z "$ncu" ] && { echo "no ncu here"; exit 1; }
if [ "${1:-}" = decode ]; then  # one report per decode kernel (second call), gemv last: on
  # 2026-12-01 one ncu run over all five hung replaying decode_gemv
  for name in decode_select decode_rows decode_down decode_gemv; do
    skip=1  # the second call's; MoC and dense each launch a decode_gemv: skip 2 to MoC's second
    [ "$name" = decode_gemv ] && skip=2
    timeout 60 "$ncu" --clock-control none --kernel-name "regex:^$name" --launch-skip $skip \
      --launch-count 1 --section LaunchStats --section Occupancy --section SpeedOfLight \
      --section WarpStateStats --section MemoryWorkloadAnalysis \
      python3 benchmarks/kernel_profile.py --kernel=decode >"$out/ncu_$name.txt" 2>&1
    echo "$name: rc=$? $(grep -c . "$out/ncu_$name.txt") lines"
  done
  exit 0
fi
if [ "${1:-}" = mgpu ]; then  # the second launch of each select (kernel_profile.py --kernel=mgpu)
  # Without preallocation: kernel replay backs up the device memory JAX holds, 75% of the GPU
  # by default, and a first try (2026-12-05i) made no progress in 150 s. The killed ncu left its
  # Python child holding the GPU: pkill it.
  shift
  for shape in "${@:-5504:5461:1024}"; do
    IFS=: read -r f nv k <<<"$shape"
    rep="$out/ncu_mgpu_$f"
    XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 150 "$ncu" --clock-control none \
      --kernel-name regex:mosaic --launch-skip 1 --launch-count 5 --section LaunchStats \
      --section Occupancy --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
      --section MemoryWorkloadAnalysis --section SourceCounters --import-source no \
      -o "$rep" -f \
      python3 benchmarks/kernel_profile.py --kernel=mgpu --f="$f" --num_valid="$nv" --k="$k" \
      >"$rep.log" 2>&1
    echo "mgpu $shape: rc=$? (profiles 1, 3, 5: async words, sync words, warp words or whole top-K)"
    pkill -f "kernel_profile.py --kernel=mgpu"
    [ -f "$rep.ncu-rep" ] || { tail -n 5 "$rep.log"; continue; }
    # the details page, and each instruction's SASS with its stall samples (the source page)
    timeout 60 "$ncu" -i "$rep.ncu-rep" --page details >"$rep.txt" 2>&1
    timeout 60 "$ncu" -i "$rep.ncu-rep" --page source --csv --print-source sass >"$rep.sass.csv" 2>&1
    echo "  details $(grep -c . "$rep.txt") lines, source $(grep -c . "$rep.sass.csv") lines"
    rm -f "$rep.ncu-rep"  # tens of MB; the two pages above are what is read
  done
  exit 0
fi
if [ "${1:-}" = epilogue ]; then  # selection, forward streaming pass, backward: one report
  shift                            # per walk, the three kernels of the second round
  for stream in "${@:-row:32:4}"; do
    tag=${stream//:/_}
    timeout 150 "$ncu" --clock-control none \
      --kernel-name "regex:moc_mask_moc|moc_train_fwd_apply|moc_train_bwd_bitmask" \
      --launch-skip 3 --launch-count 3 --section LaunchStats --section Occupancy \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
      --section MemoryWorkloadAnalysis \
      python3 benchmarks/kernel_profile.py --kernel=epilogue --stream="$stream" \
      >"$out/ncu_epilogue_$tag.txt" 2>&1
    echo "epilogue $stream: rc=$? $(grep -c . "$out/ncu_epilogue_$tag.txt") lines"
  done
  exit 0
fi
for config in "$@"; do
  for kernel in select fwd; do
    name=moc_select_moc
    [ "$kernel" = fwd ] && name=moc_train_fwd_moc
    timeout 120 "$ncu" --clock-control none --kernel-name "regex:$name" --launch-skip 1 \
      --launch-count 1 --section LaunchStats --section Occupancy --section SpeedOfLight \
      --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
      python3 benchmarks/kernel_profile.py --kernel=$kernel --config="$config" \
      >"$out/ncu_${kernel}_${config}.txt" 2>&1
    echo "$kernel $config: rc=$? $(grep -c . "$out/ncu_${kernel}_${config}.txt") lines"
  done
done
