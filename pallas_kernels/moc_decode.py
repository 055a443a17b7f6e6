"""MoC and dense FFN decode for a few tokens (T = 1…16): read only the weight bytes that matter.

MoC pipeline, one launch each (see NOTES_decode.md for the measured figures):
  1. `_gemv_kernel`: G = x Wg over all of Wg (D × F), grid over F blocks × D splits so that every
     SM streams; fp32 partial sums per D split go to HBM (deterministic split-K, no atomics).
  2. `_decode_select.select_scale`: one program per token sums the partials, rounds G to x's dtype
     (as the reference does), selects exactly (radix bisection + prefix count for ties; or top-2 of
     every 8) and writes a = silu(G) on the selected channels, 0 elsewhere.
  3. `_up_kernel`: per block of channels, loads only the rows of channel-major Wu^T (F × D) that
     some token selected (masked loads issue no memory traffic), z = a * (x Wu^T) in x's dtype.
  4. `_down_kernel`: grid over channel splits × column blocks; loads only the rows of Wd (F × D)
     with a nonzero z; fp32 partial y per channel split, summed by XLA (skipped for one split).
     `dense_down="gemv"`: the dense FFN's split-K GEMV over all of Wd instead (not faster at
     T = 16, where some token selects ~96% of the channels).
With `pipeline="list"` (the default at T <= 4) the selection is the training top-K kernel
(`DecodeConfig.topk`), which sums the gate GEMV's split partials as it loads G
(`_decode_select.topk_from_partials`), and one kernel (`_decode_list.rows_ffn`) does 3 and 4
over the selected rows. The top-K's launch also reads the start of a weight the caller names
(the next layer's q, k, v) into L2 on programs of its own (`_l2_prefetch`, `warm_bytes`).
Dense (`dense_config`): `_gemv_kernel` over Wg and Wu together (SwiGLU epilogue with one split,
else partials summed by XLA), then the split-K GEMV over Wd with the `down_*` blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import (
  _decode_gemv,
  _decode_list,
  _decode_rowdot,
  _decode_select,
  reference,
  topk,
)
from pallas_kernels import _triton_utils as tu
from pallas_kernels._decode_config import DecodeConfig, dense_config, moc_config
from pallas_kernels._decode_config import cdiv as _cdiv
from pallas_kernels._decode_config import pow2_at_least as _pow2_at_least
from pallas_kernels._decode_gemv import gemv as _gemv
from pallas_kernels._decode_gemv import load_x, padded_rows, precision_for, tf_mask, tf_ref

F32 = jnp.float32
MAX_KERNEL_TOKENS = _decode_gemv.MAX_TOKENS  # more tokens (prefill) take dense GEMMs with a mask


# --- 3. gathered up-projection rows ------------------------------------------------------------


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


def _up(x_TxD, a_TxFo, w_up_FxD, cfg: DecodeConfig, *, interpret: bool) -> jax.Array:
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


# --- 4. down-projection rows with a deterministic split over channels ------------------------


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


# --- public ops --------------------------------------------------------------------------------


def _flatten(x: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
  return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def decode_ffn(
  x_TxD: jax.Array,
  w_gate_DxF: jax.Array,
  w_up_FxD: jax.Array,
  w_down_FxD: jax.Array,
  k: int,
  variant: str,
  *,
  config: DecodeConfig | None = None,
  interpret: bool | None = None,
  warm: jax.Array | None = None,
  output_major: bool = False,
  norm: tuple[jax.Array, float] | None = None,
) -> jax.Array:
  """MoC FFN: same contract as `reference.decode_ffn` (leading dims of x are flattened).

  warm: a weight the next kernels will read (the next layer's q, k, v); the list pipeline's
  top-K launch reads up to `DecodeConfig.warm_bytes` of it into L2. No effect on y.
  output_major: the gate weight comes as Wgᵀ (F × D) and its GEMV is `_decode_rowdot`'s;
  norm = (scale, eps) (output_major only): the FFN of RMSNorm(x), the norm inside that GEMV."""
  if norm is not None and not output_major:
    raise ValueError("decode_ffn: a norm prologue needs output_major weights")
  x_TxD, lead = _flatten(x_TxD)
  num_tokens, d_model = x_TxD.shape
  d_ff = w_gate_DxF.shape[0 if output_major else 1]
  if variant == "moc_2of8" and d_ff % reference.GROUP:
    raise ValueError(f"moc_2of8 needs F divisible by {reference.GROUP}, got F={d_ff}")
  if variant == "moc" and not 0 < k <= d_ff:
    raise ValueError(f"k must be in [1, {d_ff}], got {k}")
  if num_tokens > MAX_KERNEL_TOKENS:  # prefill: dense GEMMs beat row gathers
    w_gate_DxF = w_gate_DxF.T if output_major else w_gate_DxF
    x_TxD = x_TxD if norm is None else reference.rms_norm(x_TxD, *norm)
    return _prefill_ffn(x_TxD, w_gate_DxF, w_up_FxD, w_down_FxD, k, variant).reshape(*lead, -1)
  cfg = config or moc_config(num_tokens, d_model, d_ff)
  interpret = tu.default_interpret(interpret)
  warm = warm if cfg.warm_bytes else None
  ws = (w_gate_DxF, w_up_FxD, w_down_FxD)
  scale, eps = (None, None) if norm is None else (norm[0], float(norm[1]))
  y = _moc_kernels(x_TxD, *ws, k, variant, cfg, interpret, warm, output_major, scale, eps)
  return y.reshape(*lead, d_model)


def _topk_of_g(g_TxF, k, variant, cfg, interpret, warm=None):
  """(idx_TxK, G_TxK) by the Triton top-K on G already in x's dtype (the rowdot gate's)."""
  if warm is not None and variant == "moc":
    return _decode_select.topk_rows(g_TxF, k, cfg.topk, interpret, (warm, cfg))
  return topk.select(g_TxF, k, variant, config=cfg.topk, interpret=interpret)


def _topk_select(x_TxD, w_gate_DxF, k, variant, cfg, interpret, warm=None):
  """(idx_TxK, G_TxK) by the training top-K on G = x Wg rounded to x's dtype: the kernel sums
  the gate GEMV's split partials as it loads them ('moc', `fold_gate_sum`), else XLA first.
  warm: a weight whose start the top-K's launch reads into L2 ('moc' only; the Mosaic GPU
  select, which `cfg.topk.selection` picks (`_mosaic_select`), asks L2 for it by bulk
  prefetches instead of loading it on programs of its own)."""
  if _mosaic_select(x_TxD.dtype, w_gate_DxF.shape[1], k, variant, cfg.topk, interpret):
    from pallas_kernels import mgpu_select  # Mosaic GPU, imported where it is used

    partials = _gemv(x_TxD, (w_gate_DxF,), cfg, swiglu=False, interpret=interpret)[:, 0]
    d_ff = w_gate_DxF.shape[1]
    kw = dict(interpret=interpret, warm=warm, warm_bytes=cfg.warm_bytes)
    return mgpu_select.select_partials(partials, k, d_ff, x_TxD.dtype, **kw)
  warm = None if warm is None or variant != "moc" else (warm, cfg)
  if cfg.gemv_splits > 1 and cfg.fold_gate_sum and variant == "moc":
    partials = _gemv(x_TxD, (w_gate_DxF,), cfg, swiglu=False, interpret=interpret)[:, 0]
    d_ff = w_gate_DxF.shape[1]
    return _decode_select.topk_from_partials(
      partials, k, d_ff, x_TxD.dtype, cfg.topk, interpret, warm
    )
  g_TxF = _decode_gemv.split_k_linear(x_TxD, w_gate_DxF, cfg, x_TxD.dtype, interpret)
  if warm is not None:
    return _decode_select.topk_rows(g_TxF, k, cfg.topk, interpret, warm)
  return topk.select(g_TxF, k, variant, config=cfg.topk, interpret=interpret)


def _mosaic_select(dtype, d_ff: int, k: int, variant: str, topk_cfg, interpret: bool) -> bool:
  """Whether the list pipeline selects with the Mosaic GPU radix select, its one-CTA-per-token
  top-K summing the gate partials as it loads them (`mgpu_select.select_partials`):
  selection 'mgpu', or 'auto' where it can run (`mgpu_select.usable`, K % 8 == 0). Opt-in
  (`LIST_TOPK` keeps 'triton') until an H200 run times it against the Triton select."""
  from pallas_kernels import mgpu_select

  fits = k % 8 == 0 or topk_cfg.selection == "mgpu"  # 'mgpu' raises on what it cannot take
  width = mgpu_select.row_width(d_ff)
  return (
    variant == "moc"
    and fits
    and mgpu_select.chosen(topk_cfg.selection, jnp.dtype(dtype), width, interpret)
  )


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 9, 11))
def _moc_kernels(
  x_TxD,
  w_gate_DxF,
  w_up_FxD,
  w_down_FxD,
  k,
  variant,
  cfg,
  interpret,
  warm=None,
  output_major=False,
  norm_scale=None,
  norm_eps=None,
):
  """Jitted so that every layer's call reuses one trace of the kernels. warm: only the list
  pipeline's training top-K uses it (`_topk_select`). output_major: the gate weight is F × D,
  its GEMV the rowdot one, which also RMS-normalizes x first with a norm (norm_eps not None)
  and hands the normalized x to the kernels after it."""
  d_ff = w_up_FxD.shape[0]
  if output_major:  # G whole: in x's dtype for the top-K, fp32 as the select's one partial
    g_dtype = x_TxD.dtype if cfg.topk is not None else F32
    norm = None if norm_eps is None else (norm_scale, norm_eps)
    out = _decode_rowdot.rowdot(
      x_TxD,
      w_gate_DxF,
      out_dtype=g_dtype,
      interpret=interpret,
      norm=norm,
      return_normed=norm is not None,
    )
    g_TxF, x_TxD = out if norm is not None else (out, x_TxD)
  if cfg.topk is not None:  # G in x's dtype from the gate GEMV, then the training top-K
    if output_major:
      idx_TxK, g_TxK = _topk_of_g(g_TxF, k, variant, cfg, interpret, warm)
    else:
      idx_TxK, g_TxK = _topk_select(x_TxD, w_gate_DxF, k, variant, cfg, interpret, warm)
    return _decode_list.rows_ffn(
      x_TxD, idx_TxK, g_TxK, w_up_FxD, w_down_FxD, cfg, interpret=interpret, gate_values=True
    )
  if output_major:
    partials = jnp.pad(g_TxF, ((0, 0), (0, _pow2_at_least(d_ff) - d_ff)))[None, None]
  else:
    partials = _gemv(x_TxD, (w_gate_DxF,), cfg, swiglu=False, interpret=interpret)
  select = functools.partial(
    _decode_select.select_scale,
    partials,
    k,
    variant,
    d_ff=d_ff,
    round_dtype=x_TxD.dtype,
    warps=cfg.select_warps,
    radix_bits=cfg.select_radix_bits,
    interpret=interpret,
    granule=cfg.select_granule,
    chunk=cfg.select_chunk,
  )
  if cfg.pipeline == "list":
    idx_TxK, a_TxK = select(lists=True)
    return _decode_list.rows_ffn(
      x_TxD, idx_TxK, a_TxK, w_up_FxD, w_down_FxD, cfg, interpret=interpret
    )
  a_TxFo = select()
  z_TxF = _up(x_TxD, a_TxFo, w_up_FxD, cfg, interpret=interpret)
  return _down_projection(z_TxF, w_down_FxD, cfg, interpret)


def _prefill_ffn(x_TxD, w_gate_DxF, w_up_FxD, w_down_FxD, k, variant) -> jax.Array:
  """The reference's semantics through dense GEMMs and a mask, for many tokens."""
  g_TxF = jnp.dot(x_TxD, w_gate_DxF, preferred_element_type=F32).astype(x_TxD.dtype)
  idx_TxK, g_sel = reference.select(g_TxF, k, variant)
  a_TxF = reference.scatter_rows(jax.nn.silu(g_sel.astype(F32)), idx_TxK, g_TxF.shape[-1])
  u_TxF = lax.dot_general(x_TxD, w_up_FxD, (((1,), (1,)), ((), ())), preferred_element_type=F32)
  z_TxF = (a_TxF * u_TxF).astype(x_TxD.dtype)
  return jnp.dot(z_TxF, w_down_FxD, preferred_element_type=F32).astype(x_TxD.dtype)


def dense_decode_ffn(
  x_TxD: jax.Array,
  w_gate_DxF: jax.Array,
  w_up_DxF: jax.Array,
  w_down_FxD: jax.Array,
  *,
  config: DecodeConfig | None = None,
  interpret: bool | None = None,
  output_major: bool = False,
  norm: tuple[jax.Array, float] | None = None,
  residual: jax.Array | None = None,
) -> jax.Array:
  """Dense SwiGLU for a few tokens, as GEMV kernels (XLA's batch-1 dots stream at ~1 TB/s).

  Semantics of `reference.dense_decode_ffn`: fp32 G and U, z = silu(G) U rounded to x's dtype.
  output_major: the weights come as Wgᵀ, Wuᵀ (F × D) and Wdᵀ (D × F), and two rowdot launches
  (the SwiGLU in the first one's epilogue) do the whole FFN, no partials to sum; there, norm =
  (scale, eps) RMS-normalizes x inside the first and residual (shaped as x) is added to y
  inside the second: residual + FFN(RMSNorm(x)), no launch of their own.
  """
  if (norm is not None or residual is not None) and not output_major:
    raise ValueError("dense_decode_ffn: norm and residual need output_major weights")
  x_TxD, lead = _flatten(x_TxD)
  num_tokens, d_model = x_TxD.shape
  if num_tokens > MAX_KERNEL_TOKENS:
    ws = (w_gate_DxF, w_up_DxF, w_down_FxD)
    ws = tuple(w.T for w in ws) if output_major else ws
    xn_TxD = x_TxD if norm is None else reference.rms_norm(x_TxD, *norm)
    y = reference.dense_decode_ffn(xn_TxD, *ws)
    y = y if residual is None else (residual.reshape(y.shape) + y).astype(y.dtype)
    return y.reshape(*lead, -1)
  if output_major:
    interpret = tu.default_interpret(interpret)
    z_TxF = _decode_rowdot.swiglu(x_TxD, w_gate_DxF, w_up_DxF, interpret=interpret, norm=norm)
    y = _decode_rowdot.rowdot(z_TxF, w_down_FxD, interpret=interpret, residual=residual)
    return y.reshape(*lead, -1)
  cfg = config or dense_config(num_tokens, d_model, w_gate_DxF.shape[1])
  y = _dense_kernels(x_TxD, w_gate_DxF, w_up_DxF, w_down_FxD, cfg, tu.default_interpret(interpret))
  return y.reshape(*lead, d_model)


def _down_gemv(cfg: DecodeConfig) -> DecodeConfig:
  """The down_* knobs as the split-K GEMV's: channels are its D rows, y's columns its F."""
  return dataclasses.replace(
    cfg,
    gemv_block_f=cfg.down_block_d,
    gemv_block_d=cfg.down_block_c,
    gemv_splits=cfg.down_splits,
    gemv_warps=cfg.down_warps,
    gemv_stages=cfg.down_stages,
  )


@functools.partial(jax.jit, static_argnums=(4, 5))
def _dense_kernels(x_TxD, w_gate_DxF, w_up_DxF, w_down_FxD, cfg, interpret):
  ws = (w_gate_DxF, w_up_DxF)
  if cfg.gemv_splits == 1:
    z_TxF = _gemv(x_TxD, ws, cfg, swiglu=True, interpret=interpret)
  else:
    p = _gemv(x_TxD, ws, cfg, swiglu=False, interpret=interpret)
    g, u = jnp.sum(p, axis=0)[:, :, : w_gate_DxF.shape[1]]
    z_TxF = (jax.nn.silu(g) * u).astype(x_TxD.dtype)
  return _down_projection(z_TxF, w_down_FxD, cfg, interpret)


def _down_projection(z_TxF, w_down_FxD, cfg: DecodeConfig, interpret: bool) -> jax.Array:
  """y = z Wd: every row of Wd through the split-K GEMV ('gemv'), or the rows kernel, which
  skips rows whose z is zero for every token ('rows')."""
  if cfg.dense_down == "gemv":
    return _decode_gemv.split_k_linear(z_TxF, w_down_FxD, _down_gemv(cfg), z_TxF.dtype, interpret)
  return _down(z_TxF, w_down_FxD, cfg, interpret=interpret)
