"""Mixture-of-Channels FFN with F split over the mesh's `tensor` axis (Megatron-style).

    y = moc_ffn_tp(x_BxLxD, w_gate, w_up, w_down, k=K, variant="moc", ...)

Called under an ambient mesh (`jax.set_mesh`) whose `tensor` axis is > 1. Each tensor shard
holds a contiguous block of F channels of Wg, Wu (columns) and Wd (rows); the batch is split
over (data, fsdp). The per-token top-K is the *global* one, bit-identical to a single device,
ties going to the lower global channel index (docs/tensor_parallel_moc.md):

  1. each shard computes its gate keys G_l = x @ Wg_l (order-preserving unsigned images);
  2. the K-th largest key tau is found by bisection over its bits; each step counts local keys
     >= candidate and `psum`s the (T,) counts over `tensor` (16 steps for bf16, 32 for fp32);
  3. ties at tau: one `all_gather` of the per-shard (above, equal) counts gives each shard the
     number of equal keys on lower shards, so the leftmost ones are kept globally;
  4. each shard keeps its own channels: Z_l = where(mask_l, silu(G_l) U_l, 0); y = psum(Z_l Wd_l).

Residuals are compact per shard with capacity C = min(K, F_l): local indices (uint16), G_sel,
U_sel (and Z_sel without GCP). A shard with fewer than C selected channels for a token fills the
remaining slots with distinct unselected channels whose stored values are 0, which contribute
exactly nothing in the backward (silu(0) * 0 = 0, 0 * silu'(0) = 0); indices stay sorted and
unique, so the reference backward epilogue runs unchanged per shard.

The custom_vjp sits outside the two `shard_map`s (forward, backward): no autodiff through
collectives, and every collective is explicit: forward 16/32 tiny psums + one all_gather of
(2, T) ints + psum of y (T, D); backward psum of dx (T, D) over `tensor` and of dW over the
batch axes.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moc_jax import moc
from pallas_kernels import backends, reference

TENSOR = "tensor"
BATCH = moc.BATCH_AXES


def tensor_parallel_size() -> int:
  """Size of the ambient mesh's `tensor` axis (1 without a mesh)."""
  return moc.mesh_axis_size(TENSOR)


def _padded_f(d_ff: int, tp: int, variant: str, pad_to: int | None) -> int:
  multiple = max(int(pad_to), 1) if pad_to else (128 if jax.default_backend() == "gpu" else 1)
  if variant == "moc_2of8":
    multiple = math.lcm(multiple, reference.GROUP)
  step = int(multiple) * tp
  return -(-d_ff // step) * step


# ---------------------------------------------------------------------------------------------
# Per-shard selection (runs inside shard_map; collectives over `tensor`).


def local_topk_mask(g_TxF: jax.Array, k: int) -> jax.Array:
  """This shard's part of the exact global top-K mask (ties to the lower global index)."""
  keys = reference.order_keys(g_TxF)
  tau_T1 = reference.kth_largest_key(keys, k, axis_name=TENSOR)[:, None]
  above = keys > tau_T1
  at = keys == tau_T1
  counts_2xT = jnp.stack([jnp.sum(above, -1, dtype=jnp.int32), jnp.sum(at, -1, dtype=jnp.int32)])
  all_Sx2xT = jax.lax.all_gather(counts_2xT, TENSOR)
  lower_S = jnp.arange(all_Sx2xT.shape[0]) < jax.lax.axis_index(TENSOR)
  at_before_T = jnp.sum(jnp.where(lower_S[:, None], all_Sx2xT[:, 1], 0), axis=0)
  room_T1 = (k - jnp.sum(all_Sx2xT[:, 0], axis=0) - at_before_T)[:, None]
  return above | (at & (jnp.cumsum(at, axis=-1, dtype=jnp.int32) <= room_T1))


def _mask_invalid(g_TxF: jax.Array, d_ff: int) -> jax.Array:
  """Channels whose *global* index is F padding get the lowest value (never selected)."""
  f_local = g_TxF.shape[-1]
  global_F = jax.lax.axis_index(TENSOR) * f_local + jnp.arange(f_local)
  return jnp.where(global_F < d_ff, g_TxF, jnp.finfo(g_TxF.dtype).min)


def _local_mask(g_TxF, k: int, variant: str, d_ff: int) -> jax.Array:
  g_TxF = _mask_invalid(g_TxF, d_ff)
  if variant == "moc_2of8":  # groups never straddle shards (F_l % 8 == 0): no communication
    return reference.group_mask(g_TxF)
  return local_topk_mask(g_TxF, k)


def _compact(mask_TxF, g_TxF, u_TxF, capacity: int):
  """Sorted unique local indices of the selected channels, padded with unselected ones (value 0)."""
  count_T1 = jnp.sum(mask_TxF, axis=-1, keepdims=True, dtype=jnp.int32)
  unsel = ~mask_TxF
  fill = unsel & (jnp.cumsum(unsel, axis=-1, dtype=jnp.int32) <= capacity - count_T1)
  idx_TxC = reference.mask_to_indices(mask_TxF | fill, capacity)
  valid = jnp.take_along_axis(mask_TxF, idx_TxC, axis=-1)
  zero = jnp.zeros((), g_TxF.dtype)
  g_sel = jnp.where(valid, jnp.take_along_axis(g_TxF, idx_TxC, axis=-1), zero)
  u_sel = jnp.where(valid, jnp.take_along_axis(u_TxF, idx_TxC, axis=-1), zero)
  return idx_TxC.astype(reference.index_dtype(mask_TxF.shape[-1])), g_sel, u_sel


def select_mask_tp(g_TxF: jax.Array, k: int, variant: str = "moc", d_ff: int | None = None):
  """The selection mask of (T, F) gate values with F split over `tensor` (for tests/tools)."""
  d_ff = g_TxF.shape[-1] if d_ff is None else d_ff
  fn = functools.partial(_local_mask, k=k, variant=variant, d_ff=d_ff)
  spec = P(None, TENSOR)
  return jax.shard_map(fn, in_specs=spec, out_specs=spec, check_vma=False)(g_TxF)


# ---------------------------------------------------------------------------------------------
# The op.


def moc_ffn_tp(
  x_BxLxD: jax.Array,
  w_gate: jax.Array,
  w_up: jax.Array,
  w_down: jax.Array,
  *,
  k: int | None,
  variant: str = "moc",
  gcp: bool = False,
  backend: str = "xla",
  pad_to: int | None = None,
) -> jax.Array:
  """`moc.moc_ffn` semantics with F over `tensor` and rows over (data, fsdp).

  x: (B, L, D) with B divisible by data × fsdp. Weights in storage dtype, cast inside.
  """
  d_ff = w_gate.shape[1]
  moc.validate(d_ff, k, variant)
  if variant == "dense":
    raise ValueError("moc_ffn_tp is for MoC variants; dense runs through moc.moc_ffn")
  k_eff = moc.effective_k(k, d_ff, variant)
  f_pad = _padded_f(d_ff, tensor_parallel_size(), variant, pad_to)
  return _moc_tp_core(x_BxLxD, w_gate, w_up, w_down, k_eff, variant, gcp, backend, f_pad)


def _specs(x_ndim: int):
  x_spec = P(BATCH, *([None] * (x_ndim - 1)))
  return x_spec, P(None, TENSOR), P(TENSOR, None), P(BATCH, TENSOR)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _moc_tp_core(x, w_gate, w_up, w_down, k, variant, gcp, backend, f_pad):
  return _tp_fwd(x, w_gate, w_up, w_down, k, variant, gcp, backend, f_pad)[0]


def _tp_fwd(x, w_gate, w_up, w_down, k, variant, gcp, backend, f_pad):
  del backend  # selection needs the global threshold: per-shard jnp code, not the fused kernel
  d_ff, tp = w_gate.shape[1], tensor_parallel_size()
  capacity = min(k, f_pad // tp) if variant == "moc" else f_pad // tp // 4
  wg, wu, wd = moc.cast_and_pad(w_gate, w_up, w_down, x.dtype, f_pad)
  x_spec, col, row, comp = _specs(x.ndim)

  def local(x_l, wg_l, wu_l, wd_l):
    x_TxD = x_l.reshape(-1, x_l.shape[-1])
    g_TxF, u_TxF = x_TxD @ wg_l, x_TxD @ wu_l
    mask_TxF = _local_mask(g_TxF, k, variant, d_ff)
    z_TxF = jnp.where(mask_TxF, reference.silu_and_mul(g_TxF, u_TxF), jnp.zeros((), x_l.dtype))
    y_TxD = jax.lax.psum(z_TxF @ wd_l, TENSOR)
    idx, g_sel, u_sel = _compact(mask_TxF, g_TxF, u_TxF, capacity)
    compact = (idx, g_sel, u_sel)
    if not gcp:
      compact += (reference.silu_and_mul(g_sel, u_sel),)
    return y_TxD.reshape(x_l.shape), compact

  n_res = 3 if gcp else 4
  y, compact = jax.shard_map(
    local, in_specs=(x_spec, col, col, row), out_specs=(x_spec, (comp,) * n_res), check_vma=False
  )(x, wg, wu, wd)
  return y, (x, w_gate, w_up, w_down, compact)


def _tp_bwd(k, variant, gcp, backend, f_pad, residuals, dy):
  del k, variant, gcp
  residuals, dy = jax.lax.optimization_barrier((residuals, dy))
  x, w_gate, w_up, w_down, compact = residuals
  d_ff = w_gate.shape[1]
  wg, wu, wd = moc.cast_and_pad(w_gate, w_up, w_down, x.dtype, f_pad)
  x_spec, col, row, comp = _specs(x.ndim)
  epilogue = backends.train_backward_epilogue(backend)
  f32 = jnp.float32

  def local(x_l, dy_l, wg_l, wu_l, wd_l, *compact_l):
    x_TxD = x_l.reshape(-1, x_l.shape[-1])
    dy_TxD = dy_l.reshape(-1, dy_l.shape[-1]).astype(x_l.dtype)
    dg_TxF, du_TxF, z_TxF = epilogue(dy_TxD @ wd_l.T, *compact_l)
    dwd = jax.lax.psum(jnp.dot(z_TxF.T, dy_TxD, preferred_element_type=f32), BATCH)
    dwg = jax.lax.psum(jnp.dot(x_TxD.T, dg_TxF, preferred_element_type=f32), BATCH)
    dwu = jax.lax.psum(jnp.dot(x_TxD.T, du_TxF, preferred_element_type=f32), BATCH)
    dx_TxD = jax.lax.psum(dg_TxF @ wg_l.T + du_TxF @ wu_l.T, TENSOR)
    return dx_TxD.reshape(x_l.shape), dwg, dwu, dwd

  n_res = len(compact)
  dx, dwg, dwu, dwd = jax.shard_map(
    local,
    in_specs=(x_spec, x_spec, col, col, row, *((comp,) * n_res)),
    out_specs=(x_spec, col, col, row),
    check_vma=False,
  )(x, dy, wg, wu, wd, *compact)
  return (
    dx.astype(x.dtype),
    dwg[:, :d_ff].astype(w_gate.dtype),
    dwu[:, :d_ff].astype(w_up.dtype),
    dwd[:d_ff].astype(w_down.dtype),
  )


_moc_tp_core.defvjp(_tp_fwd, _tp_bwd)
