"""MoC decode after the select, from per-token channel lists: one kernel for up and down.

Why: the mask pipeline's up and down kernels walk all F channels with masked loads, so each
tile carries ~K/F active rows and few bytes are in flight per SM. Here program (t, s) owns a
slice of token t's sorted list of K selected channels and, `rows` entries at a time, loads
whole rows of Wu^T and Wd (2·rows·D·2 bytes issued together, before any arithmetic), computes
z = a · (x Wu^T[idx]) rounded to x's dtype (as the reference does) and accumulates
y += z Wd[idx] in fp32. Each program writes its fp32 partial y; XLA sums the partials (one small
fusion), so the result is deterministic. At T > 1 a channel picked by several tokens is read
once per token (the repeats mostly hit L2).

`list_reduce="last"` sums in the kernel instead, still deterministically: after storing its
partial, a program bumps its group's integer counter (order-free); the program that sees the
count complete sums the group's partials in index order (level 1), bumps the token's counter,
and the last group sums the group partials in index order (level 2) and writes y in x's dtype.
Which program finishes last changes who adds, never the order of the additions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._decode_config import DecodeConfig, cdiv, pow2_at_least

F32 = jnp.float32
I32 = jnp.int32


COUNTERS = 32  # int32 counters per token for list_reduce="last" (groups + 1 at most)


def _rows_kernel(x_ref, idx_ref, a_ref, wu_ref, wd_ref, *refs, k, per, rows, d_model, block_d, red):
  y_ref = refs[1] if red else refs[0]  # refs: ([counters in,] partials[, y, groups, counters])
  t, s = pl.program_id(0), pl.program_id(1)
  blocks = [(b, min(block_d, pow2_at_least(d_model - b))) for b in range(0, d_model, block_d)]
  cols = [b + jnp.arange(w, dtype=I32) for b, w in blocks]
  xs = [
    plgpu.load(x_ref.at[t, pl.ds(jnp.int32(b), w)], mask=c < d_model, other=0).astype(F32)
    for (b, w), c in zip(blocks, cols, strict=True)
  ]

  def body(i, ys):
    j0 = s * per + i * rows
    ok = j0 + jnp.arange(rows, dtype=I32) < k
    idx = plgpu.load(idx_ref.at[t, pl.ds(j0, rows)], mask=ok, other=0)
    a = plgpu.load(a_ref.at[t, pl.ds(j0, rows)], mask=ok, other=0)

    def gather(w_ref):  # rows idx of w, every column block; all loads issued up front
      out = []
      for (_, w), c in zip(blocks, cols, strict=True):
        r_b = jnp.broadcast_to(idx[:, None], (rows, w))
        c_b = jnp.broadcast_to(c[None, :], (rows, w))
        m = jnp.broadcast_to(ok[:, None], (rows, w)) & (c_b < d_model)
        out.append(plgpu.load(w_ref.at[r_b, c_b], mask=m, other=0))
      return out

    wu, wd = gather(wu_ref), gather(wd_ref)
    u = jnp.zeros((rows,), F32)
    for w, xb in zip(wu, xs, strict=True):
      u = u + jnp.sum(w.astype(F32) * xb[None, :], axis=1)
    z = (a * u).astype(x_ref.dtype).astype(F32)
    return tuple(
      y + jnp.sum(z[:, None] * w.astype(F32), axis=0) for y, w in zip(ys, wd, strict=True)
    )

  ys = tuple(jnp.zeros((w,), F32) for _, w in blocks)
  ys = lax.fori_loop(0, per // rows, body, ys)
  for (b, w), c, y in zip(blocks, cols, ys, strict=True):
    plgpu.store(y_ref.at[s, t, pl.ds(jnp.int32(b), w)], y, mask=c < d_model)
  if red is not None:
    _reduce_last(t, s, blocks, cols, *refs, d_model=d_model, **red)


def _reduce_last(
  t, s, blocks, cols, cnt_in, p_ref, o_ref, g_ref, cnt_ref, *, d_model, splits, group, interpret
):
  """Two-level deterministic sum of the (splits, T, D) partials by the last programs."""
  del cnt_in  # aliased to cnt_ref
  groups = cdiv(splits, group)
  grp = s // group
  size = jnp.minimum(group, splits - grp * group)
  # Plain loads: the acq_rel, gpu-scope counter atomic orders them after the other SMs' stores
  # (jax's Triton lowering rejects the ".cg" modifier: its table is keyed "cg").

  def bump(slot):  # all of this program's stores precede the count (CTA barrier, acq_rel atomic)
    if not interpret:
      plgpu.debug_barrier()
    return plgpu.atomic_add(
      cnt_ref, (t, jnp.int32(slot) if isinstance(slot, int) else slot), jnp.int32(1)
    )

  def summed(src_ref, first, count, bound):  # partials first..first+count-1, in order
    def add(j, accs):
      return tuple(
        acc
        + plgpu.load(
          src_ref.at[first + j, t, pl.ds(jnp.int32(b), w)],
          mask=(c < d_model) & (j < count),
          other=0,
        )
        for acc, (b, w), c in zip(accs, blocks, cols, strict=True)
      )

    return lax.fori_loop(0, bound, add, tuple(jnp.zeros((w,), F32) for _, w in blocks))

  def store(dst_ref, lead, vals):
    for (b, w), c, v in zip(blocks, cols, vals, strict=True):
      idx = (*lead, t, pl.ds(jnp.int32(b), w))
      plgpu.store(dst_ref.at[idx], v.astype(dst_ref.dtype), mask=c < d_model)

  @pl.when(bump(grp) == size - 1)
  def _():
    part = summed(p_ref, grp * group, size, group)
    if groups == 1:
      store(o_ref, (), part)
      return
    store(g_ref, (grp,), part)

    @pl.when(bump(groups) == groups - 1)
    def _():
      store(o_ref, (), summed(g_ref, 0, groups, groups))


def rows_ffn(
  x_TxD: jax.Array,
  idx_TxK: jax.Array,
  a_TxK: jax.Array,
  w_up_FxD: jax.Array,
  w_down_FxD: jax.Array,
  cfg: DecodeConfig,
  *,
  interpret: bool,
  counters: jax.Array | None = None,
) -> jax.Array:
  """y_TxD = sum_j (a_j · x Wu^T[idx_j]) Wd[idx_j] per token, in x's dtype.

  counters: zero int32 (T, COUNTERS) for list_reduce="last" (made here when None).
  """
  num_tokens, d_model = x_TxD.shape
  k = idx_TxK.shape[1]
  rows = cfg.list_rows
  splits = max(1, min(cdiv(k, rows), cfg.list_programs // num_tokens))
  per = cdiv(cdiv(k, splits), rows) * rows  # list entries per program, whole steps
  splits = cdiv(k, per)
  block_d = min(cfg.list_block_d, pow2_at_least(d_model))
  if cfg.list_reduce not in ("xla", "last"):
    raise ValueError(f"unknown list_reduce {cfg.list_reduce!r}; expected 'xla' or 'last'")
  last = cfg.list_reduce == "last"
  group = max(1, min(cfg.list_group, splits))
  if last and cdiv(splits, group) + 1 > COUNTERS:
    group = cdiv(splits, COUNTERS - 1)
  red = dict(splits=splits, group=group, interpret=interpret) if last else None
  kernel = functools.partial(
    _rows_kernel, k=k, per=per, rows=rows, d_model=d_model, block_d=block_d, red=red
  )
  out_shape = [jax.ShapeDtypeStruct((splits, num_tokens, d_model), F32)]
  args = [x_TxD, idx_TxK, a_TxK, w_up_FxD, w_down_FxD]
  aliases = {}
  if last:
    if counters is None:
      counters = jnp.zeros((num_tokens, COUNTERS), I32)
    args.append(counters)
    aliases = {len(args) - 1: 3}
    out_shape += [
      jax.ShapeDtypeStruct((num_tokens, d_model), x_TxD.dtype),
      jax.ShapeDtypeStruct((cdiv(splits, group), num_tokens, d_model), F32),
      jax.ShapeDtypeStruct(counters.shape, I32),
    ]
  out = pl.pallas_call(
    kernel,
    out_shape=tuple(out_shape),
    grid=(num_tokens, splits),
    compiler_params=plgpu.CompilerParams(num_warps=cfg.list_warps, num_stages=1),
    input_output_aliases=aliases,
    interpret=interpret,
    name="decode_rows",
  )(*args)
  return out[1] if last else jnp.sum(out[0], axis=0).astype(x_TxD.dtype)
