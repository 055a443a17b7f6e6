"""The mask pipeline's gathered up and down kernels, and the down projection shared by MoC and
dense decode (`moc_decode` runs them).

Why a mask, not lists: from the select's a = silu(G) on the selected channels (0 elsewhere),
each kernel walks all F channels in blocks and loads only the rows some token selected
(masked loads issue no memory traffic). At T = 16 the tokens' selections cover most channels,
and walking F beat per-token lists (56.2 against 81.5 µs at d = 2048 on the H200,
`_decode_config.default_config`).
  - `up`: per block of channels, z = a * (x Wu^T) over the selected rows of channel-major Wu^T
    (F × D), in x's dtype.
  - `down_projection`: y = z Wd, either the rows kernel (grid over channel splits × column
    blocks, skipping rows of Wd whose z is zero for every token; fp32 partial y per split,
    summed by XLA, none for one split) or the split-K GEMV over every row (`dense_down='gemv'`,
    the dense FFN's choice) with the down_* knobs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _decode_gemv
from pallas_kernels._decode_config import DecodeConfig
from pallas_kernels._decode_config import cdiv as _cdiv
from pallas_kernels._decode_config import pow2_at_least as _pow2_at_least
from pallas_kernels._decode_gemv import load_x, padded_rows, precision_for, tf_mask, tf_ref

F32 = jnp.float32


# --- up: the selected rows of Wu^T -------------------------------------------------------------


def _up_kernel(
  x_ref, a_ref, w_ref, z_ref, *, num_tokens, rows, d_model, d_ff, block_c, block_d, precision
):
  c0 = pl.program_id(0) * block_c
  c_mask = c0 + jnp.arange(block_c) < d_ff
  a = plgpu.load(tf_ref(a_ref, rows, c0, block_c), mask=tf_mask(rows, num_tokens, c_mask), other=0)
  nonzero = (a != 0).astype(jnp.int32)
  active = (nonzero if rows == 1 else jnp.max(nonzero, axis=0)) > 0  # some token selected c

  def body(i, acc):
    d0 = i * block_d
    d_mask = d0 + jnp.arange(block_d) < d_model
    w = plgpu.load(
      w_ref.at[pl.ds(c0, block_c), pl.ds(d0, block_d)],
      mask=active[:, None] & d_mask[None, :],
      other=0,
    )
    xk = load_x(x_ref, d0, block_d, num_tokens, rows, d_model)
    if rows == 1:
      return acc + jnp.sum(w.astype(F32) * xk[None, :], axis=1)
    return acc + lax.dot_general(
      xk, w, (((1,), (1,)), ((), ())), preferred_element_type=F32, precision=precision
    )

  shape = (block_c,) if rows == 1 else (rows, block_c)
  u = lax.fori_loop(0, pl.cdiv(d_model, block_d), body, jnp.zeros(shape, F32))
  plgpu.store(
    tf_ref(z_ref, rows, c0, block_c),
    (a * u).astype(z_ref.dtype),
    mask=tf_mask(rows, num_tokens, c_mask),
  )


def up(x_TxD, a_TxFo, w_up_FxD, cfg: DecodeConfig, *, interpret: bool) -> jax.Array:
  num_tokens, d_model = x_TxD.shape
  d_ff = w_up_FxD.shape[0]
  block_c = min(cfg.up_block_c, _pow2_at_least(d_ff))
  block_d = min(cfg.up_block_d, _pow2_at_least(d_model))
  kernel = functools.partial(
    _up_kernel,
    num_tokens=num_tokens,
    rows=padded_rows(num_tokens, cfg),
    d_model=d_model,
    d_ff=d_ff,
    block_c=block_c,
    block_d=block_d,
    precision=precision_for(x_TxD.dtype),
  )
  return pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((num_tokens, d_ff), x_TxD.dtype),
    grid=(pl.cdiv(d_ff, block_c),),
    compiler_params=plgpu.CompilerParams(num_warps=cfg.up_warps, num_stages=cfg.up_stages),
    interpret=interpret,
    name="decode_up",
  )(x_TxD, a_TxFo, w_up_FxD)


# --- down: the rows of Wd with a nonzero z, a deterministic split over channels ---------------


def _down_kernel(
  z_ref, w_ref, y_ref, *, num_tokens, rows, d_model, d_ff, chunk, block_c, block_d, final, precision
):
  ci, dj = pl.program_id(0), pl.program_id(1)
  cols = dj * block_d + jnp.arange(block_d)
  col_mask = cols < d_model
  c_end = jnp.minimum((ci + 1) * chunk, d_ff)

  def body(i, acc):
    c0 = ci * chunk + i * block_c
    c_mask = c0 + jnp.arange(block_c) < c_end
    z = plgpu.load(
      tf_ref(z_ref, rows, c0, block_c), mask=tf_mask(rows, num_tokens, c_mask), other=0
    )
    nonzero = (z != 0).astype(jnp.int32)
    active = (nonzero if rows == 1 else jnp.max(nonzero, axis=0)) > 0  # zero rows add nothing
    w = plgpu.load(
      w_ref.at[pl.ds(c0, block_c), pl.ds(dj * block_d, block_d)],
      mask=active[:, None] & col_mask[None, :],
      other=0,
    )
    if rows == 1:
      return acc + jnp.sum(z.astype(F32)[:, None] * w.astype(F32), axis=0)
    return acc + jnp.dot(z, w, preferred_element_type=F32, precision=precision)

  shape = (block_d,) if rows == 1 else (rows, block_d)
  y = lax.fori_loop(0, chunk // block_c, body, jnp.zeros(shape, F32))
  out = tf_ref(y_ref, rows, dj * block_d, block_d, () if final else (ci,))
  plgpu.store(out, y.astype(y_ref.dtype), mask=tf_mask(rows, num_tokens, col_mask))


def _down(z_TxF, w_down_FxD, cfg: DecodeConfig, *, interpret: bool) -> jax.Array:
  num_tokens, d_ff = z_TxF.shape
  d_model = w_down_FxD.shape[1]
  block_c = min(cfg.down_block_c, _pow2_at_least(d_ff))
  block_d = min(cfg.down_block_d, _pow2_at_least(d_model))
  splits = cfg.down_splits
  chunk = _cdiv(_cdiv(d_ff, splits), block_c) * block_c  # channels per split, whole blocks
  splits = _cdiv(d_ff, chunk)
  final = splits == 1
  if final:
    out_shape = jax.ShapeDtypeStruct((num_tokens, d_model), z_TxF.dtype)
  else:
    out_shape = jax.ShapeDtypeStruct((splits, num_tokens, d_model), F32)
  kernel = functools.partial(
    _down_kernel,
    num_tokens=num_tokens,
    rows=padded_rows(num_tokens, cfg),
    d_model=d_model,
    d_ff=d_ff,
    chunk=chunk,
    block_c=block_c,
    block_d=block_d,
    final=final,
    precision=precision_for(z_TxF.dtype),
  )
  y = pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=(splits, pl.cdiv(d_model, block_d)),
    compiler_params=plgpu.CompilerParams(num_warps=cfg.down_warps, num_stages=cfg.down_stages),
    interpret=interpret,
    name="decode_down",
  )(z_TxF, w_down_FxD)
  return y if final else jnp.sum(y, axis=0).astype(z_TxF.dtype)


def down_gemv_config(cfg: DecodeConfig) -> DecodeConfig:
  """The down_* knobs as the split-K GEMV's: channels are its D rows, y's columns its F."""
  return dataclasses.replace(
    cfg,
    gemv_block_f=cfg.down_block_d,
    gemv_block_d=cfg.down_block_c,
    gemv_splits=cfg.down_splits,
    gemv_warps=cfg.down_warps,
    gemv_stages=cfg.down_stages,
  )


def down_projection(z_TxF, w_down_FxD, cfg: DecodeConfig, interpret: bool) -> jax.Array:
  """y = z Wd: every row of Wd through the split-K GEMV ('gemv'), or the rows kernel, which
  skips rows whose z is zero for every token ('rows')."""
  if cfg.dense_down == "gemv":
    down = down_gemv_config(cfg)
    return _decode_gemv.split_k_linear(z_TxF, w_down_FxD, down, z_TxF.dtype, interpret)
  return _down(z_TxF, w_down_FxD, cfg, interpret=interpret)
