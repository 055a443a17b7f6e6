"""Which keys equal to the K-th key v the selection bitmask keeps: the first `need` of them by
channel, chunk by chunk (`TopKConfig.mask_pass`, for callers that keep only the mask)."""

from __future__ import annotations

from collections.abc import Iterator

import jax.numpy as jnp
from jax import lax

from pallas_kernels._topk_count import packed_sums


def tie_masks(ckeys: list, v, need, mask_pass: str) -> Iterator:
  """Which keys equal to the threshold v to keep, chunk by chunk: the first `need` ((R, 1)) by
  channel. Chunks wholly kept or wholly dropped take a compare; only a chunk the cut falls
  inside (one per row) pays for a prefix sum, behind a branch. A generator, and the equality
  masks made twice, so that no chunk's masks stay live past its own stores (registers).
  Every chunk's count is taken up front, three per reduction, unless `mask_pass` ends in
  '_each': then one reduction per chunk when it comes (158 vs 128 registers per thread at the
  1B shape, compiled for sm_90a on CPU). One prefix sum per row over the chunk the cut falls
  in, picked lane-wise, lost: 273.5 vs 268.3 us at the 1B shape (stream_sweep_h200_20261204)."""
  counts = [None] * len(ckeys)
  if not mask_pass.endswith("_each"):  # a chunk's count is at most its width
    bits = max(ckey.shape[1] for ckey in ckeys).bit_length()
    counts = packed_sums([(ckey == v).astype(jnp.int32) for ckey in ckeys], bits)
  before = jnp.zeros_like(need)
  for ckey, cnt in zip(ckeys, counts, strict=True):
    eq = ckey == v
    if cnt is None:
      cnt = jnp.sum(eq.astype(jnp.int32), axis=1, keepdims=True)
    rem = need - before  # equal keys of this chunk still to keep
    cut_inside = jnp.max(((rem > 0) & (rem < cnt)).astype(jnp.int32)) > 0

    def cut(eq=eq, rem=rem):
      return eq & (jnp.cumsum(eq.astype(jnp.int32), axis=1) <= rem)

    yield lax.cond(cut_inside, cut, lambda eq=eq, rem=rem, cnt=cnt: eq & (rem >= cnt))
    before = before + cnt
