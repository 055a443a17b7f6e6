"""Radix select: the K-th largest key per row from 8-bit digit histograms (`search='radix'`).

Why: the bisection in `topk.select_rows` makes nbits serial passes over the row, each
ending in a cross-warp reduction; here 16-bit keys take 2 passes (32-bit keys 4), each
a 256-bin histogram of one digit of the keys whose higher digits match the prefix found
so far. The histogram pass gives the exact count of keys above every candidate digit at
once, so after the last pass the K-th key v and count(key > v) are both known exactly.

Pallas-Triton exposes neither `tl.histogram` nor shared-memory atomics (its atomics go to
global memory, i.e. L2: ~1e8 contended atomics per pass). A 256-bin histogram as 256
compare-count sums would cost 256 ops per element. Instead the 8-bit digit is split into
nibbles (hi, lo) and the histogram is one matrix product on the tensor cores:

    H[hi, lo] = sum_w onehot16(hi_w) [x] onehot16(lo_w)  =  A (16 x W) @ B (16 x W)^T

with exact 0/1 operands (bf16 or int8) and fp32/int32 accumulation: 32 compares per
element per pass plus the MMA (16 x 16 x W), instead of 256. R rows per program are
stacked as (16R x W) operands and the R diagonal 16 x 16 blocks of the product are kept
(R times the MMA work, same operand work). Padded lanes and keys outside the prefix are
zeroed in A.

The final selection (packed prefix sum, ties to the lower channels) is the row kernel's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

DIGIT = 8  # bits per pass
NIB = 16  # 1 << (DIGIT // 2): one-hot width of each nibble
OPERAND = {"radix": jnp.bfloat16, "radix_i8": jnp.int8}


def _unsigned(key: jax.Array, nbits: int) -> jax.Array:
  """Keys in unsigned order as int32 bits (compare with logical shifts only)."""
  if nbits == 16:
    return key + (1 << 15)  # [0, 65535]; the 16-bit pad (kmin - 1) becomes -1
  return key ^ jnp.int32(-(1 << 31))


def _from_unsigned(u: jax.Array, nbits: int) -> jax.Array:
  if nbits == 16:
    return u - (1 << 15)
  return u ^ jnp.int32(-(1 << 31))


def _digit_hist(us, shift, prefix, nbits, r, operand) -> jax.Array:
  """Per row, the (R, 256) int32 histogram of digit (u >> shift) & 255 over the keys
  whose bits above the digit equal prefix (R, 1); 16-bit pad lanes (u < 0) excluded."""
  acc_t = jnp.int32 if operand == jnp.int8 else jnp.float32
  i16 = jnp.arange(NIB, dtype=jnp.int32)[None, :, None]  # (1, 16, 1)
  total = None
  for u in us:
    w = u.shape[-1]
    d = lax.shift_right_logical(u, shift) & 0xFF
    ok = u >= 0 if nbits == 16 else jnp.ones(u.shape, jnp.bool_)
    if shift + DIGIT < nbits:
      ok = ok & (lax.shift_right_logical(u, shift + DIGIT) == prefix)
    hi, lo = (d >> 4)[:, None, :], (d & 0xF)[:, None, :]  # (R, 1, W)
    a = ((hi == i16) & ok[:, None, :]).astype(operand).reshape(r * NIB, w)
    b = (lo == i16).astype(operand).reshape(r * NIB, w)
    h = lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=acc_t)
    total = h if total is None else total + h
  if r > 1:  # keep the R diagonal blocks: row r of A against row r of B
    h4 = total.reshape(r, NIB, r, NIB)
    ra = jnp.arange(r, dtype=jnp.int32)
    same = ra[:, None, None, None] == ra[None, None, :, None]
    total = jnp.sum(jnp.where(same, h4, 0), axis=2)  # (R, 16, 16)
  return total.astype(jnp.int32).reshape(r, NIB * NIB)


def kth_key(ckeys, k: int, *, nbits: int, rows: int, operand) -> tuple[jax.Array, jax.Array]:
  """(v, count(key > v)), each (R, 1) int32, for the int32 keys of each (R, W) chunk.

  v is the k-th largest key of the row; ties at v are left to the caller.
  """
  us = [_unsigned(c, nbits) for c in ckeys]
  prefix = jnp.zeros((rows, 1), jnp.int32)
  need = jnp.full((rows, 1), k, jnp.int32)  # rank of the k-th key among the eligible ones
  n_gt = jnp.zeros((rows, 1), jnp.int32)
  bins = jnp.arange(NIB * NIB, dtype=jnp.int32)[None, :]
  for p in range(nbits // DIGIT):
    shift = nbits - DIGIT * (p + 1)
    hist = _digit_hist(us, shift, prefix, nbits, rows, operand)
    cum = jnp.cumsum(hist, axis=1)
    tot = jnp.sum(hist, axis=1, keepdims=True)
    ge = tot - cum + hist  # eligible keys with digit >= bin: non-increasing, ge[0] >= need
    digit = jnp.sum((ge >= need).astype(jnp.int32), axis=1, keepdims=True) - 1
    above = jnp.sum(jnp.where(bins > digit, hist, 0), axis=1, keepdims=True)
    n_gt = n_gt + above
    need = need - above
    prefix = jnp.left_shift(prefix, DIGIT) | digit
  return _from_unsigned(prefix, nbits), n_gt
