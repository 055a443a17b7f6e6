"""MoC and dense FFN decode for a few tokens (T = 1…16): read only the weight bytes that matter.

MoC, one launch per step (see NOTES_decode.md for the measured figures):
  1. The gate GEMV over all of Wg: split-K (`_decode_gemv`, D × F, fp32 partials per D split,
     deterministic, no atomics) or, with output-major weights, `_decode_rowdot` (F × D, G whole,
     the block's RMSNorm in its prologue).
  2. The exact selection. `pipeline="list"` (the default at T <= 4): the training top-K kernel
     (`DecodeConfig.topk`) on G rounded to x's dtype, summing split partials as it loads them
     (`_decode_select.topk_from_partials`); its launch also reads the start of a weight the
     caller names (the next layer's q, k, v) into L2 (`_l2_prefetch`, `warm_bytes`). Else
     `_decode_select.select_scale`: one program per token, a = silu(G) on the selected
     channels, 0 elsewhere.
  3. list: one kernel over the selected rows of Wu^T and Wd (`_decode_list.rows_ffn`), its
     partial y summed (with the block's residual, if given) by XLA or a kernel (`list_sum`);
     mask: the up and down kernels over all channels with masked loads (`_decode_mask`).
Dense (`dense_config`): the split-K GEMV over Wg and Wu together (SwiGLU epilogue with one
split, else partials summed by XLA), then the split-K GEMV over Wd with the `down_*` blocks; or,
output-major, two rowdot launches with the norm and the residual add inside.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import (
  _decode_gemv,
  _decode_list,
  _decode_mask,
  _decode_rowdot,
  _decode_select,
  reference,
  topk,
)
from pallas_kernels import _triton_utils as tu
from pallas_kernels._decode_config import DecodeConfig, dense_config, moc_config
from pallas_kernels._decode_config import pow2_at_least as _pow2_at_least
from pallas_kernels._decode_gemv import gemv as _gemv

F32 = jnp.float32
MAX_KERNEL_TOKENS = _decode_gemv.MAX_TOKENS  # more tokens (prefill) take dense GEMMs with a mask


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
  residual: jax.Array | None = None,
  streaming: bool = False,
) -> jax.Array:
  """MoC FFN: same contract as `reference.decode_ffn` (leading dims of x are flattened).

  warm: a weight the next kernels will read (the next layer's q, k, v); the list pipeline's
  top-K launch reads up to `DecodeConfig.warm_bytes` of it into L2. No effect on y.
  output_major: the gate weight comes as Wgᵀ (F × D) and its GEMV is `_decode_rowdot`'s;
  norm = (scale, eps) (output_major only): the FFN of RMSNorm(x), the norm inside that GEMV;
  residual (shaped as x): residual + FFN, added as XLA adds two arrays (inside the sum of the
  list pipeline's partials with `DecodeConfig.list_sum='kernel'`). streaming (output_major):
  the gate GEMV on `_decode_rowdot.rowdot_config(streaming=True)`'s tile where it applies."""
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
    xn_TxD = x_TxD if norm is None else reference.rms_norm(x_TxD, *norm)
    y = _prefill_ffn(xn_TxD, w_gate_DxF, w_up_FxD, w_down_FxD, k, variant)
    y = y if residual is None else (residual.reshape(y.shape) + y).astype(y.dtype)
    return y.reshape(*lead, -1)
  cfg = config or moc_config(num_tokens, d_model, d_ff)
  interpret = tu.default_interpret(interpret)
  warm = warm if cfg.warm_bytes else None
  ws = (w_gate_DxF, w_up_FxD, w_down_FxD)
  scale, eps = (None, None) if norm is None else (norm[0], float(norm[1]))
  res = None if residual is None else residual.reshape(num_tokens, d_model)
  # the gate GEMV's tile, picked here: read inside the jit below, a swapped `rowdot_config`
  # would be frozen by jit's cache at its first trace
  size, gate = w_gate_DxF.dtype.itemsize, None
  if output_major:
    gate = _decode_rowdot.rowdot_config(
      num_tokens, d_model, d_ff, itemsize=size, streaming=streaming
    )
  args = (k, variant, cfg, interpret, warm, output_major, scale, eps, res, gate)
  y = _moc_kernels(x_TxD, *ws, *args)
  return y.reshape(*lead, d_model)


def _topk_of_g(g_TxF, k, variant, cfg, interpret, warm=None):
  """(idx_TxK, G_TxK) by the Triton top-K on G already in x's dtype (the rowdot gate's)."""
  if warm is not None and variant == "moc":
    return _decode_select.topk_rows(g_TxF, k, cfg.topk, interpret, (warm, cfg))
  return topk.select(g_TxF, k, variant, config=cfg.topk, interpret=interpret)


def _topk_select(x_TxD, w_gate_DxF, k, variant, cfg, interpret, warm=None):
  """(idx_TxK, G_TxK) by the training top-K on G = x Wg rounded to x's dtype: the kernel sums
  the gate GEMV's split partials as it loads them ('moc', `fold_gate_sum`), else XLA first.
  warm: a weight whose start the top-K's launch reads into L2 ('moc' only; with the Mosaic
  GPU select, which `cfg.topk.selection` picks (`_mosaic_select`), by bulk prefetches)."""
  if _mosaic_select(x_TxD.dtype, w_gate_DxF.shape[1], k, variant, cfg.topk, interpret):
    partials = _gemv(x_TxD, (w_gate_DxF,), cfg, swiglu=False, interpret=interpret)[:, 0]
    return _mosaic_topk(partials, k, w_gate_DxF.shape[1], x_TxD.dtype, interpret, warm, cfg)
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


def _mosaic_topk(partials_SxTxW, k, d_ff, dtype, interpret, warm=None, cfg=None):
  """(idx_TxK, G_TxK) by the Mosaic GPU select over fp32 partials of G (`select_partials`);
  warm: a weight whose first `cfg.warm_bytes` its launch's `cfg.warm_programs` more CTAs
  ask L2 for."""
  from pallas_kernels import mgpu_select  # Mosaic GPU, imported where it is used

  kw = {} if warm is None else dict(warm=(warm, cfg.warm_bytes), warm_ctas=cfg.warm_programs)
  return mgpu_select.select_partials(partials_SxTxW, k, d_ff, dtype, interpret=interpret, **kw)


def _mosaic_width(d_ff: int) -> int:
  """The columns the Mosaic select reads for F channels (whole warpgroups)."""
  from pallas_kernels import mgpu_select

  return mgpu_select.row_width(d_ff)


def _mosaic_select(dtype, d_ff: int, k: int, variant: str, topk_cfg, interpret: bool) -> bool:
  """Whether the list pipeline selects with the Mosaic GPU radix select, its one-CTA-per-token
  top-K summing the gate partials as it loads them (`mgpu_select.select_partials`):
  selection 'mgpu', or 'auto' where it can run (`mgpu_select.usable`, K % 8 == 0). Opt-in
  (`LIST_TOPK` keeps 'triton': it decoded faster end to end, `moc_config`)."""
  from pallas_kernels import mgpu_select

  fits = k % 8 == 0 or topk_cfg.selection == "mgpu"  # 'mgpu' raises on what it cannot take
  width = mgpu_select.row_width(d_ff)
  return (
    variant == "moc"
    and fits
    and mgpu_select.chosen(topk_cfg.selection, jnp.dtype(dtype), width, interpret)
  )


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7, 9, 11, 13))
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
  residual_TxD=None,
  gate_config=None,
):
  """Jitted so that every layer's call reuses one trace of the kernels. warm: the list
  pipeline's top-K launch (`warm_from='select'`; with the Mosaic GPU select, `_mosaic_select`,
  by bulk prefetches from CTAs of its own) or its rows kernel's (`'rows'`) reads it into L2.
  With the Mosaic select output-major G comes in fp32 as its one
  partial, zero-padded to whole warpgroups. output_major: the gate weight is F × D,
  its GEMV the rowdot one, which also RMS-normalizes x first with a norm (norm_eps not None)
  and hands the normalized x to the kernels after it, on gate_config's tile. residual_TxD:
  added to y (by the list pipeline's partial sum, else after the down projection)."""
  d_ff = w_up_FxD.shape[0]
  mosaic = cfg.topk is not None and _mosaic_select(
    x_TxD.dtype, d_ff, k, variant, cfg.topk, interpret
  )
  rows_warm, warm = (warm, None) if cfg.warm_from == "rows" else (None, warm)
  if output_major:  # G whole: in x's dtype for the top-K, fp32 as the select's one partial
    g_dtype = x_TxD.dtype if cfg.topk is not None and not mosaic else F32
    norm = None if norm_eps is None else (norm_scale, norm_eps)
    out = _decode_rowdot.rowdot(
      x_TxD,
      w_gate_DxF,
      config=gate_config,
      out_dtype=g_dtype,
      interpret=interpret,
      norm=norm,
      return_normed=norm is not None,
      out_cols=_mosaic_width(d_ff) if mosaic else None,
    )
    g_TxF, x_TxD = out if norm is not None else (out, x_TxD)
  if cfg.topk is not None:  # G in x's dtype from the gate GEMV, then the training top-K
    if output_major and mosaic:  # G as the Mosaic select's one fp32 partial, 0 past F
      idx_TxK, g_TxK = _mosaic_topk(g_TxF[None], k, d_ff, x_TxD.dtype, interpret, warm, cfg)
    elif output_major:
      idx_TxK, g_TxK = _topk_of_g(g_TxF, k, variant, cfg, interpret, warm)
    else:
      idx_TxK, g_TxK = _topk_select(x_TxD, w_gate_DxF, k, variant, cfg, interpret, warm)
    return _decode_list.rows_ffn(
      x_TxD,
      idx_TxK,
      g_TxK,
      w_up_FxD,
      w_down_FxD,
      cfg,
      interpret=interpret,
      gate_values=True,
      residual_TxD=residual_TxD,
      warm=rows_warm,
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
      x_TxD,
      idx_TxK,
      a_TxK,
      w_up_FxD,
      w_down_FxD,
      cfg,
      interpret=interpret,
      residual_TxD=residual_TxD,
    )
  a_TxFo = select()
  z_TxF = _decode_mask.up(x_TxD, a_TxFo, w_up_FxD, cfg, interpret=interpret)
  y = _decode_mask.down_projection(z_TxF, w_down_FxD, cfg, interpret)
  return y if residual_TxD is None else (residual_TxD + y).astype(y.dtype)


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


@functools.partial(jax.jit, static_argnums=(4, 5))
def _dense_kernels(x_TxD, w_gate_DxF, w_up_DxF, w_down_FxD, cfg, interpret):
  ws = (w_gate_DxF, w_up_DxF)
  if cfg.gemv_splits == 1:
    z_TxF = _gemv(x_TxD, ws, cfg, swiglu=True, interpret=interpret)
  else:
    p = _gemv(x_TxD, ws, cfg, swiglu=False, interpret=interpret)
    g, u = jnp.sum(p, axis=0)[:, :, : w_gate_DxF.shape[1]]
    z_TxF = (jax.nn.silu(g) * u).astype(x_TxD.dtype)
  return _decode_mask.down_projection(z_TxF, w_down_FxD, cfg, interpret)
