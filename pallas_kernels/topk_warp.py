"""Top-K selection with rows on warps: the `layout='warp'` variant of `topk.select_rows`.

Why: the row kernel spreads one row over every warp of its program, so each of its ~20
serial reductions (16 bisection counts, the prefix sum) crosses warps through shared memory
and a barrier, and ~600 us of its ~750 us at 16384 x 5632 stayed unexplained when the
search and the scan were removed (NOTES_kernels.md). Here a program holds R rows as
(C, R, L) blocks: element (c, r, l) is column off + c*L + l of row r. Triton's default
blocked layout (fastest axis first) puts a warp's 32 lanes on L and the warps on R when
num_warps <= R, so a row's counts (sum over C in-thread, then over L by shuffles) and its
two-level prefix sum (scan over L, then over the C chunk totals) never leave its warp.

The price is state: a warp holds the whole row (F/32 keys per thread). `keep=False`
re-reads G (from L1/L2) in every counting pass instead of holding keys in registers.
The search is the row kernel's: optional sampled bracket, then bisection on 16-bit keys
(fixed nbits steps when there is no sample: bisection from the full range needs exactly
that many, and extra steps leave a converged row unchanged).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _topk_count, _topk_sample, topk
from pallas_kernels import _triton_utils as tu


def _row_sum(x: jax.Array) -> jax.Array:
  """(C, R, L) -> (1, R, 1): in-thread over C first, then across the warp's lanes."""
  return jnp.sum(jnp.sum(x, axis=0, keepdims=True), axis=2, keepdims=True)


def _kth_by_radix3(keys, ranks: tuple[int, int], nbits: int):
  """`topk.kth_by_radix` on (1, R, S) sample keys; candidates on axis 0: (1, R, 1) each."""
  nd = 1 << _topk_sample.RADIX_BITS
  off = jnp.int32(-(1 << (nbits - 1)))
  jj = jnp.arange(2 * nd, dtype=jnp.int32)[:, None, None]  # (32, 1, 1)
  digit = jj & (nd - 1)
  second = jj >= nd
  rank = jnp.where(second, ranks[1], ranks[0])
  r = keys.shape[1]
  t0 = jnp.zeros((1, r, 1), jnp.int32)
  t1 = jnp.zeros((1, r, 1), jnp.int32)
  for step in range(nbits // _topk_sample.RADIX_BITS):
    shift = nbits - _topk_sample.RADIX_BITS * (step + 1)
    base = jnp.where(second, t1, t0)
    cand = (base | jnp.left_shift(digit, shift)) + off  # (32, R, 1)
    c = jnp.sum((keys >= cand).astype(jnp.int32), axis=2, keepdims=True)
    ok = (c >= rank).astype(jnp.int32)
    d0 = jnp.sum(jnp.where(second, 0, ok), axis=0, keepdims=True) - 1
    d1 = jnp.sum(jnp.where(second, ok, 0), axis=0, keepdims=True) - 1
    t0 = t0 | jnp.left_shift(d0, shift)
    t1 = t1 | jnp.left_shift(d1, shift)
  return t0 + off, t1 + off


def select_rows_warp(
  g_ref,
  *,
  t: int,
  f: int,
  k: int,
  cfg: topk.TopKConfig,
  interpret: bool,
  on_chunk: Callable,
  num_valid: int | None = None,
) -> None:
  """Same contract as `topk.select_rows`, with (C, R, L) arrays instead of (R, W)."""
  dtype = g_ref.dtype
  nbits = tu.key_bits(dtype)
  kmin, kmax = tu.key_range(dtype)
  mode = _topk_count.count_mode(cfg, dtype, interpret)
  use_float = mode != "int"
  nv = f if num_valid is None else min(num_valid, f)
  r, lanes = cfg.rows, cfg.lanes
  row_3 = pl.program_id(0) * r + jnp.arange(r, dtype=jnp.int32)[None, :, None]  # (1, R, 1)
  row_ok = row_3 < t
  chunks = tu.pow2_chunks(f, lanes)
  pad = kmin - 1 if nbits == 16 else kmin  # below every real 16-bit key
  hide = cfg.strided and lanes == 32

  def load(off, w):
    c = w // lanes
    cols = off + (
      jnp.arange(c, dtype=jnp.int32)[:, None, None] * lanes
      + jnp.arange(lanes, dtype=jnp.int32)[None, None, :]
    )
    if hide:
      cols = tu.hide_contiguity(cols, interpret)
    shape = (c, r, lanes)
    rows_b, cols_b = jnp.broadcast_to(row_3, shape), jnp.broadcast_to(cols, shape)
    valid = row_ok & (cols_b < f)
    g = pltriton.load(g_ref.at[rows_b, cols_b], mask=valid, other=0)
    if nv < f:
      g = jnp.where(cols_b < nv, g, jnp.array(jnp.finfo(dtype).min, dtype))
    return rows_b, cols_b, valid, g

  def keys_of(off, w, loaded=None):
    _, _, valid, g = loaded or load(off, w)
    key = tu.order_keys(g)
    if off + w > f or t % r:
      key = jnp.where(valid, key, pad)
    return key.astype(jnp.float32) if use_float else key

  kept = [keys_of(off, w) for off, w in chunks] if cfg.keep else None

  def chunk_keys(i):
    return kept[i] if kept is not None else keys_of(*chunks[i])

  def counts_ge(thrs):
    totals = [jnp.zeros((1, r, 1), jnp.int32) for _ in thrs]
    for i in range(len(chunks)):
      ckey = chunk_keys(i)
      for j, thr in enumerate(thrs):
        totals[j] = totals[j] + _row_sum(_topk_count.ge_ones(ckey, thr, mode)).astype(jnp.int32)
    return totals

  if cfg.ablate == "read_only":  # floor: load, keys, one count per row
    v = sum(_row_sum(chunk_keys(i)).astype(jnp.int32) for i in range(len(chunks)))
    return _emit_one(on_chunk, row_3, row_ok, v, f, dtype)

  lo = jnp.full((1, r, 1), kmin, jnp.int32)
  hi = jnp.full((1, r, 1), kmax, jnp.int32)
  chi = jnp.zeros((1, r, 1), jnp.int32)
  s = min(cfg.sample, 1 << (f.bit_length() - 1))
  sampled = bool(cfg.sample) and s >= 16
  if sampled:
    stride = nv // s if nv >= s else 1
    cols_s = jnp.arange(s, dtype=jnp.int32)[None, None, :] * stride
    rows_s, cols_s = jnp.broadcast_to(row_3, (1, r, s)), jnp.broadcast_to(cols_s, (1, r, s))
    ok_s = (rows_s < t) & (cols_s < nv)
    gs = pltriton.load(g_ref.at[rows_s, jnp.minimum(cols_s, f - 1)], mask=ok_s, other=0)
    keys_s = jnp.where(ok_s, tu.order_keys(gs), _topk_count.lowest_key(dtype))
    s_hi, s_lo = _kth_by_radix3(keys_s, topk.sample_ranks(nv, k, s), nbits)
    c1, c2 = counts_ge((s_lo, s_hi + 1))
    ok1, ok2 = c1 >= k, c2 < k
    lo = jnp.where(ok1, jnp.where(ok2, s_lo, s_hi + 1), lo)
    hi = jnp.where(ok1, jnp.where(ok2, s_hi, hi), s_lo - 1)
    chi = jnp.where(ok1, jnp.where(ok2, c2, chi), c1)

  def body(state):
    return _topk_count.bisect_step(state, lambda mid: counts_ge((mid,))[0], k)

  state = (lo, hi, chi)
  if cfg.ablate == "no_search":
    state = (lo * 0, hi * 0, chi)
  elif sampled:
    cond = lambda st: jnp.max((st[0] != st[1]).astype(jnp.int32)) > 0
    state = lax.while_loop(cond, body, state)
  else:
    state = lax.fori_loop(0, nbits, lambda _, st: body(st), state)
  v, _, n_gt = state
  if cfg.ablate == "no_final":  # search only: keep it alive with one store per row
    return _emit_one(on_chunk, row_3, row_ok, v + n_gt, f, dtype)
  need = k - n_gt
  v_c = v.astype(jnp.float32) if use_float else v
  carry = jnp.zeros((1, r, 1), jnp.int32)
  for i, (off, w) in enumerate(chunks):
    loaded = load(off, w)
    rows_b, cols_b, valid, g = loaded
    ckey = kept[i] if kept is not None else keys_of(off, w, loaded)
    gt, eq = ckey > v_c, ckey == v_c
    packed = gt.astype(jnp.int32) + jnp.left_shift(eq.astype(jnp.int32), 16)
    tot = jnp.sum(packed, axis=2, keepdims=True)  # (C, R, 1)
    if cfg.ablate == "no_scan":
      lane_cum, c_excl = packed * cols_b, tot
    else:
      lane_cum, c_excl = jnp.cumsum(packed, axis=2), jnp.cumsum(tot, axis=0) - tot
    cum = lane_cum + c_excl + carry
    carry = carry + jnp.sum(tot, axis=0, keepdims=True)
    sel, pos = topk.selected_slots(cum, gt, eq, valid, need, k, clip=bool(cfg.ablate))
    on_chunk(rows_b, cols_b, valid, g, sel, pos)


def _emit_one(on_chunk, row_3, row_ok, x, f, dtype) -> None:
  """Ablations: one element per row at slot 0 whose column depends on x (timing only)."""
  col = jnp.clip(x, 0, f - 1)
  zero = jnp.zeros(row_3.shape, dtype)
  on_chunk(row_3, col, row_ok, zero, row_ok, jnp.zeros(row_3.shape, jnp.int32))
