"""The top-K configs the GPU session compares, most informative first (it may stop early).

Each names the hypothesis it tests about the ~600 us the row kernel spends outside its
search and scan (NOTES_kernels.md).
"""

from __future__ import annotations

from pallas_kernels.topk import TopKConfig

SWEEP: dict[str, TopKConfig] = {
  "row_default": TopKConfig(),  # today's kernel: one row over 4 warps
  # 2026-12-01: the search side is the cost (mask_only 649 of 718 us), and each counting pass
  # ends in one block reduction per power-of-two piece (3 for 5632). Equal chunks summed
  # lane-wise make it one per pass; packing two thresholds per int32 keeps it one for a
  # ternary search (~11 passes instead of 16).
  "row_c512": TopKConfig(chunk=512),
  "row_c512_t": TopKConfig(chunk=512, fan=2),  # 566 vs 708 us; train fwd epilogue slower
  "row_c1024_t": TopKConfig(chunk=1024, fan=2),
  "row_c512_r4": TopKConfig(chunk=512, fan=3),
  "row_c512_t_r2": TopKConfig(chunk=512, fan=2, rows=2),
  "row_c512_t_w8": TopKConfig(chunk=512, fan=2, num_warps=8),
  "row_r2": TopKConfig(rows=2),
  "row_fan3": TopKConfig(fan=3),
  # Two kernels (topk_compact.py): search + bitmask, then popcount compaction; mask_only
  # times the first alone (+ ~23 us XLA write), so the difference is the compaction.
  "cmp_row_default": TopKConfig(compact=True),
  "abl_cmp_row_mask_only": TopKConfig(compact=True, ablate="mask_only"),
  "row_w2": TopKConfig(num_warps=2),
  # 2026-12-01, Nsight Compute: the selection is instruction-bound (80% SM throughput, 80
  # registers, 37.5% occupancy). count='pair' keeps the row as bf16 values and counts two per
  # `set.ge.bf16x2` + `fma.rn.bf16x2`: half the counting instructions and registers.
  "row_c512_pair": TopKConfig(chunk=512, count="pair"),
  "row_c512_t_pair": TopKConfig(chunk=512, fan=2, count="pair"),
  "row_c1024_t_pair": TopKConfig(chunk=1024, fan=2, count="pair"),
  # Removed after commit e334f23, slower on the H200 (figures in NOTES_kernels.md): warp per
  # row (layout='warp', the w_* and abl_w_* rows), radix-histogram search (row_radix*,
  # cmp_radix), sampled bracket (*_s256), final_pieces and span (row_c*_tp, row_c512_tps).
}


# Train forward epilogue (G, U -> idx, G_sel, U_sel, Z) at the 1B shape. One kernel (selection,
# then U loads and Z stores in its final pass) vs two (selection to a bitmask, then a streaming
# pass): the one-kernel c512_t lost its standalone gain inside the epilogue (1214 vs 1067 us).
EPILOGUE: dict[str, TopKConfig] = {
  "default": TopKConfig(),
  # The two-kernel default since 2026-12-01e (748 us; the other split configs of that sweep,
  # chunk 256/1024, rows=2, 8 warps, ternary, are in NOTES_kernels.md and lost to it).
  "split_c512_w32": TopKConfig(chunk=512, compact=True, apply_words=32),
  # Its selection counted two values per instruction (count='pair', see SWEEP).
  "split_c512_w32_pair": TopKConfig(chunk=512, compact=True, apply_words=32, count="pair"),
  "split_c512_t_w32_pair": TopKConfig(chunk=512, fan=2, compact=True, apply_words=32, count="pair"),
  "split_c1024_w32_pair": TopKConfig(chunk=1024, compact=True, apply_words=32, count="pair"),
  "split_c256_w32_pair": TopKConfig(chunk=256, compact=True, apply_words=32, count="pair"),
  "split_c512_w32_pair_w8": TopKConfig(
    chunk=512, compact=True, apply_words=32, count="pair", num_warps=8
  ),
}
