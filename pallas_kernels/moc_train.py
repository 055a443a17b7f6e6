"""MoC training epilogues in Pallas-Triton: one pass each way around the dense GEMMs.

Forward: (G, U) -> (idx, G_sel, U_sel, dense zero-filled Z) in one kernel, reusing the
selection of `topk.select_rows` / `topk.group_rows`, so G and U are each read once from HBM
and Z is written once; channels >= num_valid (F padding) are handled in the kernel exactly as
`reference.mask_padding` would, with no extra pass over G.

With `TopKConfig(compact=True)` the forward is two kernels instead: the selection alone writes
a bitmask (`topk_compact.mask_call`), then a streaming pass reads the bitmask, G and U and writes
Z and the compact residuals. The selection keeps its keys on chip across many counting passes
with few programs per SM; the streaming pass has none of that register pressure, so G, U and Z
move at close to copy speed there, for one extra read of G and 1/16 of its bytes in bitmask.

Backward: (dZ, idx, G_sel, U_sel[, Z_sel]) -> zero-filled dG, dU and Z in one kernel: the
program zero-fills its rows of all three (contiguous stores), waits at a block barrier, then
gathers dZ at idx and scatters the selected gradients and Z (math in fp32;
silu'(g) = s (1 + g (1 - s))). Indices are read in their stored dtype (uint16 or int32); Z is
scattered from Z_sel, or recomputed from G_sel, U_sel (GCP).

Same signatures and semantics as the references in `reference.py`; not differentiable
themselves (the `custom_vjp` in `moc_jax.moc` pairs them).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _triton_utils as tu
from pallas_kernels import topk, topk_compact
from pallas_kernels.moc_train_mask import apply_call, checked_selection, silu_mul
from pallas_kernels.topk import GROUP, PER_GROUP, TopKConfig

# The forward epilogue's config, its own: the fastest standalone top-K is not the fastest inside
# the epilogue. Two kernels, 512-wide chunks; the search starts from a checked Gaussian guess
# (selection 326-331 vs 350 us at 16384 x 5504, stream_sweep_h200_20261203d.json). The
# streaming pass gathers its compact residuals (`_apply_gather`) on 8 warps, 32-word blocks:
# 292 vs 316 us for the scatter walk at that shape (stream_sweep_h200_20261203p.json).
#
# 'auto' (2026-12-05o, an H100, mgpu_stream_h100_20261205o.json; exact): where the Mosaic select
# runs, it writes the pass's outputs itself from the fused [G | U] buffer (selection + pass 274.7
# vs 460.6 us at 1B, 94.0 vs 126.2 at 60M); after another selection (2:8) the Mosaic streaming
# pass reads that buffer (the pass alone 272.3 vs 337.9 us at 1B); the Triton gather below
# everywhere else (split G, U included: not yet checked compiled on a GPU).
FORWARD_DEFAULT = TopKConfig(
  chunk=512,
  compact=True,
  apply_words=32,
  apply_warps=8,
  apply_mode="auto",
  gauss_margin=0.1,
  selection="auto",  # the Mosaic GPU bitmask on Hopper: 179.7 vs 263.4 us at the 1B layer
)
NARROW_ROW = 4096  # rows of fewer (padded) channels: a narrower selection and gather


def forward_config(f: int) -> TopKConfig:
  """The forward epilogue's config for rows of F (padded) channels: FORWARD_DEFAULT, narrowed
  below NARROW_ROW channels.

  The selection runs on 2 warps per row there. H200, two runs each
  (stream_sweep_h200_20261203{i,j}.json): 60M / 130M / 350M shapes 97.9 / 117.5 / 163.7 and
  94.6 / 113.0 / 169.9 us vs 102.2 / 135.4 / 173.2 and 110.2 / 129.5 / 176.3 on 4 warps; at
  the 1B shape 2 warps took 307 vs 300. The gather runs on 4 warps, 16-word blocks: 89 / 121 /
  165 us vs 109 / 140 / 167 on 8 warps and 99 / 130 / 189 for the scatter walk
  (stream_sweep_h200_20261203p.json)."""
  if f >= NARROW_ROW:
    return FORWARD_DEFAULT
  return dataclasses.replace(FORWARD_DEFAULT, num_warps=2, apply_words=16, apply_warps=4)


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
  rows: int = 1  # rows per program
  num_warps: int = 4
  granule: int = 256
  strided: bool = True  # lane i owns slot i (+32j): gathers/scatters hit fewer sectors


def _forward_kernel(
  g_ref, u_ref, idx_ref, gs_ref, us_ref, z_ref, *, t, f, k, num_valid, cfg, interpret
):
  def emit(rows_b, cols_b, valid, g, sel, pos, off):
    del off
    u = pltriton.load(u_ref.at[rows_b, cols_b], mask=valid, other=0)
    z = jnp.where(sel, silu_mul(g, u, z_ref.dtype), jnp.zeros((), z_ref.dtype))
    tu.scatter_store(z_ref, rows_b, cols_b, z, valid, interpret)
    tu.scatter_store(idx_ref, rows_b, pos, cols_b.astype(idx_ref.dtype), sel, interpret)
    tu.scatter_store(gs_ref, rows_b, pos, g, sel, interpret)
    tu.scatter_store(us_ref, rows_b, pos, u, sel, interpret)

  topk.select_rows(
    g_ref, t=t, f=f, k=k, cfg=cfg, interpret=interpret, on_chunk=emit, num_valid=num_valid
  )


def _pick_lane(x, lane, which):
  """x at lane `which` per group: (R, BG, 8) -> (R, BG, 1), bit-exact (signed zeros too)."""
  bits = tu.key_bits(x.dtype)
  itype = jnp.int16 if bits == 16 else jnp.int32
  xb = jax.lax.bitcast_convert_type(x, itype).astype(jnp.int32)
  picked = jnp.max(jnp.where(lane == which, xb, jnp.iinfo(jnp.int32).min), axis=2, keepdims=True)
  return jax.lax.bitcast_convert_type(picked.astype(itype), x.dtype)


def _forward_group_kernel(
  g_ref, u_ref, idx_ref, gs_ref, us_ref, z_ref, *, t, f, rows, num_valid, interpret
):
  def emit(rows_b, cols_b, valid, g, lane, row_g, base_g, ok_g, a, b, val_a, val_b):
    u = pltriton.load(u_ref.at[rows_b, cols_b], mask=valid, other=0)
    sel = (lane == a) | (lane == b)
    z = jnp.where(sel, silu_mul(g, u, z_ref.dtype), jnp.zeros((), z_ref.dtype))
    tu.scatter_store(z_ref, rows_b, cols_b, z, valid, interpret)
    for j, (lane_j, val) in enumerate(((a, val_a), (b, val_b))):
      slot = (base_g // GROUP) * PER_GROUP + j
      col = (base_g + lane_j).astype(idx_ref.dtype)
      tu.scatter_store(idx_ref, row_g, slot, col, ok_g, interpret)
      tu.scatter_store(gs_ref, row_g, slot, val, ok_g, interpret)
      tu.scatter_store(us_ref, row_g, slot, _pick_lane(u, lane, lane_j), ok_g, interpret)

  topk.group_rows(g_ref, t=t, f=f, rows=rows, on_group=emit, num_valid=num_valid)


def train_forward_epilogue(
  g_TxF: jax.Array,
  u_TxF: jax.Array,
  k: int,
  variant: str = "moc",
  *,
  num_valid: int | None = None,
  config: TopKConfig | None = None,
  interpret: bool | None = None,
  idx_dtype=jnp.int32,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(idx_TxK ascending, g_sel_TxK, u_sel_TxK, z_TxF): see the reference.

  idx is int32 like the reference unless `idx_dtype` (e.g. uint16, as stored) says otherwise.
  The default config (`forward_config`) is picked here, outside the jit (see `topk.select`).
  """
  cfg = config or forward_config(g_TxF.shape[-1])
  kw = dict(num_valid=num_valid, cfg=cfg, interpret=interpret, idx_dtype=idx_dtype)
  return _train_forward_epilogue(g_TxF, u_TxF, k, variant, **kw)


@functools.partial(
  jax.jit, static_argnames=("k", "variant", "num_valid", "cfg", "interpret", "idx_dtype")
)
def _train_forward_epilogue(g_TxF, u_TxF, k, variant, *, num_valid, cfg, interpret, idx_dtype):
  *lead, f = g_TxF.shape
  interpret = tu.default_interpret(interpret)
  g2, u2 = g_TxF.reshape(-1, f), u_TxF.reshape(-1, f)
  k, nv = checked_selection(f, k, variant, num_valid)
  if cfg.compact and f >= topk_compact.WORD:  # two kernels: selection bitmask, streaming pass
    inner = dataclasses.replace(cfg, compact=False)
    mask = topk_compact.mask_call(g2, k, variant, inner, interpret, num_valid=nv)
    outs = apply_call(
      mask, g2, u2, k, num_valid=nv, cfg=cfg, interpret=interpret, idx_dtype=idx_dtype
    )
  else:
    outs = _forward_call(g2, u2, k, variant, nv, cfg, interpret, idx_dtype)
  idx, gs, us, z = outs
  return idx.reshape(*lead, k), gs.reshape(*lead, k), us.reshape(*lead, k), z.reshape(*lead, f)


def _forward_call(g2, u2, k, variant, nv, cfg, interpret, idx_dtype):
  """The one-kernel forward: selection, U loads and Z / residual stores in one pass."""
  t, f = g2.shape
  if variant == "moc_2of8":
    rows = topk.group_program_rows(cfg, f)
    kernel = functools.partial(
      _forward_group_kernel, t=t, f=f, rows=rows, num_valid=nv, interpret=interpret
    )
  else:
    rows = cfg.rows
    kernel = functools.partial(
      _forward_kernel, t=t, f=f, k=k, num_valid=nv, cfg=cfg, interpret=interpret
    )
  return pl.pallas_call(
    kernel,
    out_shape=(
      jax.ShapeDtypeStruct((t, k), idx_dtype),
      jax.ShapeDtypeStruct((t, k), g2.dtype),
      jax.ShapeDtypeStruct((t, k), u2.dtype),
      jax.ShapeDtypeStruct((t, f), u2.dtype),
    ),
    grid=(pl.cdiv(t, rows),),
    interpret=interpret,
    compiler_params=None if interpret else tu.compiler_params(cfg.num_warps),
    name=f"moc_train_fwd_{variant}",
  )(g2, u2)


def _backward_kernel(
  dz_ref, idx_ref, gs_ref, us_ref, *rest, t, f, k, rows, granule, strided, has_z, interpret
):
  if has_z:
    zs_ref, dg_ref, du_ref, z_ref = rest
  else:
    zs_ref, (dg_ref, du_ref, z_ref) = None, rest
  row_r1 = pl.program_id(0) * rows + jnp.arange(rows, dtype=jnp.int32)[:, None]
  row_ok = row_r1 < t
  out_dtype = dg_ref.dtype
  for off, w in tu.pow2_chunks(f, granule):
    rows_b = jnp.broadcast_to(row_r1, (rows, w))
    cols_b = jnp.broadcast_to(off + jnp.arange(w, dtype=jnp.int32)[None, :], (rows, w))
    valid = row_ok & (cols_b < f)
    for ref in (dg_ref, du_ref, z_ref):
      tu.scatter_store(ref, rows_b, cols_b, jnp.zeros((rows, w), ref.dtype), valid, interpret)
  # Zero-fill and scatter touch the same addresses from different threads.
  if not interpret:  # interpret mode runs the program sequentially
    pltriton.debug_barrier()
  for off, w in tu.pow2_chunks(k, min(granule, tu.next_pow2(k))):
    rows_b = jnp.broadcast_to(row_r1, (rows, w))
    slot_1 = tu.lane_iota(off, w, interpret, hide=strided)
    slot_b = jnp.broadcast_to(slot_1[None, :], (rows, w))
    valid = row_ok & (slot_b < k)
    idx = pltriton.load(idx_ref.at[rows_b, slot_b], mask=valid, other=0).astype(jnp.int32)
    g_raw = pltriton.load(gs_ref.at[rows_b, slot_b], mask=valid, other=0)
    u_raw = pltriton.load(us_ref.at[rows_b, slot_b], mask=valid, other=0)
    if has_z:
      z = pltriton.load(zs_ref.at[rows_b, slot_b], mask=valid, other=0)
    else:
      z = silu_mul(g_raw, u_raw, z_ref.dtype)
    g, u = g_raw.astype(jnp.float32), u_raw.astype(jnp.float32)
    dz = pltriton.load(dz_ref.at[rows_b, idx], mask=valid, other=0).astype(jnp.float32)
    s = jax.nn.sigmoid(g)
    du = dz * (g * s)
    dg = dz * u * (s * (1.0 + g * (1.0 - s)))
    tu.scatter_store(dg_ref, rows_b, idx, dg.astype(out_dtype), valid, interpret)
    tu.scatter_store(du_ref, rows_b, idx, du.astype(out_dtype), valid, interpret)
    tu.scatter_store(z_ref, rows_b, idx, z.astype(z_ref.dtype), valid, interpret)


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def train_backward_epilogue(
  dz_TxF: jax.Array,
  idx_TxK: jax.Array,
  g_sel_TxK: jax.Array,
  u_sel_TxK: jax.Array,
  z_sel_TxK: jax.Array | None = None,
  *,
  config: BackwardConfig | None = None,
  interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dg_TxF, du_TxF in dz's dtype, z_TxF in z_sel's / u_sel's dtype), zero-filled."""
  cfg = config or BackwardConfig()
  interpret = tu.default_interpret(interpret)
  *lead, f = dz_TxF.shape
  k = idx_TxK.shape[-1]
  dz2 = dz_TxF.reshape(-1, f)
  t = dz2.shape[0]
  has_z = z_sel_TxK is not None
  z_dtype = (z_sel_TxK if has_z else u_sel_TxK).dtype
  kernel = functools.partial(
    _backward_kernel,
    t=t,
    f=f,
    k=k,
    rows=cfg.rows,
    granule=cfg.granule,
    strided=cfg.strided,
    has_z=has_z,
    interpret=interpret,
  )
  compact = [x.reshape(-1, k) for x in (idx_TxK, g_sel_TxK, u_sel_TxK)]
  if has_z:
    compact.append(z_sel_TxK.reshape(-1, k))
  dg, du, z = pl.pallas_call(
    kernel,
    out_shape=(
      jax.ShapeDtypeStruct((t, f), dz2.dtype),
      jax.ShapeDtypeStruct((t, f), dz2.dtype),
      jax.ShapeDtypeStruct((t, f), z_dtype),
    ),
    grid=(pl.cdiv(t, cfg.rows),),
    interpret=interpret,
    compiler_params=None if interpret else tu.compiler_params(cfg.num_warps),
    name="moc_train_bwd",
  )(dz2, *compact)
  return dg.reshape(*lead, f), du.reshape(*lead, f), z.reshape(*lead, f)
