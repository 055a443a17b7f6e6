"""Counting passes of the top-K search: keys >= a threshold per element and per row, and one
bisection step."""

from __future__ import annotations

import statistics
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


def packed_sums(lanes: list, bits: int) -> list:
  """Per row, the sum of each (R, W) int32 array ((R, 1) int32), each sum < 2**bits: arrays of
  one shape next to each other share an int32 in bits-wide fields, so 32 // bits of them cost
  one block reduction."""
  out, i = [], 0
  while i < len(lanes):
    group = [lanes[i]]
    while len(group) < 32 // bits and i + len(group) < len(lanes):
      if lanes[i + len(group)].shape != lanes[i].shape:
        break
      group.append(lanes[i + len(group)])
    packed = sum(jnp.left_shift(a, j * bits) for j, a in enumerate(group))
    total = jnp.sum(packed, axis=1, keepdims=True)
    mask = (1 << bits) - 1
    out += [lax.shift_right_logical(total, j * bits) & mask for j in range(len(group))]
    i += len(group)
  return out


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
  return packed_sums(lanes, 16)


def bisect_step(state, count_ge: Callable, k: int):
  """One bisection step on (lo, hi, count(key > hi)); a converged row stays unchanged."""
  lo, hi, chi = state
  d = hi - lo
  mid = lo + lax.shift_right_logical(d, 1) + (d & 1)  # in (lo, hi]; no overflow
  c = count_ge(mid)
  ge = c >= k
  return jnp.where(ge, mid, lo), jnp.where(ge, hi, mid - 1), jnp.where(ge, chi, c)


OUTER = 5.0  # the outer bracket's margin, in inner margins


def gauss_bracket(s1, s2, n: int, k: int, margin: float, dtype) -> tuple:
  """Four ascending keys around the row's K-th largest value as a Gaussian with the row's mean
  and variance (s1, s2: sums of values and squares over n real channels) would have it:
  mean + (z + c)·std for c = -5m, -m, +m, +5m (the last two + 1 key), z the (1 - k/n) normal
  quantile. A guess: `bracket_state` checks it, so a miss costs passes, never exactness. The
  outer pair catches heavier tails than a Gaussian's (Laplace, Student t with 3 dof)."""
  z = statistics.NormalDist().inv_cdf(min(max(1.0 - k / n, 1e-6), 1.0 - 1e-6))
  mean = s1 / n
  std = jnp.sqrt(jnp.maximum(s2 / n - mean * mean, 0.0))
  kmax = tu.key_range(dtype)[1]
  fmax = float(jnp.finfo(dtype).max)

  def key(c):  # finite, in dtype's key range (NaN from inf inputs lands on -max)
    v = mean + (z + c * margin) * std
    v = jnp.where(v == v, jnp.clip(v, -fmax, fmax), -fmax)
    return tu.order_keys(v.astype(dtype))

  out = [key(-OUTER)]
  for c, plus in ((-1.0, 0), (1.0, 1), (OUTER, 1)):  # ascending, at most kmax
    out.append(jnp.minimum(jnp.maximum(key(c) + plus, out[-1]), kmax))
  return tuple(out)


def bracket_state(thrs: tuple, counts: list, k: int, dtype):
  """Search state (lo, hi, count(key > hi)) from ascending thresholds and count(key >= t)
  for each: the interval between the last threshold whose count reaches k and the next."""
  kmin, kmax = tu.key_range(dtype)
  lo, hi, chi = jnp.full_like(thrs[0], kmin), thrs[0] - 1, counts[0]
  for j, (t, c) in enumerate(zip(thrs, counts, strict=True)):
    last = j + 1 == len(thrs)
    nxt_hi = jnp.full_like(t, kmax) if last else thrs[j + 1] - 1
    nxt_chi = jnp.zeros_like(c) if last else counts[j + 1]
    ok = c >= k
    lo, hi, chi = jnp.where(ok, t, lo), jnp.where(ok, nxt_hi, hi), jnp.where(ok, nxt_chi, chi)
  return lo, jnp.maximum(hi, lo), chi
