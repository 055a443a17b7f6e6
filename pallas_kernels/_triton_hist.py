"""Triton's `tt.histogram` inside Pallas-Triton kernels, and the radix select built on it.

Pallas-Triton exposes no shared memory or shared-memory atomics, which is what a radix select's
per-row digit histograms need; Triton's own `tt.histogram` (warp ballots per digit bit, then one
shared-memory atomic add per bin and warp) is that, at ~2 instructions per element for 256 bins.
Pallas has no primitive lowering to it, so this module adds one: a Pallas-Triton lowering rule
for the GPU and a scatter-add for interpret mode (and any other backend), same counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax._src import core as jax_core
from jax.interpreters import mlir

I32 = jnp.int32

histogram_p = jax_core.Primitive("moc_histogram")


def histogram(x: jax.Array, mask: jax.Array, num_bins: int) -> jax.Array:
  """Counts of each value in [0, num_bins) among x's elements where mask holds ((num_bins,) int32).

  x: 1-D int32 whose masked-in elements lie in [0, num_bins) (on the GPU only their low
  log2(num_bins) bits are looked at); num_bins a power of two, at least 32 (a warp's lanes).
  """
  if x.ndim != 1 or x.shape != mask.shape:
    raise ValueError(f"histogram takes 1-D x and mask of one shape, got {x.shape}, {mask.shape}")
  if num_bins < 32 or num_bins & (num_bins - 1):
    raise ValueError(f"num_bins must be a power of two >= 32, got {num_bins}")
  return histogram_p.bind(x.astype(I32), mask.astype(jnp.bool_), num_bins=num_bins)


def _histogram_ref(x, mask, *, num_bins):
  slot = jnp.where(mask, x, num_bins)  # masked-out elements fall off the end
  return jnp.zeros((num_bins,), I32).at[slot].add(1, mode="drop")


@histogram_p.def_abstract_eval
def _abstract_eval(x, mask, *, num_bins):
  del x, mask
  return jax_core.ShapedArray((num_bins,), I32)


histogram_p.def_impl(_histogram_ref)
mlir.register_lowering(histogram_p, mlir.lower_fun(_histogram_ref, multiple_results=False))


def _register_triton_lowering() -> None:
  """The GPU rule, through jax's private Pallas-Triton lowering table (jax 0.10 and 0.11)."""
  from jax._src.lib.triton import dialect as tt_dialect
  from jax._src.pallas.triton import lowering

  @lowering.register_lowering(histogram_p)
  def _lower(ctx, x, mask, *, num_bins):
    del num_bins
    out_type = mlir.aval_to_ir_type(ctx.context.mlir_ctx, ctx.avals_out[0])
    return tt_dialect.histogram(out_type, x, mask=mask)


_register_triton_lowering()


def top_bin(hist: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The bin holding the k-th largest element counted in hist, and how many lie above it.

  hist: (B,) counts with at least k elements in all; k: scalar int32 >= 1. Returns scalars
  (b, count in bins > b), b the largest bin with count(bins >= b) >= k.
  """
  num_bins = hist.shape[0]
  at_or_above = jnp.sum(hist) - jnp.cumsum(hist) + hist  # count(bins >= b), non-increasing
  b = jnp.sum((at_or_above >= k).astype(I32)) - 1
  above = jnp.sum(jnp.where(jnp.arange(num_bins, dtype=I32) > b, hist, 0))
  return b, above


def radix_kth(keys: list[jax.Array], k: int, num_bits: int) -> tuple[jax.Array, jax.Array]:
  """The K-th largest of one row's order keys and how many keys exceed it (scalars, int32).

  keys: the row as 1-D int32 chunks of `tu.order_keys` keys (16-bit keys; padding lanes below
  -32768 are left out) or 32-bit keys (padding at the lowest key, counted as such). One
  histogram pass per 8-bit digit, most significant first: the K-th key's digit is the bin
  `top_bin` finds, and the next pass counts only the keys that share the digits found so far.
  """
  if num_bits == 16:
    unsigned = [key + 32768 for key in keys]  # the keys' order as values in [0, 65535]
    masks = [u >= 0 for u in unsigned]
  else:  # the same bits read as unsigned: logical shifts below
    unsigned = [key ^ jnp.int32(-(1 << 31)) for key in keys]
    masks = [jnp.ones(u.shape, jnp.bool_) for u in unsigned]
  prefix = jnp.int32(0)  # the digits found so far
  above = jnp.int32(0)  # keys above the prefix's range
  for shift in range(num_bits - 8, -1, -8):
    hist = jnp.zeros((256,), I32)
    for u, mask in zip(unsigned, masks, strict=True):
      if shift + 8 < num_bits:
        mask = mask & (jax.lax.shift_right_logical(u, jnp.int32(shift + 8)) == prefix)
      digit = jax.lax.shift_right_logical(u, jnp.int32(shift)) & 255
      hist = hist + histogram(digit, mask, 256)
    b, more = top_bin(hist, k - above)
    above = above + more
    prefix = jax.lax.shift_left(prefix, jnp.int32(8)) | b
  kth = prefix - 32768 if num_bits == 16 else prefix ^ jnp.int32(-(1 << 31))
  return kth, above
