"""`TopKConfig`: the top-K kernels' tuning knobs (pallas_kernels/topk.py, topk_compact.py).

Options that lost on the H200 (warp-per-row layout, radix-histogram search, sampled bracket,
`final_pieces`, `span`) were removed after commit e334f23, the radix select through Triton's
`tt.histogram` (`search='hist'`) after ad399d4, the bitmask's other final passes (`mask_pass`
'scan', 'ballot', 'ballot_each': 4-10% slower than the tie cut kept, stream_sweep_h200_20261203e)
and its words' rows and columns min-reduced from the channels (`words_by_offset=False`: 305 vs
273 µs at the 1B shape, stream_sweep_h200_20261203o) after 766c726; NOTES_kernels.md has their
figures.
"""

from __future__ import annotations

import dataclasses

ABLATIONS = ("", "mask_only")
SELECTIONS = ("triton", "mgpu", "auto")


@dataclasses.dataclass(frozen=True)
class TopKConfig:
  """Tuning knobs; every setting gives the same (exact) result unless `ablate` is set."""

  rows: int = 1  # rows per program
  num_warps: int = 4
  count: str = "auto"  # 'int' | 'fclip' | 'fsat' | 'auto'
  granule: int = 256  # chunk granule; 0: one power-of-two block per row
  # Thresholds per counting pass in the search: 1 (bisection), 2 (ternary) or 3 (radix 4);
  # 2 and 3 only for 16-bit keys.
  fan: int = 1
  # Equal chunks of this width (a power of two) instead of power-of-two pieces: a count then
  # sums the chunks lane-wise and pairs of thresholds share one int32, so a counting pass
  # costs one block reduction (pieces: one per piece and threshold). 0: pieces.
  chunk: int = 0
  # > 0: the search starts from the row's K-th value as a Gaussian with the row's mean and
  # variance would have it, +- this many (and 5x as many) standard deviations, checked by one
  # counting pass (`_topk_count.gauss_bracket`); a miss only leaves a wider interval to
  # search. 0: the whole key range.
  gauss_margin: float = 0.0
  strided: bool = True  # lane i owns column i (+32j): coalesced slot stores (tu.lane_iota)
  # Timing only, wrong results: 'mask_only' (with `compact`) runs the bitmask kernel alone.
  ablate: str = ""
  # Two kernels (topk_compact.py): threshold + (T, F/32) bitmask, then popcount compaction.
  compact: bool = False
  # The train forward's streaming pass after the bitmask (`compact` only): warps, and the most
  # bitmask words (32 channels each) per block.
  apply_warps: int = 4
  apply_words: int = 0
  # 'row' | 'block' (moc_train_mask.StreamConfig) | 'gather' (_apply_gather: the forward, and
  # `topk.select`'s compaction) | 'mgpu' (the forward only: `mgpu_apply`, a Mosaic GPU kernel
  # streaming rows by bulk copy and computing only the selected keys) | 'in_select' (the
  # Mosaic select writing this pass's outputs itself: `mgpu_apply.in_select`, the fused
  # [G | U] buffer and 'moc' only) | 'in_select_warp' (the same one warp a row for F <= 2048,
  # `mgpu_select_warp.in_select`, else 'in_select'; opt-in, untimed) | 'auto' ('in_select'
  # where it can run, else 'mgpu' on the fused buffer, else 'gather'; the train forward's
  # default since 2026-12-05o). Removed after an H100 run timed it (NOTES_kernels
  # 2026-12-05e): 'mosaic' (the Mosaic select compacting G_sel and U_sel, a row walk writing Z)
  apply_mode: str = "row"
  # 'gather': slots searched per step (a power of two). More slots per step put more of the
  # searches' dependent loads in flight, at more registers; on the H200 it did not pay: top-K at
  # 16384 x 5632, 15 interleaved trials, 512 slots 0.992x and 1024 1.029x of 256; 1.037 / 0.989 /
  # 0.993x at F = 2048 / 2736 / 1376; the 1B forward 300.8 / 312.8 vs 288.8 us
  # (topk_ab_slots_*_h200_20261204.json, stream_sweep_slots_h200_20261204.json).
  gather_slots: int = 256
  # Which kernel finds the selection: 'triton' (these knobs), or ('moc' only) the Mosaic GPU
  # radix select with shared-memory histograms (`mgpu_select`; 16-bit values, F % 128 == 0,
  # F <= 8192). With `compact` it writes the bitmask that the gathered compaction or the train
  # epilogues read; else `topk.select` is the whole Mosaic top-K (slower than the Triton one:
  # 405 vs 390 us). 'auto' (the shipped defaults' choice): the Mosaic bitmask where it can run
  # (`mgpu_select.usable`: a compiled Hopper-or-newer GPU), else 'triton'.
  selection: str = "triton"
  # The Mosaic select's rows by bulk async copy, one row ahead into a two-row shared buffer
  # (`mgpu_select.kernel(async_rows=True)`). H100, 21 trials (mgpu_select_*_async21_h100_
  # 20261205k): whole top-K at 16384 x 5632 187.8 vs 218.0 us, words at 1B 127.2 vs 147.6, 350m
  # 78.1 vs 82.5; 130m 71.1 vs 68.5 (words there: `warp_rows`). No effect on the Triton one.
  async_rows: bool = True
  # Rows of at most 2048 channels (the 60m and 130m layers): the words by the warp-per-row
  # select (`mgpu_select_warp`) where the Mosaic select is chosen and compiled. H100: 60m 51.8
  # vs 63.5 us (and 53.8 vs 63.0, 66.5 vs 65.4 earlier), 130m 65.1 vs 70.9 (63.8 vs 69.6).
  warp_rows: bool = True

  def __post_init__(self):
    if self.fan not in (1, 2, 3):
      raise ValueError(f"fan must be 1, 2 or 3, got {self.fan}")
    if self.gauss_margin < 0:
      raise ValueError(f"gauss_margin must be >= 0, got {self.gauss_margin}")
    if self.chunk & (self.chunk - 1):
      raise ValueError(f"chunk={self.chunk} needs a power of two")
    if self.gather_slots < 1 or self.gather_slots & (self.gather_slots - 1):
      raise ValueError(f"gather_slots={self.gather_slots} needs a power of two")
    if self.selection not in SELECTIONS:
      raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
    if self.ablate not in ABLATIONS:
      raise ValueError(f"ablate must be one of {ABLATIONS}, got {self.ablate!r}")
