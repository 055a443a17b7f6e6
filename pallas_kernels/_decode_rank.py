"""MoC decode after the gate GEMV in one launch: every program ranks its own channels exactly
against the whole row of G, then reads only the rows of Wu^T and Wd it selected.

Why: an exact top-K needs the whole row, which a single program then has to search (the
radix select took ~15 µs of the 34 µs MoC decode at d = 2048, one SM working, NOTES_decode.md),
and the list it writes has to wait for the next launch. Here nothing is searched: the rank of
channel c is how many channels beat it,

  rank(c) = #{j : key_j > key_c} + #{j < c : key_j == key_c},

(key: G rounded to x's dtype, order-preserving integer image, as in `reference.select`), and c
is selected iff rank(c) < K. The ranks are a permutation of 0…F-1, so exactly K channels are
selected, ties to the lower index. Each program reads the row of G (fp32 partials from the
gate GEMV, ~22-90 KB, L2-resident) and counts, for `rank_channels` channels at once, a
(channels × block_j) tile of comparisons per step with no reduction inside the loop. With 16-bit
keys the index goes into the low bits (key·2^16 + 65535 - j): one compare per pair. For
`moc_2of8` a channel is ranked among the 8 of its group only.

Then, as in `_decode_list`, z = a · (x Wu^T[c]) rounded to x's dtype and y += z Wd[c] in fp32
for the selected c (masked loads of unselected rows move no bytes); each program writes its
fp32 partial y and XLA sums the partials (deterministic, no atomics).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import reference
from pallas_kernels._decode_config import DecodeConfig, cdiv, pow2_at_least
from pallas_kernels._decode_select import sortable_key

F32 = jnp.float32
I32 = jnp.int32


def _silu(v: jax.Array) -> jax.Array:
  return v / (1.0 + jnp.exp(-v))


def _load_g(g_ref, t, idx, ok, splits, round_dtype):
  """G of token t at channels idx (an index array, or pl.ds for a contiguous run): the
  partials summed in order, rounded to x's dtype as the reference rounds G."""
  g = plgpu.load(g_ref.at[jnp.int32(0), t, idx], mask=ok, other=0)
  for s in range(1, splits):
    g = g + plgpu.load(g_ref.at[jnp.int32(s), t, idx], mask=ok, other=0)
  return g.astype(round_dtype)


def _rank_keys(key, chan, packed):
  """Comparable keys: (key, -index) packed into one int32 for 16-bit keys, else key alone."""
  return key * 65536 + (65535 - chan) if packed else key


def _beats(other_key, other_chan, key, chan, packed):
  """Whether `other` ranks above the channel: larger key, or equal key and lower index."""
  if packed:
    return other_key > key
  return (other_key > key) | ((other_key == key) & (other_chan < chan))


def _rank_moc(g_ref, t, own, own_key, *, d_ff, splits, round_dtype, block_j, packed):
  """rank of each own channel among all d_ff channels of token t."""
  c = own.shape[0]
  mine = _rank_keys(own_key, own, packed)

  def body(i, acc):
    j0 = i * block_j
    j = j0 + jnp.arange(block_j, dtype=I32)
    ok = j < d_ff
    key = sortable_key(_load_g(g_ref, t, pl.ds(j0, block_j), ok, splits, round_dtype))
    key = jnp.where(ok, _rank_keys(key, j, packed), jnp.iinfo(I32).min)
    shape = (c, block_j)
    beat = _beats(
      jnp.broadcast_to(key[None, :], shape),
      jnp.broadcast_to(j[None, :], shape),
      jnp.broadcast_to(mine[:, None], shape),
      jnp.broadcast_to(own[:, None], shape),
      packed,
    )
    return acc + beat.astype(I32)

  acc = lax.fori_loop(0, cdiv(d_ff, block_j), body, jnp.zeros((c, block_j), I32))
  return jnp.sum(acc, axis=1)


def _rank_group(g_ref, t, own, own_key, own_ok, *, splits, round_dtype):
  """rank of each own channel among the 8 channels of its group (moc_2of8)."""
  base = own - own % reference.GROUP
  rank = jnp.zeros(own.shape, I32)
  for m in range(reference.GROUP):
    mate = base + m
    key = sortable_key(_load_g(g_ref, t, mate, own_ok, splits, round_dtype))
    rank += _beats(key, mate, own_key, own, packed=False).astype(I32)
  return rank


def _rank_kernel(
  g_ref,
  x_ref,
  wu_ref,
  wd_ref,
  y_ref,
  *,
  k,
  variant,
  d_ff,
  d_model,
  chunks,
  cfg,
  splits,
  round_dtype,
  packed,
):
  t, p = pl.program_id(0), pl.program_id(1)
  c, block_d = cfg.rank_channels, min(cfg.rank_block_d, pow2_at_least(d_model))
  blocks = [(b, min(block_d, pow2_at_least(d_model - b))) for b in range(0, d_model, block_d)]
  cols = [b + jnp.arange(w, dtype=I32) for b, w in blocks]
  xs = [
    plgpu.load(x_ref.at[t, pl.ds(jnp.int32(b), w)], mask=col < d_model, other=0).astype(F32)
    for (b, w), col in zip(blocks, cols, strict=True)
  ]

  def chunk(i, ys):
    c0 = (p * chunks + i) * c
    own = c0 + jnp.arange(c, dtype=I32)
    own_ok = own < d_ff
    g = _load_g(g_ref, t, pl.ds(c0, c), own_ok, splits, round_dtype)
    key = sortable_key(g)
    if variant == "moc":
      rank = _rank_moc(
        g_ref,
        t,
        own,
        key,
        d_ff=d_ff,
        splits=splits,
        round_dtype=round_dtype,
        block_j=cfg.rank_block_j,
        packed=packed,
      )
      keep = rank < k
    else:
      keep = _rank_group(g_ref, t, own, key, own_ok, splits=splits, round_dtype=round_dtype)
      keep = keep < reference.PER_GROUP
    sel = keep & own_ok
    a = jnp.where(sel, _silu(g.astype(F32)), 0.0)

    def rows(w_ref):  # the selected rows of w, every column block
      out = []
      for (b, w), col in zip(blocks, cols, strict=True):
        m = sel[:, None] & (col[None, :] < d_model)
        out.append(plgpu.load(w_ref.at[pl.ds(c0, c), pl.ds(jnp.int32(b), w)], mask=m, other=0))
      return out

    u = jnp.zeros((c,), F32)
    for w, xb in zip(rows(wu_ref), xs, strict=True):
      u = u + jnp.sum(w.astype(F32) * xb[None, :], axis=1)
    z = (a * u).astype(x_ref.dtype).astype(F32)
    return tuple(
      y + jnp.sum(z[:, None] * w.astype(F32), axis=0) for y, w in zip(ys, rows(wd_ref), strict=True)
    )

  ys = lax.fori_loop(0, chunks, chunk, tuple(jnp.zeros((w,), F32) for _, w in blocks))
  for (b, w), col, y in zip(blocks, cols, ys, strict=True):
    plgpu.store(y_ref.at[p, t, pl.ds(jnp.int32(b), w)], y, mask=col < d_model)


def rank_ffn(
  x_TxD: jax.Array,
  g_partials_SxTxW: jax.Array,
  w_up_FxD: jax.Array,
  w_down_FxD: jax.Array,
  k: int,
  variant: str,
  cfg: DecodeConfig,
  *,
  interpret: bool,
) -> jax.Array:
  """y_TxD from the gate GEMV's fp32 partials (S, T, W ≥ F), selecting like `reference.select`."""
  num_tokens, d_model = x_TxD.shape
  splits = g_partials_SxTxW.shape[0]
  d_ff = w_up_FxD.shape[0]
  if variant not in ("moc", "moc_2of8"):
    raise ValueError(f"unknown MoC variant {variant!r}; expected 'moc' or 'moc_2of8'")
  c = cfg.rank_channels
  if variant == "moc_2of8" and c % reference.GROUP:
    raise ValueError(f"rank_channels must be a multiple of {reference.GROUP} for moc_2of8")
  total = cdiv(d_ff, c)
  programs = max(1, min(total, cfg.rank_programs // num_tokens))
  chunks = cdiv(total, programs)
  programs = cdiv(total, chunks)
  key_bits = jnp.dtype(x_TxD.dtype).itemsize * 8
  kernel = functools.partial(
    _rank_kernel,
    k=k,
    variant=variant,
    d_ff=d_ff,
    d_model=d_model,
    chunks=chunks,
    cfg=cfg,
    splits=splits,
    round_dtype=x_TxD.dtype,
    packed=key_bits == 16 and d_ff < 65536,
  )
  partial_y = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((programs, num_tokens, d_model), F32),
    grid=(num_tokens, programs),
    compiler_params=plgpu.CompilerParams(num_warps=cfg.rank_warps, num_stages=1),
    interpret=interpret,
    name="decode_rank_rows",
  )(g_partials_SxTxW, x_TxD, w_up_FxD, w_down_FxD)
  return jnp.sum(partial_y, axis=0).astype(x_TxD.dtype)
