"""The sampled bracket of the top-K search: from a strided sample of S keys per row, the two
ranks that bracket the K-th largest key with high probability, found RADIX_BITS at a time."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

RADIX_BITS = 4  # bits fixed per sample step


def sample_ranks(f: int, k: int, s: int) -> tuple[int, int]:
  """Descending ranks (r_hi <= r_lo) in the sample that bracket the K-th largest w.h.p."""
  p = k / f
  center = k * s / f
  margin = 3.0 * math.sqrt(max(s * p * (1 - p), 1.0)) + 1.0
  r_hi = max(1, min(s, math.floor(center - margin)))
  r_lo = max(1, min(s, math.ceil(center + margin)))
  return r_hi, r_lo


def kth_by_radix(keys, ranks: tuple[int, int], nbits: int) -> tuple[jax.Array, jax.Array]:
  """Per row of keys (R, S), the rank-th largest key for both ranks, RADIX_BITS per step.

  Each step counts 2 x 16 candidate thresholds in one (R, 32, S) compare and one reduction.
  """
  nd = 1 << RADIX_BITS
  off = jnp.int32(-(1 << (nbits - 1)))
  r = keys.shape[0]
  jj = jnp.arange(2 * nd, dtype=jnp.int32)[None, :, None]  # (1, 32, 1)
  digit = jj & (nd - 1)
  second = jj >= nd
  rank = jnp.where(second, ranks[1], ranks[0])
  ks = keys[:, None, :]
  t0 = jnp.zeros((r, 1, 1), jnp.int32)
  t1 = jnp.zeros((r, 1, 1), jnp.int32)
  for step in range(nbits // RADIX_BITS):
    shift = nbits - RADIX_BITS * (step + 1)
    base = jnp.where(second, t1, t0)
    cand = (base | jnp.left_shift(digit, shift)) + off
    c = jnp.sum((ks >= cand).astype(jnp.int32), axis=2, keepdims=True)  # (R, 32, 1)
    ok = (c >= rank).astype(jnp.int32)  # non-increasing in digit; digit 0 always holds
    d0 = jnp.sum(jnp.where(second, 0, ok), axis=1, keepdims=True) - 1
    d1 = jnp.sum(jnp.where(second, ok, 0), axis=1, keepdims=True) - 1
    t0 = t0 | jnp.left_shift(d0, shift)
    t1 = t1 | jnp.left_shift(d1, shift)
  return t0[:, :, 0] + off, t1[:, :, 0] + off
