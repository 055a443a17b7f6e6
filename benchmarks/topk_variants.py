"""The top-K configs the GPU session compares, most informative first (it may stop early).

Each names the hypothesis it tests about the ~600 us the row kernel spends outside its
search and scan (NOTES_kernels.md). 'w' = layout='warp' (topk_warp.py): rRwW = R rows and
W warps per program; with W <= R each warp owns whole rows and never synchronises.
"""

from __future__ import annotations

from pallas_kernels.topk import TopKConfig

W = "warp"

SWEEP: dict[str, TopKConfig] = {
  "row_default": TopKConfig(),  # today's kernel: one row over 4 warps
  # 2026-12-01: the search side is the cost (mask_only 649 of 718 us), and each counting pass
  # ends in one block reduction per power-of-two piece (3 for 5632). Equal chunks summed
  # lane-wise make it one per pass; packing two thresholds per int32 keeps it one for a
  # ternary search (~11 passes instead of 16).
  "row_c512": TopKConfig(chunk=512),
  "row_c512_t": TopKConfig(chunk=512, fan=2),  # 566 vs 708 us; train fwd epilogue slower
  # The same search, the final pass (scans, slot stores) on the 3 wide pieces again.
  "row_c512_tp": TopKConfig(chunk=512, fan=2, final_pieces=True),
  "row_c256_tp": TopKConfig(chunk=256, fan=2, final_pieces=True),
  # ... and the search starting from the row's own key range (~2-3 ternary passes fewer).
  "row_c512_tps": TopKConfig(chunk=512, fan=2, final_pieces=True, span=True),
  "row_c1024_t": TopKConfig(chunk=1024, fan=2),
  "row_c512_r4": TopKConfig(chunk=512, fan=3),
  "row_c512_t_r2": TopKConfig(chunk=512, fan=2, rows=2),
  "row_c512_t_w8": TopKConfig(chunk=512, fan=2, num_warps=8),
  "row_r2": TopKConfig(rows=2),
  "row_fan3": TopKConfig(fan=3),
  # Warp per row, keys re-read from L1/L2 each pass (no register pressure, no barriers).
  "w_r4w4_reload": TopKConfig(layout=W, rows=4, num_warps=4, keep=False),
  # Same with the 16-pass bisection cut to ~9 passes by a sampled bracket.
  "w_r4w4_reload_s256": TopKConfig(layout=W, rows=4, num_warps=4, keep=False, sample=256),
  # Keys in registers: F/32 = 176 per thread, spills expected; ptxas says how many.
  "w_r4w4_keep": TopKConfig(layout=W, rows=4, num_warps=4),
  # Radix select (topk_radix.py): 2 passes of 256-bin histograms as one-hot MMAs instead of
  # 16 bisection passes; bf16 vs int8 operands.
  "row_radix": TopKConfig(search="radix"),
  "row_radix_i8": TopKConfig(search="radix_i8"),
  # Two kernels (topk_compact.py): search + bitmask, then popcount compaction; mask_only
  # times the first alone (+ ~23 us XLA write), so the difference is the compaction.
  "cmp_row_default": TopKConfig(compact=True),
  "abl_cmp_row_mask_only": TopKConfig(compact=True, ablate="mask_only"),
  "cmp_radix": TopKConfig(search="radix", compact=True),
  "cmp_w_r4w4_reload": TopKConfig(layout=W, rows=4, num_warps=4, keep=False, compact=True),
  # Ablations first for the two shapes: search only (one store per row), load + count only.
  "abl_w_r1w4_no_final": TopKConfig(layout=W, rows=1, num_warps=4, ablate="no_final"),
  "abl_w_r4w4_read_only": TopKConfig(layout=W, rows=4, num_warps=4, ablate="read_only"),
  "w_r1w1_reload": TopKConfig(layout=W, rows=1, num_warps=1, keep=False),
  "w_r2w2_reload": TopKConfig(layout=W, rows=2, num_warps=2, keep=False),
  "w_r8w8_reload": TopKConfig(layout=W, rows=8, num_warps=8, keep=False),
  # Two warps per row (warps also on the chunk axis): 88 keys per thread, one barrier per count.
  "w_r2w4_keep": TopKConfig(layout=W, rows=2, num_warps=4),
  # The row kernel's shape in the 3D code (warps on the chunk axis): isolates layout vs code.
  "w_r1w4_keep": TopKConfig(layout=W, rows=1, num_warps=4),
  # 8-wide vectorized loads (columns contiguous per thread) instead of one column per lane.
  "w_r4w4_reload_l256": TopKConfig(layout=W, rows=4, num_warps=4, keep=False, lanes=256),
  "w_r4w4_keep_s256": TopKConfig(layout=W, rows=4, num_warps=4, sample=256),
  # Ablations (timing only): where the time of the warp layout and of the row shape goes.
  "abl_w_r4w4_read_only_l256": TopKConfig(
    layout=W, rows=4, num_warps=4, lanes=256, ablate="read_only"
  ),
  "abl_w_r4w4_reload_no_final": TopKConfig(
    layout=W, rows=4, num_warps=4, keep=False, ablate="no_final"
  ),
  "abl_w_r4w4_reload_no_scan": TopKConfig(
    layout=W, rows=4, num_warps=4, keep=False, ablate="no_scan"
  ),
  "abl_w_r1w4_read_only": TopKConfig(layout=W, rows=1, num_warps=4, ablate="read_only"),
  "abl_w_r1w4_no_search": TopKConfig(layout=W, rows=1, num_warps=4, ablate="no_search"),
  "row_w2": TopKConfig(num_warps=2),
}


# Train forward epilogue (G, U -> idx, G_sel, U_sel, Z) at the 1B shape. One kernel (selection,
# then U loads and Z stores in its final pass) vs two (selection to a bitmask, then a streaming
# pass): the one-kernel c512_t lost its standalone gain inside the epilogue (1214 vs 1067 us).
EPILOGUE: dict[str, TopKConfig] = {
  "default": TopKConfig(),
  "split_c512_t": TopKConfig(chunk=512, fan=2, compact=True),  # 810 us (mask 500), 2026-12-01d
  "split_c512": TopKConfig(chunk=512, compact=True),  # 773 us (mask 429)
  # The streaming pass took ~345 us where its bytes (G, U, Z, residuals: ~650 MB) need ~170:
  # fewer values live per thread (smaller word blocks) and more warps.
  "split_c512_a8": TopKConfig(chunk=512, compact=True, apply_warps=8),
  "split_c512_w32": TopKConfig(chunk=512, compact=True, apply_words=32),
  "split_c512_w32_a8": TopKConfig(chunk=512, compact=True, apply_words=32, apply_warps=8),
  "split_c512_w16_a2": TopKConfig(chunk=512, compact=True, apply_words=16, apply_warps=2),
  "split_c512_w64_a8": TopKConfig(chunk=512, compact=True, apply_words=64, apply_warps=8),
  # The selection side: chunk width and warps.
  "split_c256": TopKConfig(chunk=256, compact=True),
  "split_c1024": TopKConfig(chunk=1024, compact=True),
  "split_c512_r2": TopKConfig(chunk=512, rows=2, compact=True),
}
