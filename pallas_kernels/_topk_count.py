"""Counting passes of the top-K search: keys >= a threshold per element and per row, and one
bisection step."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _triton_utils as tu
from pallas_kernels._topk_config import TopKConfig


def count_mode(cfg: TopKConfig, dtype, interpret: bool) -> str:
  mode = cfg.count
  if tu.key_bits(dtype) == 32:
    return "int"  # 32-bit keys are not exact as fp32
  if mode == "auto":
    mode = "fsat"
  if mode == "fsat" and interpret:
    return "fclip"  # inline PTX cannot run in interpret mode; same arithmetic
  if mode == "pair" and not cfg.chunk:
    raise ValueError("count='pair' needs equal chunks (TopKConfig.chunk > 0)")
  return mode


# Packed 16-bit counting (count='pair'): the row stays on chip as its bf16/f16 values, and one
# `set` + one `fma` on a pair of values adds both of their (value >= threshold) bits to a pair
# of 16-bit float counters: one instruction per value and threshold instead of two on fp32
# keys, and half the registers. Float order equals key order except that -0 == +0 as floats
# (key(-0) = -1 < key(+0) = 0), so the count at threshold key 0 subtracts the row's -0s; a
# threshold below key(-inf) compares against -inf, one above key(+inf) against NaN (counts
# nothing, as no real key is that high). Lanes past F hold NaN and never count.
_PAIR_ASM = {
  jnp.dtype(jnp.bfloat16): "bf16x2",
  jnp.dtype(jnp.float16): "f16x2",
}


def pair_values(g, valid):
  """The values as the pair counts see them: NaN where not `valid` (never >= anything)."""
  return jnp.where(valid, g, jnp.array(jnp.nan, g.dtype))


def negative_zeros(g, valid):
  """Per row ((R, 1) int32), how many valid values are -0."""
  neg0 = (lax.bitcast_convert_type(g, jnp.int16) == jnp.int16(-32768)) & valid
  return jnp.sum(neg0.astype(jnp.int32), axis=1, keepdims=True)


def _pair_add_ge(val, thr_val, acc, interpret: bool):
  """acc + (val >= thr_val), elementwise, in val's 16-bit float type (two per instruction)."""
  if interpret:  # IEEE >= without flushing subnormals (XLA on CPU flushes them): via keys
    ge = _ieee_key(val) >= _ieee_key(thr_val)
    return acc + (ge & ~jnp.isnan(val) & ~jnp.isnan(thr_val)).astype(acc.dtype)
  t = _PAIR_ASM[jnp.dtype(val.dtype)]
  one = "0x3F803F80" if t == "bf16x2" else "0x3C003C00"
  asm = (
    f"{{ .reg .b32 s, one; mov.b32 one, {one}; set.ge.{t}.{t} s, $1, $2; "
    f"fma.rn.{t} $0, s, one, $3; }}"
  )
  return pltriton.elementwise_inline_asm(
    asm,
    args=[val, thr_val, acc],
    constraints="=r,r,r,r",
    pack=2,
    result_shape_dtypes=[jax.ShapeDtypeStruct(val.shape, val.dtype)],
  )[0]


def _inf_keys(dtype) -> tuple[int, int]:
  """(key(-inf), key(+inf)) as Python ints (16-bit floats: sign-magnitude bits -> key)."""
  bits = int(np.array(np.inf, dtype=jnp.dtype(dtype)).view(np.uint16))
  neg = -((bits | 0x8000) ^ 0xFFFF) - 1  # the int16 of -inf's bits, e.g. 0xFF80 -> -128
  return neg ^ 0x7FFF, bits


def _ieee_key(x):
  """Order keys with -0 and +0 equal, as a float comparison sees them."""
  key = tu.order_keys(x)
  return jnp.where(key == -1, 0, key)


def threshold_value(thr, dtype):
  """The 16-bit float a threshold key compares as: -inf below key(-inf), NaN above key(+inf)."""
  lo, hi = _inf_keys(dtype)
  t = jnp.clip(thr, lo, hi + 1)
  val = tu.key_to_value(jnp.minimum(t, hi), dtype)
  return jnp.where(t > hi, jnp.array(jnp.nan, dtype), val)


def pair_counts(cvals: list, thrs: tuple, neg0, interpret: bool) -> list:
  """`packed_counts` for count='pair': per row, keys >= each thr, from the chunks' values."""
  lanes = []
  for thr in thrs:
    tv = jnp.broadcast_to(threshold_value(thr, cvals[0].dtype), cvals[0].shape)
    acc = jnp.zeros(cvals[0].shape, cvals[0].dtype)
    for cval in cvals:  # <= 256 chunks: the counters stay exact integers
      acc = _pair_add_ge(cval, tv, acc, interpret)
    lanes.append(acc.astype(jnp.float32).astype(jnp.int32))
  out = _reduce_pairs(lanes)
  return [c - jnp.where(thr == 0, neg0, 0) for c, thr in zip(out, thrs, strict=True)]


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
  return _reduce_pairs(lanes)


def _reduce_pairs(lanes: list) -> list:
  """Per-lane int32 counts (each < 32768 per row) -> per-row totals, two per reduction."""
  out = []
  for i in range(0, len(lanes), 2):
    if i + 1 == len(lanes):
      out.append(jnp.sum(lanes[i], axis=1, keepdims=True))
      continue
    total = jnp.sum(lanes[i] + jnp.left_shift(lanes[i + 1], 16), axis=1, keepdims=True)
    out += [total & 0xFFFF, lax.shift_right_logical(total, 16)]
  return out


def bisect_step(state, count_ge: Callable, k: int):
  """One bisection step on (lo, hi, count(key > hi)); a converged row stays unchanged."""
  lo, hi, chi = state
  d = hi - lo
  mid = lo + lax.shift_right_logical(d, 1) + (d & 1)  # in (lo, hi]; no overflow
  c = count_ge(mid)
  ge = c >= k
  return jnp.where(ge, mid, lo), jnp.where(ge, hi, mid - 1), jnp.where(ge, chi, c)
