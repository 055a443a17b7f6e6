"""Tuning parameters of the decode kernels and the defaults that fill an H200 at a shape.

The histogram select over many programs (`select_mode="hist"`) and the in-kernel sum of the
list partials (`list_reduce="last"`) lost on the H200 and were removed after commit e334f23, the
one-kernel `pipeline="fused"` (a grid barrier between gate GEMV and select) after ac1793d,
the dense FFN's SwiGLU folded into its down GEMV's loads (`fold_swiglu`) after 9f0621c;
NOTES_decode.md has their figures.
"""

from __future__ import annotations

import dataclasses

from pallas_kernels._topk_config import TopKConfig

PIPELINES = ("mask", "list")
LIST_SUMS = ("xla", "kernel")
WARM_FROM = ("select", "rows")
DENSE_DOWNS = ("rows", "gemv")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Block sizes (powers of 2), splits and Triton launch parameters for the decode kernels."""

  gemv_block_f: int = 128
  gemv_block_d: int = 64
  # D splits of the gate (and dense up) GEMV; 1 lets dense fuse the SwiGLU epilogue
  gemv_splits: int = 4
  gemv_warps: int = 4
  gemv_stages: int = 3
  select_warps: int = 8
  select_radix_bits: int = 2
  # 0: the select works on one next_pow2(F)-wide block; else on power-of-two pieces covering F
  # rounded up to this granule (2026-12-01, CPU-verified and untimed: the next GPU run decides)
  select_granule: int = 0
  # 0: the K-th key search runs on those pieces; else on equal chunks of this many lanes (a power
  # of 2), compare results summed lane-wise so each radix step ends in one block reduction (not
  # one per piece); the final pass re-loads the row as pieces of select_granule or 256 lanes
  # (2026-12-01, like TopKConfig.chunk in training)
  select_chunk: int = 0
  # None: the select above (`_decode_select`, static radix steps, integer compares); else the
  # list pipeline selects with the training top-K kernel (`topk.select`, this config: counting
  # on the fp32 pipe, packed pair counts, a search that stops when converged) on G rounded to
  # x's dtype (`LIST_TOPK` below is what `moc_config` sets)
  topk: TopKConfig | None = None
  # with `topk` ('moc', > 1 gate split): the top-K kernel sums the split partials as it loads
  # G (one launch less per FFN); False: XLA sums them first
  fold_gate_sum: bool = True
  up_block_c: int = 16
  up_block_d: int = 512
  up_warps: int = 4
  up_stages: int = 2
  down_splits: int = 8
  down_block_c: int = 32
  down_block_d: int = 128
  down_warps: int = 4
  down_stages: int = 3
  # the down projection of the dense FFN and of MoC's mask pipeline: 'rows' (`_down_kernel`,
  # skips rows of Wd whose z is zero for every token) or 'gemv' (the split-K GEMV, with
  # down_block_d-wide column blocks, down_block_c-row steps and the down_* splits, warps and
  # stages; more bytes in flight: 36.3 vs 38.4 us at d = 2048, 78.6 vs 103.7 and 102.8 vs
  # 135.9 at d = 4096, decode_ffn_h200_20261203.json; `dense_config` takes it)
  dense_down: str = "rows"
  # T = 1 through tl.dot with the token padded to 16 rows (the multiply-reduce path does a
  # cross-warp reduction every loop step; at T = 4 the dot path ran 1.4-1.6x faster, NOTES)
  t1_dot: bool = False
  # MoC after the select: 'mask' (up and down kernels over all channels, masked loads of the
  # selected rows) or 'list' (select writes per-token sorted channel lists; one kernel streams
  # whole selected rows of Wu^T and Wd per list chunk, fp32 partial y per program)
  pipeline: str = "mask"
  list_rows: int = 8  # list entries per loop step (rows of Wu^T and of Wd loaded at once)
  list_programs: int = 128  # programs over all tokens (each owns a slice of one token's list)
  list_block_d: int = 1024  # columns per load (static loop over D)
  list_warps: int = 8
  # the sum of the list pipeline's partial y (and the block's residual add, where the kernels
  # are given it): 'xla' (a reduce fusion, then the add: two launches) or 'kernel'
  # (`_decode_list.sum_partials`: one launch, the add in its epilogue; `moc_config`'s)
  list_sum: str = "xla"
  # The list pipeline's top-K launch also warms L2 with up to this many bytes of the weight the
  # next kernels read (the next layer's q, k, v; `_l2_prefetch`), on `warm_programs` programs
  # of its own; 0: off.
  warm_bytes: int = 0
  warm_programs: int = 264
  # which launch warms: 'select' (the top-K's: the Triton one's programs load, the Mosaic
  # GPU select's CTAs bulk-prefetch a chunk each, since 2026-12-05g; from its one CTA it
  # made the select wait, NOTES_decode 2026-12-05d) or 'rows' (the rows kernel's)
  warm_from: str = "select"

  def __post_init__(self):
    if self.pipeline not in PIPELINES:
      raise ValueError(f"unknown decode pipeline {self.pipeline!r}; expected one of {PIPELINES}")
    if self.warm_from not in WARM_FROM:
      raise ValueError(f"unknown warm_from {self.warm_from!r}; expected one of {WARM_FROM}")
    if self.list_sum not in LIST_SUMS:
      raise ValueError(f"unknown list_sum {self.list_sum!r}; expected one of {LIST_SUMS}")
    if self.dense_down not in DENSE_DOWNS:
      raise ValueError(f"unknown dense_down {self.dense_down!r}; expected one of {DENSE_DOWNS}")
    if self.topk is not None and self.pipeline != "list":
      raise ValueError("DecodeConfig.topk selects for the list pipeline; set pipeline='list'")
    if self.warm_bytes < 0 or self.warm_programs < 1:
      raise ValueError(
        f"need warm_bytes >= 0, warm_programs >= 1, got {self.warm_bytes}, {self.warm_programs}"
      )


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def pow2_at_least(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def legacy_config(num_tokens: int, d_model: int, d_ff: int) -> DecodeConfig:
  """Last session's default (mask pipeline, multiply-reduce at T = 1): kept to compare."""
  del num_tokens
  block_f = 128
  splits = max(1, min(16, pow2_at_least(cdiv(264, cdiv(d_ff, block_f)))))
  down_block_d = min(128, pow2_at_least(d_model))
  down_splits = max(1, min(16, pow2_at_least(cdiv(128, cdiv(d_model, down_block_d)))))
  return DecodeConfig(gemv_splits=splits, down_splits=down_splits, down_block_d=down_block_d)


def default_config(num_tokens: int, d_model: int, d_ff: int) -> DecodeConfig:
  """A config that gives every SM (132 on an H200) a few programs at the given shape.

  Measured on the H200 on 2026-11-28b (NOTES_decode.md): at T = 1 the list pipeline beat the
  mask one at all three shapes (39.9 vs 51.3 µs at d = 2048) and these settings beat legacy for
  dense and MoC; at T = 16 mask beat list (56.2 vs 81.5 µs at d = 2048). List at T = 2…4 is
  still a guess: T = 4 was not reached in that run.
  """
  base = legacy_config(num_tokens, d_model, d_ff)
  return dataclasses.replace(
    base,
    t1_dot=True,
    select_warps=16,
    pipeline="list" if num_tokens <= 4 else "mask",
    list_warps=8 if d_model <= 2048 else 16,
  )


# The dense down GEMV's tile before 2026-12-04 (`_decode_gemv.linear_config`'s rule at these
# shapes: 128-wide, 64-row steps, 8 splits, 4 stages), still the best found at d > 2048.
LINEAR_DOWN = dict(down_block_d=128, down_block_c=64, down_splits=8, down_warps=4, down_stages=4)


def dense_config(num_tokens: int, d_model: int, d_ff: int) -> DecodeConfig:
  """`default_config` with the dense FFN's own split-K GEMVs (`moc_decode.dense_decode_ffn`).

  From `decode_ffn_h200_20261204.json` (T = 1, whole FFN, medians; before: 8 or 4 splits of
  128-wide blocks, 3 stages, and the down GEMV with 64-row steps, 8 splits, 4 stages):
  at d = 2048 gate+up with 64-wide blocks per weight, 4 splits, 4 stages and the down GEMV
  with 256-wide blocks, 128-row steps, 16 splits, 3 stages (the best of the 12-04 GEMV sweep,
  12.9 vs 17.9 µs alone) took 31.5 µs vs 39.3; at d = 4096 one split (the SwiGLU in the
  GEMV's epilogue) took 74.8 vs 78.0 (F = 11008) and 90.0 vs 97.8 (F = 14336), the down GEMV
  as before (no variant beat it beyond noise).
  """
  cfg = dataclasses.replace(
    default_config(num_tokens, d_model, d_ff),
    dense_down="gemv",
    gemv_block_f=64,
    gemv_block_d=64,
    gemv_warps=4,
    gemv_stages=4,
    **LINEAR_DOWN,
  )
  if d_model > 2048:
    return dataclasses.replace(cfg, gemv_splits=1)
  return dataclasses.replace(
    cfg, gemv_splits=4, down_block_d=256, down_block_c=128, down_splits=16, down_stages=3
  )


# The list pipeline's select: the training top-K kernel with 1024-lane chunks, a ternary search
# and 8 warps. MoC FFN at T = 1 on the H200 (decode_ffn_h200_20261203b.json), vs the decode
# select of before: 31.1 vs 37.8 us at d = 2048, 64.9 vs 76.1 and 73.4 vs 88.7 at d = 4096
# (512-lane chunks: 32.3, 65.8, 79.2; 4 or 16 warps slower everywhere).
# From a checked Gaussian guess (decode_ffn_h200_20261203d.json): 30.4 vs 33.2 us at d = 2048,
# 60.2 vs 66.3 at d = 4096, F = 11008; 79.9 vs 72.7 at F = 14336 (a noisy shape in that run).
LIST_TOPK = TopKConfig(chunk=1024, fan=2, num_warps=8, gauss_margin=0.1)
WARM_BYTES = 16 << 20  # `moc_config`'s L2 warming from the list pipeline's top-K launch


def moc_config(num_tokens: int, d_model: int, d_ff: int) -> DecodeConfig:
  """`default_config` with MoC's measured choices (H200, medians, same-run comparisons):

  T > 4, the mask pipeline: its down kernel on 16 channel splits of 64-row steps. T = 16
  (decode_ffn_mask16_h200_20261204c.json): 48.6 / 115.7 / 139.6 µs against 54.9 / 135.6 / 163.5
  with default_config's 4 or 8 splits of 32 rows, at d = 2048 and d = 4096 (F = 11008, 14336).
  All of Wd through the dense FFN's split-K GEMV instead (dense_down="gemv") tied at d = 2048
  and lost at d = 4096 (decode_ffn_t16_h200_20261204b.json).

  T <= 4, the list pipeline: it selects with `LIST_TOPK`. At d <= 2048 the gate GEMV of the
  2026-12-01 sweep (gemv_sweep_h200_20261201, T = 1: 64-wide F blocks, 128-row D steps, 2
  splits, 4 stages: 11.9 µs where 8 splits × 3 stages took 16.0), its two partials summed by the
  select as it loads G (`fold_gate_sum`). At d > 2048 the default GEMV, its 4 partials summed by
  XLA: the select summing them lost at T = 4 (114.8 vs 101.7 µs at F = 11008, 130.3 vs 118.4
  at F = 14336; decode_ffn_t4_h200_20261204.json) and at T = 1 (77.9 vs 63.5, 88.7 vs 78.6;
  decode_ffn_t16_t1_h200_20261204.json).
  The list pipeline sums its partials with the residual add in one kernel
  (`list_sum='kernel'`). The Triton top-K stays its select: with the model's decode_prefetch
  and attention warming on an H100 (decode_e2e_h100_20261205f.json, paired rounds) it decoded
  5% faster than the Mosaic GPU select (858.7 against 815.0 tokens/s): the select's own
  launch warming the next q, k, v beside it cost 0.06 ms per token less than the rows
  kernel warming it after the Mosaic select (`warm_from='rows'`).
  The top-K's launch also warms L2 with 16 MB of the next layer's q, k, v weight. End to end
  (1b, T = 1, decode_e2e_warm_h200_20261204{,b,d}.json) that weight's GEMV took 5.9 instead of
  8.1 µs per layer and the top-K 8.1 instead of 7.1: device time per token 1.4307 / 1.4297 /
  1.4357 ms against 1.4416 / 1.4415 / 1.4452 without. 24 MB: 1.463 (the GEMV no faster, the
  top-K 9.4 µs); 16 MB on 131 programs instead of 264: 1.4885.
  """
  cfg = default_config(num_tokens, d_model, d_ff)
  if cfg.pipeline != "list":
    return dataclasses.replace(cfg, down_splits=16, down_block_c=64)
  cfg = dataclasses.replace(cfg, topk=LIST_TOPK, warm_bytes=WARM_BYTES, list_sum="kernel")
  if d_model > 2048:
    return dataclasses.replace(cfg, fold_gate_sum=False)
  return dataclasses.replace(cfg, gemv_block_f=64, gemv_block_d=128, gemv_splits=2, gemv_stages=4)
