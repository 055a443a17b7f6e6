"""MoC decode after the select, from per-token channel lists: one kernel for up and down.

Why: the mask pipeline's up and down kernels walk all F channels with masked loads, so each
tile carries ~K/F active rows and few bytes are in flight per SM. Here program (t, s) owns a
slice of token t's sorted list of K selected channels and, `rows` entries at a time, loads
whole rows of Wu^T and Wd (2·rows·D·2 bytes issued together, before any arithmetic), computes
z = a · (x Wu^T[idx]) rounded to x's dtype (as the reference does) and accumulates
y += z Wd[idx] in fp32. Each program writes its fp32 partial y, and a fixed-order sum of the
partials follows (deterministic): XLA's (one small fusion; the block's residual add is then a
launch of its own) or, with `DecodeConfig.list_sum='kernel'`, `sum_partials` (one Pallas
launch with the residual add in its epilogue). At T > 1 a channel picked by several tokens is
read once per token (the repeats mostly hit L2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _l2_prefetch
from pallas_kernels import _triton_utils as tu
from pallas_kernels._decode_config import DecodeConfig, cdiv, pow2_at_least

F32 = jnp.float32
I32 = jnp.int32


def _rows_kernel(
  x_ref,
  idx_ref,
  a_ref,
  wu_ref,
  wd_ref,
  y_ref,
  *,
  k,
  per,
  rows,
  d_model,
  block_d,
  gate_values,
  splits=None,
):
  """Program (t, s): entries [s·per, (s+1)·per) of token t's list. splits: the programs come
  as one axis of T·splits (beside L2-warming programs: `_l2_prefetch`)."""
  t, s = tu.program_ids((None, splits), flat=splits is not None)
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
    a = plgpu.load(a_ref.at[t, pl.ds(j0, rows)], mask=ok, other=0).astype(F32)
    if gate_values:
      a = tu.silu(a)

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


SUM_TILE = 4096  # partial sums one `sum_partials` program loads at once (splits × columns)


def _sum_kernel(p_ref, *refs, splits, d_model, block_d, residual):
  """y[t, cols] = round(Σ_s p[s, t, cols]) (+ the residual, added as XLA adds two arrays)."""
  r_ref, y_ref = refs if residual else (None, *refs)
  t, j = pl.program_id(0), pl.program_id(1)
  s = jnp.arange(pow2_at_least(splits), dtype=I32)
  cols = j * block_d + jnp.arange(block_d, dtype=I32)
  ok = cols < d_model
  shape = (s.size, block_d)
  s_b, c_b = jnp.broadcast_to(s[:, None], shape), jnp.broadcast_to(cols[None, :], shape)
  parts = plgpu.load(p_ref.at[s_b, t, c_b], mask=(s_b < splits) & (c_b < d_model), other=0)
  y = jnp.sum(parts, axis=0).astype(y_ref.dtype)
  if residual:
    r = plgpu.load(r_ref.at[t, pl.ds(j * block_d, block_d)], mask=ok, other=0)
    y = (y.astype(F32) + r.astype(F32)).astype(y_ref.dtype)
  plgpu.store(y_ref.at[t, pl.ds(j * block_d, block_d)], y, mask=ok)


def sum_partials(
  partials_SxTxD: jax.Array, dtype, residual_TxD: jax.Array | None, interpret: bool
) -> jax.Array:
  """round(Σ_s partials[s]) to dtype, plus residual_TxD if given (round, add in fp32, round:
  XLA's add of two arrays), in one launch: grid T × D / block_d, each program loading all
  splits of its columns at once."""
  splits, num_tokens, d_model = partials_SxTxD.shape
  block_d = min(pow2_at_least(d_model), max(16, SUM_TILE // pow2_at_least(splits)))
  kernel = functools.partial(
    _sum_kernel, splits=splits, d_model=d_model, block_d=block_d, residual=residual_TxD is not None
  )
  inputs = (partials_SxTxD,) + (() if residual_TxD is None else (residual_TxD,))
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((num_tokens, d_model), dtype),
    grid=(num_tokens, pl.cdiv(d_model, block_d)),
    compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
    interpret=interpret,
    name="decode_rows_sum",
  )(*inputs)


def rows_ffn(
  x_TxD: jax.Array,
  idx_TxK: jax.Array,
  a_TxK: jax.Array,
  w_up_FxD: jax.Array,
  w_down_FxD: jax.Array,
  cfg: DecodeConfig,
  *,
  interpret: bool,
  gate_values: bool = False,
  residual_TxD: jax.Array | None = None,
  warm: jax.Array | None = None,
) -> jax.Array:
  """y_TxD = sum_j (a_j · x Wu^T[idx_j]) Wd[idx_j] per token, in x's dtype; with residual_TxD,
  residual + y (rounded as XLA adds two arrays).

  gate_values: a_TxK holds the selected G (any float dtype) and the kernel takes silu(G).
  warm: a weight the next kernels read (the next layer's q, k, v), whose first
  `cfg.warm_bytes` `cfg.warm_programs` more programs of this launch read into L2 (for a
  select that warms nothing itself: `DecodeConfig.warm_from='rows'`). No effect on y."""
  num_tokens, d_model = x_TxD.shape
  k = idx_TxK.shape[1]
  rows = cfg.list_rows
  splits = max(1, min(cdiv(k, rows), cfg.list_programs // num_tokens))
  per = cdiv(cdiv(k, splits), rows) * rows  # list entries per program, whole steps
  splits = cdiv(k, per)
  block_d = min(cfg.list_block_d, pow2_at_least(d_model))
  warm = None if warm is None or not cfg.warm_bytes else warm
  kernel = functools.partial(
    _rows_kernel,
    k=k,
    per=per,
    rows=rows,
    d_model=d_model,
    block_d=block_d,
    gate_values=gate_values,
    splits=None if warm is None else splits,
  )
  out_shape = jax.ShapeDtypeStruct((splits, num_tokens, d_model), F32)
  params = plgpu.CompilerParams(num_warps=cfg.list_warps, num_stages=1)
  inputs = (x_TxD, idx_TxK, a_TxK, w_up_FxD, w_down_FxD)
  if warm is not None and not interpret:
    (partials,) = _l2_prefetch.call(
      kernel,
      inputs,
      out_shape=(out_shape,),
      grid=num_tokens * splits,
      warm=[(warm, cfg.warm_bytes)],
      programs=cfg.warm_programs,
      compiler_params=params,
      name="decode_rows_warm",
    )
  else:  # interpret mode runs the rows alone (on one axis if they would warm)
    partials = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(num_tokens, splits) if warm is None else (num_tokens * splits,),
      compiler_params=params,
      interpret=interpret,
      name="decode_rows",
    )(*inputs)
  if cfg.list_sum == "kernel":
    return sum_partials(partials, x_TxD.dtype, residual_TxD, interpret)
  y = jnp.sum(partials, axis=0).astype(x_TxD.dtype)
  return y if residual_TxD is None else (residual_TxD + y).astype(y.dtype)
