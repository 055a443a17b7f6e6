"""Exact per-row top-K selection in Pallas-Triton, the semantics of `reference.select`.

Why not `lax.top_k`: it sorts every whole row (4.3 ms at 16384 x 5632 bf16 on an H200) when
only the K-th largest value per row is needed. Here each program holds R rows on chip, as
power-of-two chunks that cover F with no more than `granule` lanes of padding, and:

1. maps values to order-preserving int32 keys (16-bit floats: 16-bit keys, exact in fp32);
2. brackets the K-th largest key from a strided sample of the row (bisection on S keys),
   then verifies the bracket with one counting pass over the row (a failed side still
   narrows the range, so the result is exact whatever the sample says);
3. bisects inside the bracket, one counting pass per step (typically 5-7 steps, not 16);
4. one packed prefix sum (count of `> v` in the low 16 bits, of `== v` in the high) gives
   each selected element its output slot: ties at v go to the lowest channels.

The counting pass is the hot loop. `count='fsat'` counts with `sub.sat.f32` + add on the
fp32 pipe (keys as exact fp32 integers), `'fclip'` the same with min/max, `'int'` with
integer compares (needed for fp32 inputs, whose 32-bit keys are not exact in fp32).

NaN inputs are not supported (they order by their bit pattern). F must be < 32768.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _triton_utils as tu
from pallas_kernels import reference

GROUP, PER_GROUP = reference.GROUP, reference.PER_GROUP


@dataclasses.dataclass(frozen=True)
class TopKConfig:
  """Tuning knobs; every setting gives the same (exact) result."""

  rows: int = 1  # rows per program
  num_warps: int = 4  # 758 vs 870 us for 8 at 16384x5632 (H200, NOTES_kernels.md)
  sample: int = 256  # sample size for the bracket; 0: bisect over the whole key range
  count: str = "auto"  # 'int' | 'fclip' | 'fsat' | 'auto'
  granule: int = 256  # chunk granule; 0: one power-of-two block per row


DEFAULT = TopKConfig()


def _count_mode(cfg: TopKConfig, dtype, interpret: bool) -> str:
  mode = cfg.count
  if tu.key_bits(dtype) == 32:
    return "int"  # 32-bit keys are not exact as fp32
  if mode == "auto":
    mode = "fsat"
  if mode == "fsat" and interpret:
    return "fclip"  # inline PTX cannot run in interpret mode; same arithmetic
  return mode


def _sample_ranks(f: int, k: int, s: int) -> tuple[int, int]:
  """Descending ranks (r_hi <= r_lo) in the sample that bracket the K-th largest w.h.p."""
  p = k / f
  center = k * s / f
  margin = 3.0 * math.sqrt(max(s * p * (1 - p), 1.0)) + 1.0
  r_hi = max(1, min(s, math.floor(center - margin)))
  r_lo = max(1, min(s, math.ceil(center + margin)))
  return r_hi, r_lo


def _kth_by_bits(keys, ranks: tuple[int, ...], nbits: int) -> tuple[jax.Array, ...]:
  """Per row, the rank-th largest key (rank >= 1) for each rank, by building its bits."""
  off = jnp.int32(-(1 << (nbits - 1)))
  shape = (keys.shape[0], 1)

  def body(i, ts):
    bit = jnp.left_shift(jnp.int32(1), nbits - 1 - i)
    out = []
    for t_u, rank in zip(ts, ranks, strict=True):
      cand = t_u | bit
      c = jnp.sum((keys >= cand + off).astype(jnp.int32), axis=1, keepdims=True)
      out.append(jnp.where(c >= rank, cand, t_u))
    return tuple(out)

  ts = lax.fori_loop(0, nbits, body, tuple(jnp.zeros(shape, jnp.int32) for _ in ranks))
  return tuple(t + off for t in ts)


def select_rows(
  g_ref, *, t: int, f: int, k: int, cfg: TopKConfig, interpret: bool, on_chunk: Callable
) -> None:
  """In-kernel: select the top-k of this program's rows; call on_chunk per row chunk.

  on_chunk(rows_b, cols_b, valid, g, sel, pos): broadcast (R, W) row/column indices, the
  in-bounds mask, the loaded values, the selection mask and each selected element's
  output slot in [0, k).
  """
  dtype = g_ref.dtype
  nbits = tu.key_bits(dtype)
  kmin, kmax = tu.key_range(dtype)
  mode = _count_mode(cfg, dtype, interpret)
  use_float = mode != "int"
  r = cfg.rows
  row_r1 = pl.program_id(0) * r + jnp.arange(r, dtype=jnp.int32)[:, None]
  row_ok = row_r1 < t
  chunks = tu.pow2_chunks(f, cfg.granule) if cfg.granule else [(0, tu.next_pow2(f))]
  pad = kmin - 1 if nbits == 16 else kmin  # below every real 16-bit key

  tiles = []
  for off, w in chunks:
    rows_b = jnp.broadcast_to(row_r1, (r, w))
    cols_b = jnp.broadcast_to(off + jnp.arange(w, dtype=jnp.int32)[None, :], (r, w))
    valid = row_ok & (cols_b < f)
    g = pltriton.load(g_ref.at[rows_b, cols_b], mask=valid, other=0)
    key = jnp.where(valid, tu.order_keys(g), pad)
    ckey = key.astype(jnp.float32) if use_float else key
    tiles.append((rows_b, cols_b, valid, g, ckey))

  def to_domain(x):
    return x.astype(jnp.float32) if use_float else x

  def count_ge(thr):
    """Per row, the number of keys >= thr (thr: (R, 1) int32)."""
    total = jnp.zeros((r, 1), jnp.int32)
    for *_, ckey in tiles:
      if mode == "int":
        part = jnp.sum((ckey >= thr).astype(jnp.int32), axis=1, keepdims=True)
      else:
        c = jnp.broadcast_to((thr - 1).astype(jnp.float32), ckey.shape)
        if mode == "fsat":
          ones = pltriton.elementwise_inline_asm(
            "sub.sat.f32 $0, $1, $2;",
            args=[ckey, c],
            constraints="=f,f,f",
            pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(ckey.shape, jnp.float32)],
          )[0]
        else:
          ones = jnp.clip(ckey - c, 0.0, 1.0)
        part = jnp.sum(ones, axis=1, keepdims=True).astype(jnp.int32)
      total = total + part
    return total

  lo = jnp.full((r, 1), kmin, jnp.int32)
  hi = jnp.full((r, 1), kmax, jnp.int32)
  chi = jnp.zeros((r, 1), jnp.int32)  # count(key > hi)
  s = min(cfg.sample, 1 << (f.bit_length() - 1))
  if cfg.sample and s >= 16:
    stride = f // s
    rows_s = jnp.broadcast_to(row_r1, (r, s))
    cols_s = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32)[None, :] * stride, (r, s))
    gs = pltriton.load(g_ref.at[rows_s, cols_s], mask=rows_s < t, other=0)
    s_hi, s_lo = _kth_by_bits(tu.order_keys(gs), _sample_ranks(f, k, s), nbits)
    c1 = count_ge(s_lo)
    c2 = count_ge(s_hi + 1)  # NaN payloads aside, s_hi < kmax here
    ok1, ok2 = c1 >= k, c2 < k
    lo = jnp.where(ok1, jnp.where(ok2, s_lo, s_hi + 1), lo)
    hi = jnp.where(ok1, jnp.where(ok2, s_hi, hi), s_lo - 1)
    chi = jnp.where(ok1, jnp.where(ok2, c2, chi), c1)

  def cond(state):
    lo, hi, _ = state
    return jnp.max((lo != hi).astype(jnp.int32)) > 0

  def body(state):
    lo, hi, chi = state
    d = hi - lo
    mid = lo + lax.shift_right_logical(d, 1) + (d & 1)  # in (lo, hi]; no overflow
    c = count_ge(mid)
    ge = c >= k
    return jnp.where(ge, mid, lo), jnp.where(ge, hi, mid - 1), jnp.where(ge, chi, c)

  v, _, n_gt = lax.while_loop(cond, body, (lo, hi, chi))
  need = k - n_gt  # how many keys equal to v to keep, lowest channels first
  v_c = to_domain(v)
  carry = jnp.zeros((r, 1), jnp.int32)
  for rows_b, cols_b, valid, g, ckey in tiles:
    gt = ckey > v_c
    eq = ckey == v_c
    packed = gt.astype(jnp.int32) + jnp.left_shift(eq.astype(jnp.int32), 16)
    cum = jnp.cumsum(packed, axis=1) + carry
    carry = carry + jnp.sum(packed, axis=1, keepdims=True)
    cnt_eq = lax.shift_right_logical(cum, 16)
    sel = valid & (gt | (eq & (cnt_eq <= need)))
    pos = (cum & 0xFFFF) + jnp.minimum(cnt_eq, need) - 1
    on_chunk(rows_b, cols_b, valid, g, sel, pos)


def _topk_kernel(g_ref, idx_ref, val_ref, *, t, f, k, cfg, interpret):
  def store(rows_b, cols_b, valid, g, sel, pos):
    del valid
    tu.scatter_store(idx_ref, rows_b, pos, cols_b, sel, interpret)
    tu.scatter_store(val_ref, rows_b, pos, g, sel, interpret)

  select_rows(g_ref, t=t, f=f, k=k, cfg=cfg, interpret=interpret, on_chunk=store)


def group_rows(g_ref, *, t: int, f: int, rows: int, on_group: Callable) -> None:
  """In-kernel 2:8: per group of 8 channels, the two largest (ties to the lower lane).

  on_group(rows_b, cols_b, valid, g, lane, row_g, base_g, ok_g, a, b): the (R, BG, 8)
  indices, mask, values and lane iota; then per group (R, BG, 1) its row, first channel,
  in-bounds mask and its two chosen lanes a < b.
  """
  ng = f // GROUP
  bg = tu.next_pow2(ng)
  row = pl.program_id(0) * rows + jnp.arange(rows, dtype=jnp.int32)[:, None, None]
  base = jnp.arange(bg, dtype=jnp.int32)[None, :, None] * GROUP
  lane = jnp.arange(GROUP, dtype=jnp.int32)[None, None, :]
  shape = (rows, bg, GROUP)
  rows_b = jnp.broadcast_to(row, shape)
  cols_b = jnp.broadcast_to(base + lane, shape)
  lane_b = jnp.broadcast_to(lane, shape)
  valid = (rows_b < t) & (cols_b < f)
  g = pltriton.load(g_ref.at[rows_b, cols_b], mask=valid, other=0)
  key = tu.order_keys(g)
  m1 = jnp.max(key, axis=2, keepdims=True)
  i1 = jnp.min(jnp.where(key == m1, lane_b, GROUP), axis=2, keepdims=True)
  # Lane i1 drops out; among the rest the lowest lane holding the maximum wins.
  key2 = jnp.where(lane_b == i1, tu.key_range(g.dtype)[0], key)
  m2 = jnp.max(key2, axis=2, keepdims=True)
  i2 = jnp.min(jnp.where((key2 == m2) & (lane_b != i1), lane_b, GROUP), axis=2, keepdims=True)
  gshape = (rows, bg, 1)
  row_g = jnp.broadcast_to(row, gshape)
  base_g = jnp.broadcast_to(base, gshape)
  ok_g = (row_g < t) & (base_g < f)
  a, b = jnp.minimum(i1, i2), jnp.maximum(i1, i2)
  on_group(rows_b, cols_b, valid, g, lane_b, row_g, base_g, ok_g, a, b)


def _group_kernel(g_ref, idx_ref, val_ref, *, t, f, rows, interpret):
  def store(rows_b, cols_b, valid, g, lane, row_g, base_g, ok_g, a, b):
    del rows_b, cols_b, valid, g, lane
    for j, lane_j in enumerate((a, b)):
      col = base_g + lane_j
      slot = (base_g // GROUP) * PER_GROUP + j
      val = pltriton.load(g_ref.at[row_g, col], mask=ok_g, other=0)
      tu.scatter_store(idx_ref, row_g, slot, col, ok_g, interpret)
      tu.scatter_store(val_ref, row_g, slot, val, ok_g, interpret)

  group_rows(g_ref, t=t, f=f, rows=rows, on_group=store)


def _flatten(g_TxF: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
  *lead, f = g_TxF.shape
  return g_TxF.reshape(-1, f), tuple(lead)


@functools.partial(jax.jit, static_argnames=("k", "variant", "config", "interpret"))
def select(
  g_TxF: jax.Array,
  k: int,
  variant: str = "moc",
  *,
  config: TopKConfig | None = None,
  interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Same contract as `reference.select`: (idx_TxK int32 ascending, val_TxK in g's dtype).

  Not differentiable (a pallas_call); `moc_ffn` owns the gradient.
  """
  cfg = config or DEFAULT
  interpret = tu.default_interpret() if interpret is None else interpret
  g2, lead = _flatten(g_TxF)
  t, f = g2.shape
  if variant == "moc_2of8":
    if f % GROUP:
      raise ValueError(f"moc_2of8 needs F divisible by {GROUP}, got F={f}")
    k = f // GROUP * PER_GROUP
    rows = max(1, min(cfg.rows, 4096 // tu.next_pow2(f)))
    kernel = functools.partial(_group_kernel, t=t, f=f, rows=rows, interpret=interpret)
  elif variant == "moc":
    if not 0 < k <= f:
      raise ValueError(f"k must be in [1, {f}], got {k}")
    if f >= 32768:
      raise ValueError(f"F must be < 32768 for the packed prefix sum, got {f}")
    rows = cfg.rows
    kernel = functools.partial(_topk_kernel, t=t, f=f, k=k, cfg=cfg, interpret=interpret)
  else:
    raise ValueError(f"unknown MoC variant {variant!r}; expected 'moc' or 'moc_2of8'")
  idx, val = pl.pallas_call(
    kernel,
    out_shape=(
      jax.ShapeDtypeStruct((t, k), jnp.int32),
      jax.ShapeDtypeStruct((t, k), g2.dtype),
    ),
    grid=(pl.cdiv(t, rows),),
    interpret=interpret,
    compiler_params=None if interpret else tu.compiler_params(cfg.num_warps),
    name=f"moc_select_{variant}",
  )(g2)
  return idx.reshape(*lead, k), val.reshape(*lead, k)
