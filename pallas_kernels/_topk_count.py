"""Counting passes of the top-K search: keys >= a threshold per element and per row, the
row's key span and one bisection step (shared by the row and warp layouts)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _triton_utils as tu
from pallas_kernels._topk_config import TopKConfig


def count_mode(cfg: TopKConfig, dtype, interpret: bool) -> str:
  mode = cfg.count
  if cfg.search != "bisect":
    return "int"  # the digit histograms take integer keys
  if tu.key_bits(dtype) == 32:
    return "int"  # 32-bit keys are not exact as fp32
  if mode == "auto":
    mode = "fsat"
  if mode == "fsat" and interpret:
    return "fclip"  # inline PTX cannot run in interpret mode; same arithmetic
  return mode


def lowest_key(dtype) -> int:
  """The key of the dtype's lowest finite value (what `reference.mask_padding` writes)."""
  import numpy as np

  lo = np.array(jnp.finfo(dtype).min, dtype)
  if tu.key_bits(dtype) == 32:
    b = int(lo.view(np.int32))
    return b ^ ((b >> 31) & 0x7FFFFFFF)
  b = int(lo.view(np.int16))
  return b ^ ((b >> 15) & 0x7FFF)


def ge_ones(ckey, thr, mode: str):
  """Per element, 1 where key >= thr: int32 for 'int', else fp32 on the fp32 pipe."""
  if mode == "int":
    return (ckey >= thr).astype(jnp.int32)
  c = jnp.broadcast_to((thr - 1).astype(jnp.float32), ckey.shape)
  if mode == "fsat":
    return pltriton.elementwise_inline_asm(
      "sub.sat.f32 $0, $1, $2;",
      args=[ckey, c],
      constraints="=f,f,f",
      pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(ckey.shape, jnp.float32)],
    )[0]
  return jnp.clip(ckey - c, 0.0, 1.0)


def packed_counts(ckeys: list, thrs: tuple, mode: str) -> list:
  """Per row, the number of keys >= each thr ((R, 1) int32), from equal-width chunks: the
  chunks are summed lane-wise, then two thresholds share an int32 (16 bits each: counts are
  < 32768), so each pair costs one block reduction."""
  lanes = []
  for thr in thrs:
    acc = ge_ones(ckeys[0], thr, mode)
    for ckey in ckeys[1:]:
      acc = acc + ge_ones(ckey, thr, mode)
    lanes.append(acc.astype(jnp.int32))
  out = []
  for i in range(0, len(lanes), 2):
    if i + 1 == len(lanes):
      out.append(jnp.sum(lanes[i], axis=1, keepdims=True))
      continue
    total = jnp.sum(lanes[i] + jnp.left_shift(lanes[i + 1], 16), axis=1, keepdims=True)
    out += [total & 0xFFFF, lax.shift_right_logical(total, 16)]
  return out


def row_span(ckeys: list, pad: int, kmax: int, lane_wise: bool):
  """Per row, the (lowest, highest) key other than padding, as int32 (R, 1): count(>= lo) is
  every real key (>= k) and count(> hi) = 0, so the search may start there. A row of padding
  only gives lo = hi = pad (converged, never stored)."""
  real = [jnp.where(c > pad, c, jnp.asarray(kmax, c.dtype)) for c in ckeys]
  if lane_wise:  # equal chunks: combine lane-wise, then one reduction each
    hi_l, lo_l = ckeys[0], real[0]
    for c, m in zip(ckeys[1:], real[1:], strict=True):
      hi_l, lo_l = jnp.maximum(hi_l, c), jnp.minimum(lo_l, m)
    hi, lo = jnp.max(hi_l, axis=1, keepdims=True), jnp.min(lo_l, axis=1, keepdims=True)
  else:
    hi = functools.reduce(jnp.maximum, [jnp.max(c, axis=1, keepdims=True) for c in ckeys])
    lo = functools.reduce(jnp.minimum, [jnp.min(m, axis=1, keepdims=True) for m in real])
  hi = hi.astype(jnp.int32)
  return jnp.minimum(lo.astype(jnp.int32), hi), hi


def bisect_step(state, count_ge: Callable, k: int):
  """One bisection step on (lo, hi, count(key > hi)); a converged row stays unchanged."""
  lo, hi, chi = state
  d = hi - lo
  mid = lo + lax.shift_right_logical(d, 1) + (d & 1)  # in (lo, hi]; no overflow
  c = count_ge(mid)
  ge = c >= k
  return jnp.where(ge, mid, lo), jnp.where(ge, hi, mid - 1), jnp.where(ge, chi, c)
