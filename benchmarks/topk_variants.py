"""The top-K configs the GPU session compares, most informative first (it may stop early).

Each names the hypothesis it tests about the ~600 us the row kernel spends outside its
search and scan (NOTES_kernels.md).
"""

from __future__ import annotations

import dataclasses

from pallas_kernels import moc_train, topk
from pallas_kernels.topk import TopKConfig

SWEEP: dict[str, TopKConfig] = {
  "row_default": TopKConfig(),  # one row over 4 warps; `select`'s default at powers of two
  # 2026-12-01: the search side is the cost (mask_only 649 of 718 us), and each counting pass
  # ends in one block reduction per power-of-two piece (3 for 5632). Equal chunks summed
  # lane-wise make it one per pass; packing two thresholds per int32 keeps it one for a
  # ternary search (~11 passes instead of 16).
  "row_c512": TopKConfig(chunk=512),
  "row_c512_t": TopKConfig(chunk=512, fan=2),  # 566 vs 708 us: `select`'s default elsewhere
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
  # 2026-12-03: the search from a checked Gaussian guess (~5 passes instead of ~11-16), and the
  # two-kernel path now that the bitmask's final pass is cheap (ties cut, ballot words).
  "row_c512_t_g1": TopKConfig(chunk=512, fan=2, gauss_margin=0.1),
  "row_c512_g1": TopKConfig(chunk=512, gauss_margin=0.1),
  "row_c512_g05": TopKConfig(chunk=512, gauss_margin=0.05),
  "cmp_c512": TopKConfig(chunk=512, compact=True),
  "cmp_c512_g1": TopKConfig(chunk=512, compact=True, gauss_margin=0.1),
  # 2026-12-03p: the compaction with its slots gathered in order (`_apply_gather.compact_call`),
  # as the train forward's gather beat its scatter walk (292 vs 316 us at the 1B shape).
  # `select`'s default since then, with the Triton bitmask (the default's 'auto' is
  # cmp_gather_mgpu on Hopper since 2026-12-04f)
  "cmp_gather_g1": dataclasses.replace(topk.GAUSS_GATHER, selection="triton"),
  "cmp_gather_g1_w8": dataclasses.replace(topk.GAUSS_GATHER, apply_warps=8, selection="triton"),
  # 512 or 1024 slots searched per step tied and lost (0.992x, 1.029x of 256 over 15
  # interleaved trials, topk_ab_slots_5632_h200_20261204.json; rows removed)
  # the Mosaic GPU radix select, whole (`mgpu_select.select`: 405 us, no better than Triton's)
  # and as the bitmask kernel before the gathered compaction (283 us; the default on Hopper)
  "mgpu": TopKConfig(selection="mgpu"),
  "cmp_gather_mgpu": dataclasses.replace(topk.GAUSS_GATHER, selection="mgpu"),
  # 2026-12-01, Nsight Compute: the selection is instruction-bound (80% SM throughput, 80
  # registers, 37.5% occupancy). Tried and slower in the epilogue: count='pair' (two bf16
  # counts per instruction, 688 vs 429 us; code at 2a11ea1) and lazy_ties (the bitmask's final
  # pass without prefix sums unless a row has surplus ties at v, 472 vs 426 us; code at 87c8a63).
}


# Train forward epilogue (G, U -> idx, G_sel, U_sel, Z) at the 1B shape. One kernel (selection,
# then U loads and Z stores in its final pass) vs two (selection to a bitmask, then a streaming
# pass): the one-kernel c512_t lost its standalone gain inside the epilogue (1214 vs 1067 us).
EPILOGUE: dict[str, TopKConfig] = {
  "default": TopKConfig(),
  # The two-kernel default since 2026-12-01e (748 us; the other split configs of that sweep,
  # chunk 256/1024, rows=2, 8 warps, ternary, are in NOTES_kernels.md and lost to it).
  "split_c512_w32": TopKConfig(chunk=512, compact=True, apply_words=32),
  # The default since 2026-12-03p: the Gaussian guess, and the slots gathered (_apply_gather).
  "split_gather": moc_train.FORWARD_DEFAULT,
}
