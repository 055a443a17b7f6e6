"""`TopKConfig`: the top-K kernels' tuning knobs (pallas_kernels/topk.py, topk_warp.py,
topk_radix.py, topk_compact.py)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TopKConfig:
  """Tuning knobs; every setting gives the same (exact) result unless `ablate` is set."""

  rows: int = 1  # rows per program
  num_warps: int = 4
  # Sample size for the bracket; 0: bisect the whole key range. On the H200 the sampled
  # bracket was slower (783 vs 722 us and 793 vs 756 us in two runs, NOTES_kernels.md).
  sample: int = 0
  count: str = "auto"  # 'int' | 'fclip' | 'fsat' | 'auto'
  granule: int = 256  # chunk granule; 0: one power-of-two block per row
  # Thresholds per counting pass in the search: 1 (bisection), 2 (ternary) or 3 (radix 4);
  # 2 and 3 only for 16-bit keys.
  fan: int = 1
  # Equal chunks of this width (a power of two) instead of power-of-two pieces: a count then
  # sums the chunks lane-wise and pairs of thresholds share one int32, so a counting pass
  # costs one block reduction (pieces: one per piece and threshold). 0: pieces.
  chunk: int = 0
  # With `chunk`: the final pass (prefix sum, slot stores) runs on power-of-two pieces, keys
  # re-derived from G, instead of on the many narrow chunks.
  final_pieces: bool = False
  # Start the search from the row's lowest and highest key (two reductions) instead of the
  # dtype's whole key range: bf16 activations use a few thousand of the 65536 keys.
  span: bool = False
  strided: bool = True  # lane i owns column i (+32j): coalesced slot stores (tu.lane_iota)
  # 'row': one row over all warps (this module); 'warp': (C, rows, lanes) blocks, a warp per
  # row when num_warps <= rows, all reductions in-warp (topk_warp.py).
  layout: str = "row"
  lanes: int = 32  # 'warp' only: columns per chunk row (32: one per lane; 256: 8-wide loads)
  keep: bool = True  # 'warp' only: hold the keys in registers (else re-read G every pass)
  # Timing only, wrong results: 'no_scan' | 'no_search' | 'no_select'; 'warp' also
  # 'no_final' (search, one store per row) and 'read_only' (load + one count per row).
  ablate: str = ""
  # K-th key search: 'bisect' (above) or 'radix' / 'radix_i8': two 256-bin digit histograms
  # as one-hot matrix products in bf16 / int8 (topk_radix.py; row layout, no sample).
  search: str = "bisect"
  # Two kernels (topk_compact.py): threshold + (T, F/32) bitmask, then popcount compaction;
  # ablate='mask_only' times the first alone.
  compact: bool = False
  # The train forward's streaming pass after the bitmask (`compact` only): warps, and the most
  # bitmask words (32 channels each) per block.
  apply_warps: int = 4
  apply_words: int = 0

  def __post_init__(self):
    if self.fan not in (1, 2, 3):
      raise ValueError(f"fan must be 1, 2 or 3, got {self.fan}")
    if self.final_pieces and not self.chunk:
      raise ValueError("final_pieces needs chunk > 0")
    if self.chunk and (self.chunk & (self.chunk - 1) or self.layout != "row"):
      raise ValueError(f"chunk={self.chunk} needs a power of two and layout='row'")
    if self.search != "bisect" and (self.layout != "row" or self.sample):
      raise ValueError(f"search={self.search!r} needs layout='row' and sample=0")
