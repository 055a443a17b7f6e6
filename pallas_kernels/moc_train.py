"""MoC training epilogues in Pallas-Triton: one pass each way around the dense GEMMs.

Forward: (G, U) -> (idx, G_sel, U_sel, dense zero-filled Z) in one kernel, reusing the
selection of `topk.select_rows` / `topk.group_rows`, so G and U are each read once and Z is
written once (XLA's version reads G in top_k, gathers, then scatters Z in a second pass).

Backward: (dZ, idx, G_sel, U_sel) -> zero-filled dG and dU in one kernel: the program
zero-fills its rows, waits at a block barrier, then gathers dZ at idx and scatters the
selected gradients (math in fp32; silu'(g) = s (1 + g (1 - s))).

Same signatures and semantics as the references in `reference.py`; not differentiable
themselves (the `custom_vjp` in `moc_jax.moc` pairs them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _triton_utils as tu
from pallas_kernels import reference, topk
from pallas_kernels.topk import GROUP, PER_GROUP, TopKConfig


def _silu_mul(g, u, out_dtype):
  g32 = g.astype(jnp.float32)
  return (g32 * jax.nn.sigmoid(g32) * u.astype(jnp.float32)).astype(out_dtype)


def _forward_kernel(g_ref, u_ref, idx_ref, gs_ref, us_ref, z_ref, *, t, f, k, cfg, interpret):
  def emit(rows_b, cols_b, valid, g, sel, pos):
    u = pltriton.load(u_ref.at[rows_b, cols_b], mask=valid, other=0)
    z = jnp.where(sel, _silu_mul(g, u, u.dtype), jnp.zeros_like(u))
    tu.scatter_store(z_ref, rows_b, cols_b, z, valid, interpret)
    tu.scatter_store(idx_ref, rows_b, pos, cols_b, sel, interpret)
    tu.scatter_store(gs_ref, rows_b, pos, g, sel, interpret)
    tu.scatter_store(us_ref, rows_b, pos, u, sel, interpret)

  topk.select_rows(g_ref, t=t, f=f, k=k, cfg=cfg, interpret=interpret, on_chunk=emit)


def _forward_group_kernel(g_ref, u_ref, idx_ref, gs_ref, us_ref, z_ref, *, t, f, rows, interpret):
  def emit(rows_b, cols_b, valid, g, lane, row_g, base_g, ok_g, a, b):
    u = pltriton.load(u_ref.at[rows_b, cols_b], mask=valid, other=0)
    sel = (lane == a) | (lane == b)
    z = jnp.where(sel, _silu_mul(g, u, u.dtype), jnp.zeros_like(u))
    tu.scatter_store(z_ref, rows_b, cols_b, z, valid, interpret)
    for j, lane_j in enumerate((a, b)):
      col = base_g + lane_j
      slot = (base_g // GROUP) * PER_GROUP + j
      tu.scatter_store(idx_ref, row_g, slot, col, ok_g, interpret)
      for src, dst in ((g_ref, gs_ref), (u_ref, us_ref)):
        val = pltriton.load(src.at[row_g, col], mask=ok_g, other=0)
        tu.scatter_store(dst, row_g, slot, val, ok_g, interpret)

  topk.group_rows(g_ref, t=t, f=f, rows=rows, on_group=emit)


@functools.partial(jax.jit, static_argnames=("k", "variant", "config", "interpret"))
def train_forward_epilogue(
  g_TxF: jax.Array,
  u_TxF: jax.Array,
  k: int,
  variant: str = "moc",
  *,
  num_valid: int | None = None,
  config: TopKConfig | None = None,
  interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(idx_TxK int32 ascending, g_sel_TxK, u_sel_TxK, z_TxF): see the reference."""
  # TODO(kernels): skip channels >= num_valid inside the kernel instead of this extra pass.
  g_TxF = reference.mask_padding(g_TxF, num_valid)
  cfg = config or topk.DEFAULT
  interpret = tu.default_interpret() if interpret is None else interpret
  *lead, f = g_TxF.shape
  g2, u2 = g_TxF.reshape(-1, f), u_TxF.reshape(-1, f)
  t = g2.shape[0]
  if variant == "moc_2of8":
    if f % GROUP:
      raise ValueError(f"moc_2of8 needs F divisible by {GROUP}, got F={f}")
    k = f // GROUP * PER_GROUP
    rows = max(1, min(cfg.rows, 4096 // tu.next_pow2(f)))
    kernel = functools.partial(_forward_group_kernel, t=t, f=f, rows=rows, interpret=interpret)
  elif variant == "moc":
    if not 0 < k <= f or f >= 32768:
      raise ValueError(f"need 0 < k <= F < 32768, got k={k}, F={f}")
    rows = cfg.rows
    kernel = functools.partial(_forward_kernel, t=t, f=f, k=k, cfg=cfg, interpret=interpret)
  else:
    raise ValueError(f"unknown MoC variant {variant!r}; expected 'moc' or 'moc_2of8'")
  idx, gs, us, z = pl.pallas_call(
    kernel,
    out_shape=(
      jax.ShapeDtypeStruct((t, k), jnp.int32),
      jax.ShapeDtypeStruct((t, k), g2.dtype),
      jax.ShapeDtypeStruct((t, k), u2.dtype),
      jax.ShapeDtypeStruct((t, f), u2.dtype),
    ),
    grid=(pl.cdiv(t, rows),),
    interpret=interpret,
    compiler_params=None if interpret else tu.compiler_params(cfg.num_warps),
    name=f"moc_train_fwd_{variant}",
  )(g2, u2)
  return (
    idx.reshape(*lead, k),
    gs.reshape(*lead, k),
    us.reshape(*lead, k),
    z.reshape(*lead, f),
  )


def _backward_kernel(
  dz_ref, idx_ref, gs_ref, us_ref, dg_ref, du_ref, *, t, f, k, rows, granule, interpret
):
  row_r1 = pl.program_id(0) * rows + jnp.arange(rows, dtype=jnp.int32)[:, None]
  row_ok = row_r1 < t
  out_dtype = dg_ref.dtype
  for off, w in tu.pow2_chunks(f, granule):
    rows_b = jnp.broadcast_to(row_r1, (rows, w))
    cols_b = jnp.broadcast_to(off + jnp.arange(w, dtype=jnp.int32)[None, :], (rows, w))
    valid = row_ok & (cols_b < f)
    zeros = jnp.zeros((rows, w), out_dtype)
    tu.scatter_store(dg_ref, rows_b, cols_b, zeros, valid, interpret)
    tu.scatter_store(du_ref, rows_b, cols_b, zeros, valid, interpret)
  # Zero-fill and scatter touch the same addresses from different threads.
  if not interpret:  # interpret mode runs the program sequentially
    pltriton.debug_barrier()
  for off, w in tu.pow2_chunks(k, min(granule, tu.next_pow2(k))):
    rows_b = jnp.broadcast_to(row_r1, (rows, w))
    slot_b = jnp.broadcast_to(off + jnp.arange(w, dtype=jnp.int32)[None, :], (rows, w))
    valid = row_ok & (slot_b < k)
    idx = pltriton.load(idx_ref.at[rows_b, slot_b], mask=valid, other=0)
    g = pltriton.load(gs_ref.at[rows_b, slot_b], mask=valid, other=0).astype(jnp.float32)
    u = pltriton.load(us_ref.at[rows_b, slot_b], mask=valid, other=0).astype(jnp.float32)
    dz = pltriton.load(dz_ref.at[rows_b, idx], mask=valid, other=0).astype(jnp.float32)
    s = jax.nn.sigmoid(g)
    du = dz * (g * s)
    dg = dz * u * (s * (1.0 + g * (1.0 - s)))
    tu.scatter_store(dg_ref, rows_b, idx, dg.astype(out_dtype), valid, interpret)
    tu.scatter_store(du_ref, rows_b, idx, du.astype(out_dtype), valid, interpret)


@functools.partial(jax.jit, static_argnames=("rows", "num_warps", "interpret"))
def train_backward_epilogue(
  dz_TxF: jax.Array,
  idx_TxK: jax.Array,
  g_sel_TxK: jax.Array,
  u_sel_TxK: jax.Array,
  z_sel_TxK: jax.Array | None = None,
  *,
  rows: int = 1,
  num_warps: int = 4,
  interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dg_TxF, du_TxF, z_TxF) zero-filled, in dz's dtype: see the reference."""
  # TODO(kernels): write Z in the same pass instead of this XLA scatter.
  if z_sel_TxK is None:
    z_sel_TxK = reference.silu_and_mul(g_sel_TxK, u_sel_TxK)
  z_TxF = reference.scatter_rows(z_sel_TxK, idx_TxK, dz_TxF.shape[-1])
  interpret = tu.default_interpret() if interpret is None else interpret
  *lead, f = dz_TxF.shape
  k = idx_TxK.shape[-1]
  dz2 = dz_TxF.reshape(-1, f)
  t = dz2.shape[0]
  kernel = functools.partial(
    _backward_kernel, t=t, f=f, k=k, rows=rows, granule=256, interpret=interpret
  )
  dg, du = pl.pallas_call(
    kernel,
    out_shape=(jax.ShapeDtypeStruct((t, f), dz2.dtype),) * 2,
    grid=(pl.cdiv(t, rows),),
    interpret=interpret,
    compiler_params=None if interpret else tu.compiler_params(num_warps),
    name="moc_train_bwd",
  )(
    dz2,
    idx_TxK.reshape(-1, k).astype(jnp.int32),
    g_sel_TxK.reshape(-1, k),
    u_sel_TxK.reshape(-1, k),
  )
  return dg.reshape(*lead, f), du.reshape(*lead, f), z_TxF
