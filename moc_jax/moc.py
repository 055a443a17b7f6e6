"""The Mixture-of-Channels FFN: one public op with a `jax.custom_vjp` that keeps compact residuals.

    y = moc_ffn(x, w_gate, w_up, w_down, k=K, variant="moc", gcp=False, backend="xla")

Per token, only the K channels with the largest signed gate value `x @ w_gate` pass through
silu(G) * U and the down projection (DESIGN.md §1). What survives from the forward to the
backward is only per-token K-sized: the selection, G_sel, U_sel and, without GCP, Z_sel. The
selection is kept as channel indices (uint16 when F allows) on the xla backend, and as a bitmask
(F/8 bytes, smaller than 2K) on the Pallas one, whose epilogues then stream over dense rows.
silu(G_sel) and silu'(G_sel) are recomputed in the backward epilogue, where they cost nothing,
so they are not kept. Weights enter the op in their storage dtype (fp32 masters) and are cast
(and padded) inside the forward; `keep_weights` chooses whether the backward reuses those
compute-dtype copies (held from each layer's forward to its backward, as XLA's autodiff holds
dense's: 3·D·F·2 bytes per layer) or casts again (no copy held; one more read of the fp32
weights per layer and step).

This module imports only jax and `pallas_kernels`: the GPU benchmark machine needs nothing else.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels import backends, reference

VARIANTS = ("dense", "moc", "moc_2of8")
PAD_MULTIPLE_GPU = 128  # cuBLAS falls off its fast path for F % 128 != 0 (DESIGN.md §3)
BATCH_AXES = ("data", "fsdp")  # mesh axes that split tokens (sharding.py uses these)
# The Pallas backend keeps the selection as a bitmask (False: as indices, like the xla backend).
BITMASK_RESIDUALS = True
# The gate and up projections as one GEMM over [Wg | Wu] (and one GEMM each for dx and
# d[Wg | Wu] in the backward): dense SwiGLU, and MoC on the Pallas backend, whose epilogues
# read [G | U] in place. H200, 1b step, every GEMM on cuBLAS (train.compiler_options=auto):
# dense +0.9%, MoC +0.8% (model_step_1b_fused_h200_20261203.json); with XLA's Triton GEMMs
# (compiler_options=none) dense lost 2.2% (model_step_1b_flags_h200_20261203b.json).
FUSE_GATE_UP = True


def default_k(d_model: int) -> int:
  """The paper's default: K = d_model // 2."""
  return d_model // 2


def effective_k(k: int | None, d_ff: int, variant: str) -> int:
  """K as the op will use it; 2:8 fixes K = F / 4."""
  if variant == "moc_2of8":
    return d_ff // reference.GROUP * reference.PER_GROUP
  if k is None:
    raise ValueError(f"variant {variant!r} needs k")
  return k


def validate(d_ff: int, k: int | None, variant: str) -> None:
  """Reject a bad (F, K, variant) with one message naming the problem."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown FFN variant {variant!r}; valid: {', '.join(VARIANTS)}")
  if variant == "moc" and (k is None or not 0 < k <= d_ff):
    raise ValueError(f"MoC needs 0 < k <= d_ff={d_ff}, got k={k}")
  if variant == "moc_2of8" and d_ff % reference.GROUP:
    raise ValueError(f"moc_2of8 needs d_ff divisible by {reference.GROUP}, got d_ff={d_ff}")


def _pad_multiple(pad_to: int | None) -> int:
  if pad_to is not None:
    return max(int(pad_to), 1)
  return PAD_MULTIPLE_GPU if jax.default_backend() == "gpu" else 1


def cast_and_pad(w_gate, w_up, w_down, dtype, f_pad: int):
  """Compute-dtype weights with F padded to f_pad by zero channels (fused into the cast)."""
  extra = f_pad - w_gate.shape[1]
  wg = jnp.pad(w_gate.astype(dtype), ((0, 0), (0, extra)))
  wu = jnp.pad(w_up.astype(dtype), ((0, 0), (0, extra)))
  wd = jnp.pad(w_down.astype(dtype), ((0, extra), (0, 0)))
  return wg, wu, wd


def _padded(d_ff: int, multiple: int) -> int:
  return d_ff + (-d_ff % multiple)


def mesh_axis_size(name: str) -> int:
  """Size of the ambient mesh's axis `name` (1 without a mesh or without that axis)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or name not in mesh.axis_names:
    return 1
  return int(mesh.shape[name])


def per_batch_shard(row_fn):
  """Runs a row-wise epilogue on each batch shard of the ambient mesh.

  A `pallas_call` has no SPMD partitioning rule: under `jit` with token rows split over
  (data, fsdp), XLA would gather every shard's rows onto every device and run the whole
  kernel there. Every argument of `row_fn` is a (T, ...) array; so is every output.
  """
  axes = tuple(a for a in BATCH_AXES if mesh_axis_size(a) > 1)
  if not axes:
    return row_fn
  return jax.shard_map(row_fn, in_specs=P(axes), out_specs=P(axes), check_vma=False)


def select_channels(
  g_TxF: jax.Array, k: int | None, variant: str = "moc", backend: str = "xla"
) -> tuple[jax.Array, jax.Array]:
  """The selection alone: (indices int32 ascending per token, selected values)."""
  validate(g_TxF.shape[-1], k, variant)
  return backends.select(backend)(g_TxF, effective_k(k, g_TxF.shape[-1], variant), variant)


def moc_ffn(
  x: jax.Array,
  w_gate: jax.Array,
  w_up: jax.Array,
  w_down: jax.Array,
  *,
  k: int | None,
  variant: str = "moc",
  gcp: bool = False,
  backend: str = "xla",
  pad_to: int | None = None,
  keep_weights: bool | None = None,
) -> jax.Array:
  """SwiGLU FFN restricted per token to its top-K gate channels.

  Args:
    x: (..., D) activations in the compute dtype.
    w_gate, w_up: (D, F); w_down: (F, D); any float dtype (cast to x.dtype inside).
    k: channels kept per token (ignored for 'dense'; 'moc_2of8' uses F/4).
    variant: 'dense' | 'moc' | 'moc_2of8'.
    gcp: keep only idx, G_sel, U_sel and recompute Z_sel in the backward.
    backend: kernel backend for selection and epilogues ('xla', 'pallas', 'auto').
    pad_to: pad F to a multiple of this inside the op (None: 128 on GPU, 1 elsewhere).
    keep_weights: hold the forward's cast weights for the backward instead of casting again
      (faster, 3·D·F compute-dtype elements more memory per layer; None: unless gcp or the
      weights are split over an `fsdp` mesh axis).
  Returns:
    (..., D) in x.dtype; differentiable in x and all three weights.
  """
  *lead, d_model = x.shape
  d_ff = w_gate.shape[1]
  validate(d_ff, k, variant)
  if w_gate.shape != (d_model, d_ff) or w_up.shape != (d_model, d_ff):
    raise ValueError(f"w_gate/w_up must be ({d_model}, {d_ff}); got {w_gate.shape}, {w_up.shape}")
  if w_down.shape != (d_ff, d_model):
    raise ValueError(f"w_down must be ({d_ff}, {d_model}); got {w_down.shape}")
  multiple = _pad_multiple(pad_to)
  x_TxD = x.reshape(-1, d_model)
  if variant == "dense":
    y_TxD = _dense_swiglu(x_TxD, w_gate, w_up, w_down, multiple)
  else:
    k_eff = effective_k(k, d_ff, variant)
    keep = default_keep_weights(gcp) if keep_weights is None else keep_weights
    y_TxD = _moc_core(x_TxD, w_gate, w_up, w_down, k_eff, variant, gcp, backend, multiple, keep)
  return y_TxD.reshape(*lead, d_model)


def default_keep_weights(gcp: bool) -> bool:
  """Hold the cast weights unless GCP (memory first) or an `fsdp` mesh axis (FSDP gathers
  weights per use, so a held copy could be a gathered one)."""
  return not gcp and mesh_axis_size("fsdp") == 1


def _dense_swiglu(x_TxD, w_gate, w_up, w_down, multiple: int) -> jax.Array:
  """Plain SwiGLU under autodiff (the baseline), padded like MoC so comparisons are fair."""
  wg, wu, wd = cast_and_pad(w_gate, w_up, w_down, x_TxD.dtype, _padded(w_gate.shape[1], multiple))
  # Not with F split over `tensor`: [Wg | Wu] would mix the two weights' shards.
  if FUSE_GATE_UP and mesh_axis_size("tensor") == 1:
    gu_Tx2F = x_TxD @ jnp.concatenate([wg, wu], axis=1)
    g_TxF, u_TxF = jnp.split(gu_Tx2F, 2, axis=1)
  else:
    g_TxF, u_TxF = x_TxD @ wg, x_TxD @ wu
  return (jax.nn.silu(g_TxF) * u_TxF) @ wd


# ---------------------------------------------------------------------------------------------
# The custom_vjp. Arguments after the four arrays are static.


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _moc_core(x_TxD, w_gate, w_up, w_down, k, variant, gcp, backend, multiple, keep):
  y_TxD, _ = _moc_fwd(x_TxD, w_gate, w_up, w_down, k, variant, gcp, backend, multiple, keep)
  return y_TxD


def _moc_fwd(x_TxD, w_gate, w_up, w_down, k, variant, gcp, backend, multiple, keep):
  d_ff = w_gate.shape[1]
  wg, wu, wd = cast_and_pad(w_gate, w_up, w_down, x_TxD.dtype, _padded(w_gate.shape[1], multiple))
  bitmask = _bitmask_epilogues(backend, wg.shape[1])
  weights = (w_gate, w_up, w_down)  # the backward's: fp32 masters (live anyway) + cast copies
  if bitmask:
    epilogue = functools.partial(bitmask[0], k=k, variant=variant, num_valid=d_ff, z_sel=not gcp)
    if FUSE_GATE_UP:  # the epilogue reads G and U in place from the one [G | U] output
      w_gu = jnp.concatenate([wg, wu], axis=1)
      outs = per_batch_shard(lambda gu: epilogue(gu, None))(x_TxD @ w_gu)
      weights += (w_gu, wd) if keep else ()
    else:
      outs = per_batch_shard(epilogue)(x_TxD @ wg, x_TxD @ wu)
      weights += (wg, wu, wd) if keep else ()
    words, g_sel, u_sel, z_TxF, *z_sel = outs
    compact = (words, g_sel, u_sel, *z_sel)
    return z_TxF @ wd, (x_TxD, weights, compact)
  g_TxF, u_TxF = x_TxD @ wg, x_TxD @ wu
  epilogue = functools.partial(
    backends.train_forward_epilogue(backend),
    k=k,
    variant=variant,
    num_valid=d_ff,
    idx_dtype=reference.index_dtype(wg.shape[1]),
  )
  idx_TxK, g_sel, u_sel, z_TxF = per_batch_shard(epilogue)(g_TxF, u_TxF)
  y_TxD = z_TxF @ wd
  compact = (idx_TxK, g_sel, u_sel)
  if not gcp:  # GCP recomputes Z_sel in the backward epilogue instead of keeping it
    compact += (_z_sel(backend, z_TxF, idx_TxK, g_sel, u_sel),)
  return y_TxD, (x_TxD, weights + ((wg, wu, wd) if keep else ()), compact)


def _bitmask_epilogues(backend: str, padded_d_ff: int):
  """The bitmask epilogues if the backend has them and a row fills at least one 32-bit word."""
  use = BITMASK_RESIDUALS and padded_d_ff >= 32
  return backends.bitmask_epilogues(backend) if use else None


def _z_sel(backend, z_TxF, idx_TxK, g_sel, u_sel) -> jax.Array:
  """Z_sel computed exactly as the GCP backward would recompute it, so MoC and MoC+GCP train
  bit-identically: the Pallas kernels share one silu*u routine (Triton rounds it differently
  from XLA), so take the forward kernel's Z; the jnp path recomputes from (G_sel, U_sel)."""
  if backends.resolve(backend) == "pallas":
    return jnp.take_along_axis(z_TxF, idx_TxK.astype(jnp.int32), axis=-1)
  return reference.silu_and_mul(g_sel, u_sel)


def _moc_bwd(k, variant, gcp, backend, multiple, keep, residuals, dy_TxD):
  del k, variant, gcp, keep  # the residual tuple itself says what was kept
  # Keep XLA from hoisting backward work (which depends only on residuals) into the forward,
  # where it would stay alive across layers (DESIGN.md §2).
  residuals, dy_TxD = jax.lax.optimization_barrier((residuals, dy_TxD))
  x_TxD, (w_gate, w_up, w_down, *kept), compact = residuals
  d_ff = w_gate.shape[1]
  f_pad = _padded(d_ff, multiple)
  bitmask = _bitmask_epilogues(backend, f_pad)
  fused = bitmask and FUSE_GATE_UP
  if not kept:  # cast again, laid out as the forward would have kept them
    wg, wu, wd = cast_and_pad(w_gate, w_up, w_down, x_TxD.dtype, f_pad)
    kept = (jnp.concatenate([wg, wu], axis=1), wd) if fused else (wg, wu, wd)
  wg, wu, w_gu, wd = (None, None, *kept) if fused else (kept[0], kept[1], None, kept[2])
  dy_TxD = dy_TxD.astype(x_TxD.dtype)

  dz_TxF = dy_TxD @ wd.T
  f32 = jnp.float32
  if fused:  # as the forward: one [dG | dU] for one GEMM per gradient
    dgu_Tx2F, z_TxF = per_batch_shard(functools.partial(bitmask[1], fused=True))(dz_TxF, *compact)
    dw_gu = jnp.dot(x_TxD.T, dgu_Tx2F, preferred_element_type=f32)
    dw_gate, dw_up = dw_gu[:, :d_ff], dw_gu[:, f_pad : f_pad + d_ff]
    dx_TxD = dgu_Tx2F @ w_gu.T
  else:
    epilogue = bitmask[1] if bitmask else backends.train_backward_epilogue(backend)
    dg_TxF, du_TxF, z_TxF = per_batch_shard(epilogue)(dz_TxF, *compact)
    dw_gate = jnp.dot(x_TxD.T, dg_TxF, preferred_element_type=f32)[:, :d_ff]
    dw_up = jnp.dot(x_TxD.T, du_TxF, preferred_element_type=f32)[:, :d_ff]
    dx_TxD = dg_TxF @ wg.T + du_TxF @ wu.T
  dw_down = jnp.dot(z_TxF.T, dy_TxD, preferred_element_type=f32)[:d_ff]
  return (
    dx_TxD.astype(x_TxD.dtype),
    dw_gate.astype(w_gate.dtype),
    dw_up.astype(w_up.dtype),
    dw_down.astype(w_down.dtype),
  )


_moc_core.defvjp(_moc_fwd, _moc_bwd)


# ---------------------------------------------------------------------------------------------
# Inference.


def moc_decode_ffn(
  x: jax.Array,
  w_gate_DxF: jax.Array,
  w_up_FxD: jax.Array,
  w_down_FxD: jax.Array,
  *,
  k: int | None,
  variant: str = "moc",
  backend: str = "xla",
  warm: jax.Array | None = None,
  output_major: bool = False,
  norm: tuple[jax.Array, float] | None = None,
  residual: bool = False,
  streaming: bool = False,
) -> jax.Array:
  """MoC FFN for a few tokens with channel-major Wu^T and Wd: reads only the selected rows.

  variant='dense' runs the dense FFN on the same path (Wu then given as (D, F)). warm: the
  weight the next kernels read; the MoC kernels may read its start into L2 while their top-K
  runs (`DecodeConfig.warm_bytes`); y does not depend on it. output_major: the weights that
  the GEMVs read whole come transposed (`model.decode_gemv='rowdot'`): Wgᵀ (F, D), and for
  dense also Wuᵀ (F, D) and Wdᵀ (D, F).
  norm = (scale, eps): the FFN of RMSNorm(x); residual: x + that. With output_major weights on
  the Pallas backend the kernels do both (no launches of their own), else XLA does.
  """
  *lead, d_model = x.shape
  d_ff = w_up_FxD.shape[0] if variant != "dense" or output_major else w_up_FxD.shape[1]
  validate(d_ff, k, variant)
  x_TxD = x.reshape(-1, d_model)
  ws = (w_gate_DxF, w_up_FxD, w_down_FxD)
  fused = output_major and backends.resolve(backend) == "pallas"  # kernels take norm, residual
  xn_TxD = x_TxD if norm is None or fused else reference.rms_norm(x_TxD, *norm)
  kw = {"norm": norm} if fused else {}
  if fused and variant != "dense":
    kw["streaming"] = streaming
  if fused:  # the residual added by the kernels (dense: the down GEMV; MoC: the rows' sum)
    kw["residual"], residual = (x_TxD if residual else None), False
  if variant == "dense":
    y = backends.dense_decode_ffn(backend, output_major)(xn_TxD, *ws, **kw)
  else:  # MoC: the norm inside the gate GEMV
    kernel = backends.decode_ffn(backend, output_major)
    y = kernel(xn_TxD, *ws, effective_k(k, d_ff, variant), variant, warm=warm, **kw)
  y = (x_TxD + y).astype(y.dtype) if residual else y
  return y.reshape(*lead, d_model)


def residual_bytes_per_token(
  d_ff: int, k: int | None, variant: str, gcp: bool, itemsize: int = 2, backend: str = "xla"
) -> int:
  """FFN activation bytes kept per token between forward and backward (x excluded).

  The selection costs 2 or 4 bytes per index (xla backend), or F/8 bytes of bitmask with F
  padded as on the GPU (Pallas backend)."""
  validate(d_ff, k, variant)
  if variant == "dense":
    return 4 * d_ff * itemsize  # autodiff keeps G, U, silu(G), Z
  k_eff = effective_k(k, d_ff, variant)
  values = k_eff * (2 if gcp else 3) * itemsize
  padded = _padded(d_ff, PAD_MULTIPLE_GPU)
  if _bitmask_epilogues(backend, padded):
    return values + -(-padded // 32) * 4
  return values + k_eff * jnp.dtype(reference.index_dtype(d_ff)).itemsize
