"""Top-K as two kernels (`TopKConfig(compact=True)`): bitmask, then compaction.

Why: the one-kernel top-K spends ~600 us at 16384 x 5632 outside its search and scan
(NOTES_kernels.md), and nothing so far says whether the search side (loads, keys,
counting, reductions) or the write side (prefix sum, per-element slot stores, the
re-read of G) is the cost. Splitting them times each alone:

1. `_mask_kernel`: the `select_rows` search (any `fan`, `chunk`) or the 2:8 group
   selection, then one (T, ceil(F/32)) int32 word per 32 channels: bit j of
   word w is channel 32w + j (ties already resolved to the lower channels). Writes
   16384 x 176 x 4 B = 11.5 MB instead of 101 MB of indices and values.
2. `_compact_kernel`: per row, popcount of each word, an exclusive prefix sum over the
   words (176 per row, not 5632 channels), and per set bit its slot = word base +
   popcount of the lower bits; masked stores of the channel and of G at that channel.
   A warp's 32 lanes hold one word's 32 channels, so its stores go to consecutive slots.

Cost floor of the pair: kernel 1 reads G (184.5 MB), kernel 2 reads G again where bits
are set (~all 32 B sectors at K/F = 18%) and writes 101 MB: ~110 us at 4.3 TB/s vs 66.

`ablate='mask_only'` (timing only) runs kernel 1 and writes the outputs' bytes from XLA
(a broadcast of one mask column, ~23 us of writes), so compact minus mask_only is kernel 2.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _triton_utils as tu
from pallas_kernels import topk

WORD = 32
WORD_GRANULE = 16  # words per compaction chunk at least (512 channels)


def _store_words(m_ref, rows_b, cols_b, sel, *, t: int, f: int, off: int | None = None) -> None:
  """Pack sel (..., W) into words along its last axis (32 consecutive channels each). off:
  the block's first channel, when its rows are this program's `pl.program_id(0) * R + i`:
  the words' rows and columns are then computed, not reduced from rows_b and cols_b."""
  w = sel.shape[-1]
  shape = (*sel.shape[:-1], w // WORD, WORD)
  bits = jnp.left_shift(sel.astype(jnp.int32), cols_b & (WORD - 1))
  words = jnp.sum(bits.reshape(shape), axis=-1)  # disjoint bits: the sum is the OR
  if off is None:
    widx = jnp.min(cols_b.reshape(shape), axis=-1) // WORD
    row = jnp.min(rows_b.reshape(shape), axis=-1)
  else:
    r = sel.shape[0]
    row = jnp.broadcast_to(
      pl.program_id(0) * r + jnp.arange(r, dtype=jnp.int32)[:, None], shape[:-1]
    )
    widx = jnp.broadcast_to(
      off // WORD + jnp.arange(w // WORD, dtype=jnp.int32)[None, :], shape[:-1]
    )
  ok = (row < t) & (widx * WORD < f)
  pltriton.store(m_ref.at[row, widx], words, mask=ok)


def _mask_kernel(g_ref, m_ref, *, t, f, k, variant, cfg, interpret, num_valid):
  if variant == "moc_2of8":

    def on_group(rows_b, cols_b, valid, g, lane, row_g, base_g, ok_g, a, b, val_a, val_b):
      del g, row_g, base_g, ok_g, val_a, val_b
      sel = valid & ((lane == a) | (lane == b))
      flat = lambda x: x.reshape(x.shape[0], x.shape[1] * x.shape[2])
      _store_words(m_ref, flat(rows_b), flat(cols_b), flat(sel), t=t, f=f)

    rows = topk.group_program_rows(cfg, f)
    topk.group_rows(g_ref, t=t, f=f, rows=rows, on_group=on_group, num_valid=num_valid)
    return

  def on_chunk(rows_b, cols_b, valid, g, sel, pos, off):
    del valid, g, pos
    _store_words(m_ref, rows_b, cols_b, sel, t=t, f=f, off=off)

  topk.select_rows(
    g_ref,
    t=t,
    f=f,
    k=k,
    cfg=cfg,
    interpret=interpret,
    on_chunk=on_chunk,
    num_valid=num_valid,
    slots=False,
  )


def _expand_words(m_ref, row_R1, widx_RxW, carry_R1, *, t: int, f: int):
  """Load the words at widx and expand them to channels: (rows_b, cols_b, ok, sel, slot) as
  (R, CW, 32) blocks, and the carry (set bits so far) after them."""
  rows, cw = widx_RxW.shape
  nw = -(-f // WORD)
  bit = jnp.arange(WORD, dtype=jnp.int32)[None, None, :]  # (1, 1, 32)
  lower = jnp.left_shift(1, bit) - 1  # bits below each lane (lane 31: 0x7fffffff)
  rows_w = jnp.broadcast_to(row_R1, (rows, cw))
  ok_w = (rows_w < t) & (widx_RxW < nw)
  words = pltriton.load(m_ref.at[rows_w, widx_RxW], mask=ok_w, other=0)  # (R, CW)
  cnt = lax.population_count(words)
  base = jnp.cumsum(cnt, axis=1) - cnt + carry_R1  # exclusive: slot of the word's first bit
  carry = carry_R1 + jnp.sum(cnt, axis=1, keepdims=True)
  word3, base3 = words.reshape(rows, cw, 1), base.reshape(rows, cw, 1)
  shape = (rows, cw, WORD)
  rows_b = jnp.broadcast_to(row_R1.reshape(rows, 1, 1), shape)
  cols_b = jnp.broadcast_to(widx_RxW.reshape(rows, cw, 1) * WORD + bit, shape)
  ok = (rows_b < t) & (cols_b < f)
  sel = ((lax.shift_right_logical(word3, bit) & 1) == 1) & ok
  slot = base3 + lax.population_count(word3 & lower)
  return (rows_b, cols_b, ok, sel, slot), carry


def word_blocks(
  m_ref, *, t: int, f: int, rows: int, granule: int = WORD_GRANULE, max_words: int = 0
):
  """In-kernel: this program's rows of the bitmask as (R, CW, 32) channel blocks, CW a power
  of two <= max_words (0: no cap; small blocks keep fewer values per thread live).

  Yields (rows_b, cols_b, ok, sel, slot) per chunk of CW words: broadcast row and channel
  indices, the in-bounds mask, the selected bits and each selected channel's output slot
  (the popcount of every set bit before it in the row).
  """
  nw = -(-f // WORD)
  row = pl.program_id(0) * rows + jnp.arange(rows, dtype=jnp.int32)[:, None]  # (R, 1)
  carry = jnp.zeros((rows, 1), jnp.int32)
  pieces = tu.pow2_chunks(nw, min(granule, tu.next_pow2(nw)))
  if max_words:
    pieces = [(o + i, min(w, max_words)) for o, w in pieces for i in range(0, w, max_words)]
  for off, cw in pieces:
    widx = jnp.broadcast_to(off + jnp.arange(cw, dtype=jnp.int32)[None, :], (rows, cw))
    block, carry = _expand_words(m_ref, row, widx, carry, t=t, f=f)
    yield block


def num_word_blocks(f: int, words: int) -> int:
  """Blocks of `words` words per row of F channels (`row_block`'s second grid axis)."""
  num_words = -(-f // WORD)
  return -(-num_words // words)


def row_block(m_ref, *, t: int, f: int, words: int):
  """In-kernel, grid (T, num_word_blocks): program (i, j)'s block, row i's words
  [j * words, (j + 1) * words), as `word_blocks` yields it. Its slots count the set bits of
  the row's earlier words too, which each program re-reads (F/8 bytes, from L2): one small
  block per program keeps many programs, and their loads, in flight."""
  nw = -(-f // WORD)
  row = jnp.full((1, 1), pl.program_id(0), jnp.int32)
  start = pl.program_id(1) * words
  widx_all = jnp.arange(tu.next_pow2(nw), dtype=jnp.int32)[None, :]
  earlier = pltriton.load(
    m_ref.at[jnp.broadcast_to(row, widx_all.shape), widx_all], mask=widx_all < start, other=0
  )
  carry = jnp.sum(lax.population_count(earlier), axis=1, keepdims=True)
  widx = start + jnp.arange(words, dtype=jnp.int32)[None, :]
  block, _ = _expand_words(m_ref, row, widx, carry, t=t, f=f)
  return block


def _compact_kernel(m_ref, g_ref, idx_ref, val_ref, *, t, f, rows, interpret):
  for rows_b, cols_b, _, sel, slot in word_blocks(m_ref, t=t, f=f, rows=rows):
    g = pltriton.load(g_ref.at[rows_b, cols_b], mask=sel, other=0)
    tu.scatter_store(idx_ref, rows_b, slot, cols_b, sel, interpret)
    tu.scatter_store(val_ref, rows_b, slot, g, sel, interpret)


def mask_call(
  g2: jax.Array,
  k: int,
  variant: str,
  cfg,
  interpret: bool,
  num_valid: int | None = None,
  width: int | None = None,
) -> jax.Array:
  """Kernel 1: (T, ceil(F/32)) int32 selection words; channels >= num_valid never set.
  `width`: G is the first `width` columns of g2 (the [G | U] buffer of one fused GEMM).
  cfg.selection 'mgpu' (or 'auto' where it can run): the Mosaic GPU radix select writes them
  (compiled rows of at most 2048 channels, with cfg.warp_rows: its warp-per-row form)."""
  from pallas_kernels import mgpu_select, mgpu_select_warp

  t, f = g2.shape[0], width or g2.shape[1]
  if cfg.selection == "mgpu" and variant != "moc":
    raise ValueError(f"selection={cfg.selection!r} selects 'moc' only, got {variant!r}")
  if variant == "moc" and mgpu_select.chosen(cfg.selection, g2.dtype, f, interpret):
    if cfg.warp_rows and f <= mgpu_select_warp.MAX_F and not tu.default_interpret(interpret):
      return mgpu_select_warp.words(g2, k, num_valid=num_valid, width=width)
    kw = dict(num_valid=num_valid, width=width, interpret=interpret, async_rows=cfg.async_rows)
    return mgpu_select.words(g2, k, **kw)
  rows = topk.group_program_rows(cfg, f) if variant == "moc_2of8" else cfg.rows
  kernel = functools.partial(
    _mask_kernel,
    t=t,
    f=f,
    k=k,
    variant=variant,
    cfg=cfg,
    interpret=interpret,
    num_valid=num_valid,
  )
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((t, -(-f // WORD)), jnp.int32),
    grid=(pl.cdiv(t, rows),),
    interpret=interpret,
    compiler_params=None if interpret else tu.compiler_params(cfg.num_warps),
    name=f"moc_mask_{variant}",
  )(g2)


def select_flat(g2: jax.Array, k: int, variant: str, *, cfg, interpret: bool):
  """(T, F) -> (idx (T, K) int32 ascending, val (T, K)); k already checked by topk.select."""
  t, f = g2.shape
  inner = dataclasses.replace(cfg, compact=False, ablate="")
  if f < WORD:  # chunks narrower than a word: the one-kernel path
    return topk.select(g2, k, variant, config=inner, interpret=interpret)
  mask = mask_call(g2, k, variant, inner, interpret)
  if cfg.ablate == "mask_only":  # timing: kernel 1 + an XLA write of the output bytes
    idx = jnp.broadcast_to(mask[:, :1], (t, k))
    return idx, idx.astype(g2.dtype)
  if cfg.apply_mode == "gather":  # slots filled in order by a search, not scattered
    from pallas_kernels._apply_gather import compact_call

    return compact_call(mask, g2, k, cfg=cfg, interpret=interpret)
  rows = cfg.rows
  kernel = functools.partial(_compact_kernel, t=t, f=f, rows=rows, interpret=interpret)
  return topk.select_call(kernel, t, k, g2.dtype, rows, cfg, interpret, f"moc_compact_{variant}")(
    mask, g2
  )
