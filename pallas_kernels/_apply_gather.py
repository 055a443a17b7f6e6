"""The forward streaming pass with its compact residuals gathered, not scattered.

Why: at the 1B layer shape the row walk (`moc_train_mask._apply_kernel`) takes ~315 µs, of
which ~158 is the dense part (Z; XLA's silu(G)·U pass takes ~150) and the rest goes to the
slot scan and the three scatters of G_sel, U_sel, Z_sel, each a masked 16-bit store from every
lane with ~1 in 5 active (stream_sweep_h200_20261203{m,n}.json). Here each program (one row)
first writes Z densely and each word's inclusive count of set bits, then fills its K slots in
order: slot j's channel is found by a binary search over those counts (the word) and over the
word's bits (the bit), and G, U are loaded there (the row was just read: L1/L2) and stored
contiguously. Same outputs as the scatter walk, bit for bit. `compact_call` does the same for
the two-kernel top-K's (indices, values).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _triton_utils as tu
from pallas_kernels import moc_train_mask as mm
from pallas_kernels import topk_compact

WORD = topk_compact.WORD


def _word_counts(m_ref, incl_ref, *, f: int) -> None:
  """incl[row, w] = set bits in words 0..w of this program's row (one scan per row)."""
  nw = -(-f // WORD)
  widx = jnp.arange(tu.next_pow2(nw), dtype=jnp.int32)[None, :]
  row = jnp.full(widx.shape, pl.program_id(0), jnp.int32)
  words = pltriton.load(m_ref.at[row, widx], mask=widx < nw, other=0)
  incl = jnp.cumsum(lax.population_count(words), axis=1)
  pltriton.store(incl_ref.at[row, widx], incl, mask=widx < nw)


def _slot_channels(m_ref, incl_ref, row_b, slot_b, *, f: int):
  """The channel of each slot: the smallest word whose inclusive count exceeds the slot,
  then the bit of that word whose inclusive bit count exceeds the slot's rank in the word."""
  nw = -(-f // WORD)
  lo, hi = jnp.zeros_like(slot_b), jnp.full_like(slot_b, nw - 1)
  for _ in range(max(nw - 1, 1).bit_length()):
    mid = lax.shift_right_logical(lo + hi, 1)
    left = pltriton.load(incl_ref.at[row_b, mid]) > slot_b
    lo, hi = jnp.where(left, lo, mid + 1), jnp.where(left, mid, hi)
  word = pltriton.load(m_ref.at[row_b, lo])
  rank = slot_b - (pltriton.load(incl_ref.at[row_b, lo]) - lax.population_count(word))
  b_lo, b_hi = jnp.zeros_like(slot_b), jnp.full_like(slot_b, WORD - 1)
  for _ in range(5):  # bits 0..31
    mid = lax.shift_right_logical(b_lo + b_hi, 1)
    upto = jnp.left_shift(2, mid) - 1  # bits 0..mid (mid = 31: 0 - 1, all bits)
    left = lax.population_count(word & upto) > rank
    b_lo, b_hi = jnp.where(left, b_lo, mid + 1), jnp.where(left, mid, b_hi)
  return lo * WORD + b_lo


def _gather_kernel(
  m_ref, g_ref, *refs, t, f, k, num_valid, words, slots, has_idx, has_zsel, fused, interpret
):
  u_ref, outs, u_off = (g_ref, refs, f) if fused else (refs[0], refs[1:], 0)
  idx_ref = outs[0] if has_idx else None
  gs_ref, us_ref, z_ref, *rest = outs[1:] if has_idx else outs
  zs_ref, incl_ref = (rest[0], rest[1]) if has_zsel else (None, rest[0])
  _word_counts(m_ref, incl_ref, f=f)
  blocks = topk_compact.word_blocks(m_ref, t=t, f=f, rows=1, max_words=words)
  for rows_b, cols_b, ok, sel, _ in blocks:  # Z densely; the unused slots are dead code
    g, u = mm.load_gu(g_ref, u_ref, u_off, rows_b, cols_b, ok, num_valid)
    mm.store_z(z_ref, rows_b, cols_b, ok, sel, g, u)
  for row_b, slot_b, ok, col in _slots(m_ref, incl_ref, f=f, k=k, step=slots, interpret=interpret):
    g, u = mm.load_gu(g_ref, u_ref, u_off, row_b, col, None, num_valid)
    if has_idx:
      pltriton.store(idx_ref.at[row_b, slot_b], col.astype(idx_ref.dtype), mask=ok)
    pltriton.store(gs_ref.at[row_b, slot_b], g, mask=ok)
    pltriton.store(us_ref.at[row_b, slot_b], u, mask=ok)
    if has_zsel:
      pltriton.store(zs_ref.at[row_b, slot_b], mm.silu_mul(g, u, zs_ref.dtype), mask=ok)


def _slots(m_ref, incl_ref, *, f: int, k: int, step: int, interpret: bool):
  """(row, slot, ok, channel) blocks of `step` slots covering this program's K, once the
  row's inclusive word counts are stored in incl_ref. Masked-off slots read channel 0."""
  if not interpret:  # the counts were stored by other threads of this program
    pltriton.debug_barrier()
  for s0 in range(0, k, step):
    slot_b = s0 + jnp.arange(min(step, tu.next_pow2(k - s0)), dtype=jnp.int32)[None, :]
    row_b = jnp.full(slot_b.shape, pl.program_id(0), jnp.int32)
    ok = slot_b < k
    yield row_b, slot_b, ok, _slot_channels(m_ref, incl_ref, row_b, jnp.where(ok, slot_b, 0), f=f)


def _gathered_compact_kernel(m_ref, g_ref, idx_ref, val_ref, incl_ref, *, f, k, slots, interpret):
  _word_counts(m_ref, incl_ref, f=f)
  for row_b, slot_b, ok, col in _slots(m_ref, incl_ref, f=f, k=k, step=slots, interpret=interpret):
    pltriton.store(idx_ref.at[row_b, slot_b], col, mask=ok)
    pltriton.store(val_ref.at[row_b, slot_b], pltriton.load(g_ref.at[row_b, col]), mask=ok)


def compact_call(mask, g2, k: int, *, cfg, interpret: bool) -> tuple[jax.Array, jax.Array]:
  """`topk.select`'s (idx, val) from the selection words, each slot gathered in order: the
  two-kernel top-K's second kernel with `apply_mode='gather'`."""
  t = g2.shape[0]
  kernel = functools.partial(
    _gathered_compact_kernel, f=g2.shape[1], k=k, slots=cfg.gather_slots, interpret=interpret
  )
  *outs, _ = pl.pallas_call(
    kernel,
    out_shape=(
      jax.ShapeDtypeStruct((t, k), jnp.int32),
      jax.ShapeDtypeStruct((t, k), g2.dtype),
      jax.ShapeDtypeStruct(mask.shape, jnp.int32),  # each word's inclusive count
    ),
    grid=(t,),
    interpret=interpret,
    compiler_params=None if interpret else tu.compiler_params(cfg.apply_warps),
    name="moc_compact_gather",
  )(mask, g2)
  return tuple(outs)


def gather_call(
  mask, g2, u2, out_shape: list, *, has_idx: bool, z_sel: bool, num_valid, cfg, interpret: bool
):
  """`moc_train_mask.apply_call`'s outputs (`out_shape`: [idx,] g_sel, u_sel, z[, z_sel]) with
  the slots gathered. Every row must have exactly K set bits (the selection's contract)."""
  fused = u2 is None
  t, f = g2.shape[0], g2.shape[1] // 2 if fused else g2.shape[1]
  k = out_shape[0].shape[1]
  kernel = functools.partial(
    _gather_kernel,
    t=t,
    f=f,
    k=k,
    num_valid=num_valid,
    words=cfg.apply_words,
    slots=cfg.gather_slots,
    has_idx=has_idx,
    has_zsel=z_sel,
    fused=fused,
    interpret=interpret,
  )
  scratch = jax.ShapeDtypeStruct(mask.shape, jnp.int32)  # each word's inclusive count
  *outs, _ = pl.pallas_call(
    kernel,
    out_shape=(*out_shape, scratch),
    grid=(t,),
    interpret=interpret,
    compiler_params=None if interpret else tu.compiler_params(cfg.apply_warps),
    name="moc_train_fwd_gather",
  )(mask, g2, *(() if fused else (u2,)))
  return tuple(outs)
