"""Which keys equal to the K-th key v the selection bitmask keeps: the first `need` of them by
channel, chunk by chunk (for callers that keep only the mask)."""

from __future__ import annotations

from collections.abc import Iterator

import jax.numpy as jnp
from jax import lax

from pallas_kernels._topk_count import packed_sums


def tie_masks(ckeys: list, v, need) -> Iterator:
  """Which keys equal to the threshold v to keep, chunk by chunk: the first `need` ((R, 1)) by
  channel. Chunks wholly kept or wholly dropped take a compare; only a chunk the cut falls
  inside (one per row) pays for a prefix sum, behind a branch. A generator, and the equality
  masks made twice, so that no chunk's masks stay live past its own stores (registers).
  Every chunk's count is taken up front, three per reduction (one reduction per chunk as it
  comes saved registers but no time). One prefix sum per row over the chunk the cut falls
  in, picked lane-wise, lost: 273.5 vs 268.3 us at the 1B shape (stream_sweep_h200_20261204)."""
  bits = max(ckey.shape[1] for ckey in ckeys).bit_length()  # a chunk's count fits its width
  counts = packed_sums([(ckey == v).astype(jnp.int32) for ckey in ckeys], bits)
  before = jnp.zeros_like(need)
  for ckey, cnt in zip(ckeys, counts, strict=True):
    eq = ckey == v
    rem = need - before  # equal keys of this chunk still to keep
    cut_inside = jnp.max(((rem > 0) & (rem < cnt)).astype(jnp.int32)) > 0

    def cut(eq=eq, rem=rem):
      return eq & (jnp.cumsum(eq.astype(jnp.int32), axis=1) <= rem)

    yield lax.cond(cut_inside, cut, lambda eq=eq, rem=rem, cnt=cnt: eq & (rem >= cnt))
    before = before + cnt
