"""Counting passes of the top-K search: keys >= a threshold per element and per row, and one
bisection step."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
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
  return mode


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


def bisect_step(state, count_ge: Callable, k: int):
  """One bisection step on (lo, hi, count(key > hi)); a converged row stays unchanged."""
  lo, hi, chi = state
  d = hi - lo
  mid = lo + lax.shift_right_logical(d, 1) + (d & 1)  # in (lo, hi]; no overflow
  c = count_ge(mid)
  ge = c >= k
  return jnp.where(ge, mid, lo), jnp.where(ge, hi, mid - 1), jnp.where(ge, chi, c)
