"""How a prepared model's decode step reaches the kernels: weight layouts and GEMV dispatch.

`Transformer.prepare_for_decode` stores each weight once in the layout its decode kernel
reads (`decode_layout`, as `DecodeWeight`s, not trained parameters); `decode_linear` sends a
few tokens to the Pallas GEMV of that layout (with the block's norm and residual add inside
the rowdot kernel) and more tokens (prefill) to XLA; `xla_cache_attention` is the XLA path's
cache update and attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moc_jax.model_config import ModelConfig
from pallas_kernels import _decode_rowdot, backends, reference


class DecodeWeight(nnx.Variable):
  """A derived inference-only weight layout; not a trained parameter."""


def decode_linear(
  cfg: ModelConfig, x_BxLxK: jax.Array, w: jax.Array, out_dtype=None, norm=None, residual=None
):
  """residual + RMSNorm(x) W for decode: a Pallas GEMV for ≤ 16 tokens (B·L), else XLA
  (prefill). w is K x N, or N x K with `decode_gemv='rowdot'` (see `decode_layout`), whose
  kernel applies the norm (scale, eps) and adds the residual itself (and streams narrow
  GEMVs with `decode_prefetch`); elsewhere XLA does."""
  x_TxK = x_BxLxK.reshape(-1, x_BxLxK.shape[-1])
  rowdot = cfg.decode_gemv_impl() == "rowdot"
  kernel = backends.resolve(cfg.kernel_backend) == "pallas"
  if rowdot and kernel and x_TxK.shape[0] <= _decode_rowdot.MAX_TOKENS:
    kw = dict(out_dtype=out_dtype, norm=norm, residual=residual, streaming=cfg.decode_prefetch)
    return _decode_rowdot.rowdot(x_BxLxK, w, **kw)
  x_TxK = x_TxK if norm is None else reference.rms_norm(x_TxK, *norm)
  gemv = backends.decode_linear(cfg.kernel_backend, x_TxK.shape[0], rowdot)
  y = gemv(x_TxK, w, out_dtype).reshape(*x_BxLxK.shape[:-1], -1)
  return y if residual is None else (residual + y).astype(y.dtype)


def decode_layout(cfg: ModelConfig, w_KxN: jax.Array) -> DecodeWeight:
  """A K x N weight in compute dtype, stored as `decode_linear` reads it (N x K for rowdot:
  each output's weights one contiguous row)."""
  w = w_KxN.astype(cfg.compute_dtype)
  return DecodeWeight(w.T if cfg.decode_gemv_impl() == "rowdot" else w)


def xla_cache_attention(q_BxLxHxE, k_BxLxHxE, v_BxLxHxE, k_BxSxHxE, v_BxSxHxE, positions_BxL):
  """(o, k cache, v cache) by XLA: the L new k, v written at each row's positions (contiguous),
  then every query attending to the slots at or before its own position."""
  write = jax.vmap(lambda c, new, at: jax.lax.dynamic_update_slice_in_dim(c, new, at, 0))
  start_B = positions_BxL[:, 0]
  k_cache = write(k_BxSxHxE, k_BxLxHxE.astype(k_BxSxHxE.dtype), start_B)
  v_cache = write(v_BxSxHxE, v_BxLxHxE.astype(v_BxSxHxE.dtype), start_B)
  slots_S = jnp.arange(k_cache.shape[1])
  mask = (slots_S[None, None, :] <= positions_BxL[:, :, None])[:, None]
  dt = q_BxLxHxE.dtype
  o = jax.nn.dot_product_attention(
    q_BxLxHxE, k_cache.astype(dt), v_cache.astype(dt), mask=mask, implementation="xla"
  )
  return o, k_cache, v_cache
