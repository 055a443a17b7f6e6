"""Exact per-row top-K selection in Pallas-Triton, the semantics of `reference.select`.

Why not `lax.top_k`: it sorts every whole row (4.3 ms at 16384 x 5632 bf16 on an H200) when
only the K-th largest value per row is needed. Each program holds R rows on chip as
order-preserving keys (the only per-element state kept across the search), in power-of-two
chunks that cover F with at most `granule` padded lanes, and:

1. searches for the K-th largest key, `fan` thresholds per counting pass (1: bisection;
   2: ternary; 3: radix 4), over the dtype's whole key range or, with `gauss_margin`, from
   the interval a checked Gaussian guess puts it in (`_topk_count.gauss_bracket`); with
   `chunk`, equal chunks are summed lane-wise and two thresholds share one int32, so a pass
   ends in one block reduction (`_topk_count.packed_counts`);
2. one packed prefix sum per chunk (count of `> v` in the low 16 bits, of `== v` in the high)
   gives each selected element its output slot: ties at v go to the lowest channels. G is
   re-read (from L1/L2) for the values rather than kept in registers. Callers that keep
   only the mask (`slots=False`) resolve ties from per-chunk counts instead
   (`_topk_ties.tie_masks`).

Counting runs on the fp32 pipe for 16-bit keys (`sub.sat.f32` + add; keys are exact small
integers in fp32), on integer compares for fp32 inputs. Channels >= num_valid are treated as
holding the dtype's lowest finite value, exactly as `reference.mask_padding` does.

NaN inputs are not supported (they order by their bit pattern). F must be < 32768.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _triton_utils as tu
from pallas_kernels import reference
from pallas_kernels._topk_config import TopKConfig
from pallas_kernels._topk_count import (
  bisect_step,
  bracket_state,
  count_mode,
  gauss_bracket,
  ge_ones,
  packed_counts,
)
from pallas_kernels._topk_ties import tie_masks

GROUP, PER_GROUP = reference.GROUP, reference.PER_GROUP


ONE_BLOCK = TopKConfig()  # one power-of-two block per row
CHUNKED = TopKConfig(chunk=512, fan=2)  # 512-wide chunks, ternary search (16-bit keys)
# 512-wide chunks, bisection from a checked Gaussian guess (one kernel)
GAUSS = TopKConfig(chunk=512, gauss_margin=0.1)
# GAUSS as two kernels: the selection bitmask (by the Mosaic GPU radix select where it can run),
# then each slot gathered in order (`select`'s default for 'moc')
GAUSS_GATHER = dataclasses.replace(GAUSS, compact=True, apply_mode="gather", selection="auto")
# The whole top-K in the Mosaic GPU kernel: the selection, then each selected key compacted to
# its slot while the row is still in shared memory (`mgpu_select.select`); `select`'s default
# for 'moc' where that kernel runs (`default_config`)
MOSAIC = dataclasses.replace(GAUSS_GATHER, compact=False, selection="mgpu")


GATHER_MAX_F = 8192  # GAUSS_GATHER was timed up to 5632 channels (exact at 16384 too, untimed)


def default_config(
  f: int, variant: str = "moc", *, k: int = 0, dtype=None, interpret: bool = True
) -> TopKConfig:
  """`select`'s config for rows of F channels when none is given.

  MOSAIC for 'moc' where the Mosaic GPU kernel is usable for rows of this dtype
  (`mgpu_select.usable`: compiled on Hopper, 16-bit, F <= 8192; F not a multiple of 128 is
  padded to one) and K % 8 == 0.
  On an H100 (16384 x 5632, K = 1024, exact; mgpu_select_probe_h100_20261205.json) it took
  232.7 us against 302.7 for the Mosaic bitmask + gathered compaction (`GAUSS_GATHER`) and
  413.9 for the Triton bitmask + compaction (167.8 us since 2026-12-05m; 174.7 on the H200).
  Padded at F = 1376 / 2736 / 5461: 131.1 / 198.2 / 334.3 us against 150.3 / 224.4 / 473.6
  for the Triton top-K (H100, topk_pad_h100_20261205m.json).
  Else GAUSS_GATHER for 'moc' up to GATHER_MAX_F channels, GAUSS above it and for 'moc_2of8'
  (its rows per program). On the H200 (16384 rows, Gaussian rows, topk_h200_20261203c.json)
  GAUSS_GATHER took 150.4 / 186.7 / 253.1 / 432.4 / 435.4 us at F = 1376 / 2048 / 2736 / 5461
  / 5632 where GAUSS took 149.7 / 192.5 / 311.8 / 479.7 / 486.2 (GAUSS itself beat the ternary
  search's 176 / 252 / 344 / 559 / 594, topk_h200_20261203.json). At F = 16384 (K = 4096) both
  GAUSS and GAUSS_GATHER are exact on the H200 (GPU tests of 2026-12-04, 2 min of compile
  each) but only GAUSS was ever timed there, so the cap stays until the gather is. Rows far
  from Gaussian cost up to ~2 passes more than a plain bisection (the guess is checked)."""
  from pallas_kernels import mgpu_select

  mosaic = variant == "moc" and dtype is not None and k % 8 == 0
  if mosaic and mgpu_select.usable(jnp.dtype(dtype), mgpu_select.row_width(f), interpret):
    return MOSAIC
  return GAUSS if variant == "moc_2of8" or f > GATHER_MAX_F else GAUSS_GATHER


def selected_slots(cum, gt, eq, valid, need):
  """Which keys are kept and their output slots, from the running packed count `cum`
  (keys above the threshold in the low 16 bits, keys equal to it in the high 16): all keys
  above, and the first `need` equal ones (lowest channels)."""
  cnt_eq = lax.shift_right_logical(cum, 16)
  sel = valid & (gt | (eq & (cnt_eq <= need)))
  return sel, (cum & 0xFFFF) + jnp.minimum(cnt_eq, need) - 1


def select_call(kernel, t: int, k: int, dtype, rows: int, cfg, interpret: bool, name: str):
  """pallas_call over row blocks producing (int32 indices, values), each (t, k)."""
  return pl.pallas_call(
    kernel,
    out_shape=(jax.ShapeDtypeStruct((t, k), jnp.int32), jax.ShapeDtypeStruct((t, k), dtype)),
    grid=(pl.cdiv(t, rows),),
    interpret=interpret,
    compiler_params=None if interpret else tu.compiler_params(cfg.num_warps),
    name=name,
  )


def select_rows(
  g_ref,
  *,
  t: int,
  f: int,
  k: int,
  cfg: TopKConfig,
  interpret: bool,
  on_chunk: Callable,
  num_valid: int | None = None,
  slots: bool = True,
  load: Callable | None = None,
  dtype=None,
) -> None:
  """In-kernel: select the top-k of this program's rows; call on_chunk per row chunk.

  load(g_ref, rows_b, cols_b, valid) -> values in `dtype` (default: g_ref's own, loaded as
  they are), e.g. summing split-K partials on the way in.

  on_chunk(rows_b, cols_b, valid, g, sel, pos, off): broadcast (R, W) row/column indices, the
  in-bounds mask, the values (re-loaded; lowest finite value past num_valid), the selection
  mask, each selected element's output slot in [0, k) and the chunk's first column (an int).
  With `slots=False` pos is None and the final pass is much cheaper (`_topk_ties.tie_masks`): for
  callers that keep only the mask.
  """
  dtype = g_ref.dtype if dtype is None else jnp.dtype(dtype)
  load = load or _load_as_is
  nbits = tu.key_bits(dtype)
  kmin, kmax = tu.key_range(dtype)
  mode = count_mode(cfg, dtype, interpret)
  use_float = mode != "int"
  fan = cfg.fan if nbits == 16 else 1
  nv = f if num_valid is None else min(num_valid, f)
  r = cfg.rows
  row_r1 = pl.program_id(0) * r + jnp.arange(r, dtype=jnp.int32)[:, None]
  row_ok = row_r1 < t
  if cfg.chunk:
    w = min(cfg.chunk, tu.next_pow2(f))
    chunks = [(off, w) for off in range(0, f, w)]
  else:
    chunks = tu.pow2_chunks(f, cfg.granule) if cfg.granule else [(0, tu.next_pow2(f))]
  pad = kmin - 1 if nbits == 16 else kmin  # below every real 16-bit key

  def load_chunk(off, w):
    rows_b = jnp.broadcast_to(row_r1, (r, w))
    cols_1 = tu.lane_iota(off, w, interpret, hide=cfg.strided)
    cols_b = jnp.broadcast_to(cols_1[None, :], (r, w))
    valid = row_ok & (cols_b < f)
    g = load(g_ref, rows_b, cols_b, valid)
    # Also when nv == f: without this select, the bitmask kernel's 'cut' pass took 21.9 ms
    # instead of 0.13 at 16384 x 2048 on the H200 (XLA's Triton; the SASS compiled here on CPU
    # is the same either way), stream_sweep_h200_20261203g.json.
    return rows_b, cols_b, valid, jnp.where(cols_b < nv, g, jnp.array(jnp.finfo(dtype).min, dtype))

  def keys_of(off, w, valid, g):
    key = tu.order_keys(g)
    if off + w > f:
      key = jnp.where(valid, key, pad)
    elif t % r:
      key = jnp.where(row_ok, key, pad)
    return key.astype(jnp.float32) if use_float else key

  ckeys, sums = [], {}  # sums: per chunk width, lane-wise sums of values and squares
  for off, w in chunks:
    _, cols_b, valid, g = load_chunk(off, w)
    ckeys.append(keys_of(off, w, valid, g))
    if cfg.gauss_margin:
      x = jnp.where(valid & (cols_b < nv), g.astype(jnp.float32), 0.0)
      s1, s2 = sums.get(w, (0.0, 0.0))
      sums[w] = (s1 + x, s2 + x * x)

  def counts_ge(thrs):
    """Per row, the number of keys >= thr for each thr ((R, 1) int32)."""
    if cfg.chunk:
      return packed_counts(ckeys, thrs, mode)
    totals = [jnp.zeros((r, 1), jnp.int32) for _ in thrs]
    for ckey in ckeys:
      for i, thr in enumerate(thrs):
        part = jnp.sum(ge_ones(ckey, thr, mode), axis=1, keepdims=True)
        totals[i] = totals[i] + part.astype(jnp.int32)
    return totals

  lo = jnp.full((r, 1), kmin, jnp.int32)
  hi = jnp.full((r, 1), kmax, jnp.int32)
  chi = jnp.zeros((r, 1), jnp.int32)  # count(key > hi)
  if cfg.gauss_margin:  # start from a checked guess instead of the whole key range
    s1 = sum(jnp.sum(a, axis=1, keepdims=True) for a, _ in sums.values())
    s2 = sum(jnp.sum(b, axis=1, keepdims=True) for _, b in sums.values())
    thrs = gauss_bracket(s1, s2, nv, k, cfg.gauss_margin, dtype)
    lo, hi, chi = bracket_state(thrs, counts_ge(thrs), k, dtype)

  def cond(state):
    lo, hi, _ = state
    return jnp.max((lo != hi).astype(jnp.int32)) > 0

  def body_bisect(state):
    return bisect_step(state, lambda mid: counts_ge((mid,))[0], k)

  def body_radix4(state):  # 16-bit keys only: no overflow in int32
    lo, hi, chi = state
    step = lax.shift_right_logical(hi - lo, 2) + 1
    m = [jnp.minimum(lo + j * step, hi + 1) for j in (1, 2, 3)]
    c = counts_ge(tuple(m))
    ok = [cj >= k for cj in c]
    new_lo = jnp.where(ok[2], m[2], jnp.where(ok[1], m[1], jnp.where(ok[0], m[0], lo)))
    new_hi = jnp.where(ok[2], hi, jnp.where(ok[1], m[2] - 1, jnp.where(ok[0], m[1] - 1, m[0] - 1)))
    new_chi = jnp.where(ok[2], chi, jnp.where(ok[1], c[2], jnp.where(ok[0], c[1], c[0])))
    return new_lo, new_hi, new_chi

  def body_ternary(state):  # 16-bit keys only; with `chunk`, one reduction per pass
    lo, hi, chi = state
    step = (hi - lo) // 3 + 1
    m1, m2 = jnp.minimum(lo + step, hi + 1), jnp.minimum(lo + 2 * step, hi + 1)
    c1, c2 = counts_ge((m1, m2))
    ok1, ok2 = c1 >= k, c2 >= k
    new_lo = jnp.where(ok2, m2, jnp.where(ok1, m1, lo))
    new_hi = jnp.where(ok2, hi, jnp.where(ok1, m2 - 1, m1 - 1))
    return new_lo, new_hi, jnp.where(ok2, chi, jnp.where(ok1, c2, c1))

  body = {1: body_bisect, 2: body_ternary, 3: body_radix4}[fan]
  v, _, n_gt = lax.while_loop(cond, body, (lo, hi, chi))
  need = k - n_gt  # how many keys equal to v to keep, lowest channels first
  v_c = v.astype(jnp.float32) if use_float else v

  if not slots:
    ties = tie_masks(ckeys, v_c, need)
    for ckey, eq_keep, (off, w) in zip(ckeys, ties, chunks, strict=True):
      rows_b, cols_b, valid, g = load_chunk(off, w)
      on_chunk(rows_b, cols_b, valid, g, valid & ((ckey > v_c) | eq_keep), None, off)
    return
  carry = jnp.zeros((r, 1), jnp.int32)
  for ckey, (off, w) in zip(ckeys, chunks, strict=True):
    rows_b, cols_b, valid, g = load_chunk(off, w)
    gt = ckey > v_c
    eq = ckey == v_c
    packed = gt.astype(jnp.int32) + jnp.left_shift(eq.astype(jnp.int32), 16)
    cum = jnp.cumsum(packed, axis=1) + carry
    carry = carry + jnp.sum(packed, axis=1, keepdims=True)
    sel, pos = selected_slots(cum, gt, eq, valid, need)
    on_chunk(rows_b, cols_b, valid, g, sel, pos, off)


def _load_as_is(g_ref, rows_b, cols_b, valid):
  return pltriton.load(g_ref.at[rows_b, cols_b], mask=valid, other=0)


def _topk_kernel(g_ref, idx_ref, val_ref, *, t, f, k, cfg, interpret, load=None, dtype=None):
  def store(rows_b, cols_b, valid, g, sel, pos, off):
    del valid, off
    tu.scatter_store(idx_ref, rows_b, pos, cols_b, sel, interpret)
    tu.scatter_store(val_ref, rows_b, pos, g, sel, interpret)

  select_rows(
    g_ref, t=t, f=f, k=k, cfg=cfg, interpret=interpret, on_chunk=store, load=load, dtype=dtype
  )


def group_rows(
  g_ref, *, t: int, f: int, rows: int, on_group: Callable, num_valid: int | None = None
) -> None:
  """In-kernel 2:8: per group of 8 channels, the two largest (ties to the lower lane).

  on_group(rows_b, cols_b, valid, g, lane, row_g, base_g, ok_g, a, b, val_a, val_b): the
  (R, BG, 8) indices, mask, values (lowest finite value past num_valid) and lane iota; then
  per group (R, BG, 1) its row, first channel, in-bounds mask, its two chosen lanes a < b
  and their values.
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
  if num_valid is not None and num_valid < f:
    g = jnp.where(cols_b < num_valid, g, jnp.array(jnp.finfo(g.dtype).min, g.dtype))
  key = tu.order_keys(g)
  kmin = tu.key_range(g.dtype)[0]
  m1 = jnp.max(key, axis=2, keepdims=True)
  i1 = jnp.min(jnp.where(key == m1, lane_b, GROUP), axis=2, keepdims=True)
  # Lane i1 drops out; among the rest the lowest lane holding the maximum wins.
  key2 = jnp.where(lane_b == i1, kmin, key)
  m2 = jnp.max(key2, axis=2, keepdims=True)
  i2 = jnp.min(jnp.where((key2 == m2) & (lane_b != i1), lane_b, GROUP), axis=2, keepdims=True)
  gshape = (rows, bg, 1)
  row_g = jnp.broadcast_to(row, gshape)
  base_g = jnp.broadcast_to(base, gshape)
  ok_g = (row_g < t) & (base_g < f)
  first = i1 < i2
  a, b = jnp.where(first, i1, i2), jnp.where(first, i2, i1)
  ka, kb = jnp.where(first, m1, m2), jnp.where(first, m2, m1)
  val_a, val_b = tu.key_to_value(ka, g.dtype), tu.key_to_value(kb, g.dtype)
  on_group(rows_b, cols_b, valid, g, lane_b, row_g, base_g, ok_g, a, b, val_a, val_b)


def _group_kernel(g_ref, idx_ref, val_ref, *, t, f, rows, interpret):
  def store(rows_b, cols_b, valid, g, lane, row_g, base_g, ok_g, a, b, val_a, val_b):
    del rows_b, cols_b, valid, g, lane
    for j, (lane_j, val) in enumerate(((a, val_a), (b, val_b))):
      slot = (base_g // GROUP) * PER_GROUP + j
      tu.scatter_store(idx_ref, row_g, slot, base_g + lane_j, ok_g, interpret)
      tu.scatter_store(val_ref, row_g, slot, val, ok_g, interpret)

  group_rows(g_ref, t=t, f=f, rows=rows, on_group=store)


def _flatten(g_TxF: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
  *lead, f = g_TxF.shape
  return g_TxF.reshape(-1, f), tuple(lead)


def group_program_rows(cfg: TopKConfig, f: int) -> int:
  return max(1, min(cfg.rows, 4096 // tu.next_pow2(f)))


def select(
  g_TxF: jax.Array,
  k: int,
  variant: str = "moc",
  *,
  config: TopKConfig | None = None,
  interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Same contract as `reference.select`: (idx_TxK int32 ascending, val_TxK in g's dtype).

  Not differentiable (a pallas_call); `moc_ffn` owns the gradient. The default config is
  picked here, outside the jit: a default read inside would be frozen into jit's cache by
  the first trace (a benchmark that swaps it would time the first program again).
  """
  f, dtype = g_TxF.shape[-1], g_TxF.dtype
  cfg = config or default_config(
    f, variant, k=k, dtype=dtype, interpret=tu.default_interpret(interpret)
  )
  return _select(g_TxF, k, variant, cfg=cfg, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("k", "variant", "cfg", "interpret"))
def _select(g_TxF, k, variant, *, cfg: TopKConfig, interpret: bool | None):
  interpret = tu.default_interpret(interpret)
  g2, lead = _flatten(g_TxF)
  t, f = g2.shape
  if variant == "moc_2of8":
    if f % GROUP:
      raise ValueError(f"moc_2of8 needs F divisible by {GROUP}, got F={f}")
    k = f // GROUP * PER_GROUP
    rows = group_program_rows(cfg, f)
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
  if variant == "moc" and cfg.selection == "mgpu" and not cfg.compact:  # all Mosaic GPU
    from pallas_kernels import mgpu_select

    idx, val = mgpu_select.select(g2, k, interpret=interpret, async_rows=cfg.async_rows)
    return idx.reshape(*lead, k), val.reshape(*lead, k)
  if cfg.compact:  # two kernels: bitmask, then compaction
    from pallas_kernels import topk_compact

    idx, val = topk_compact.select_flat(g2, k, variant, cfg=cfg, interpret=interpret)
    return idx.reshape(*lead, k), val.reshape(*lead, k)
  idx, val = select_call(kernel, t, k, g2.dtype, rows, cfg, interpret, f"moc_select_{variant}")(g2)
  return idx.reshape(*lead, k), val.reshape(*lead, k)
