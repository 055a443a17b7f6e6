"""Pure-jnp references for every MoC kernel.

These define the semantics the Pallas kernels must match bit-for-bit in selection and to
rounding in values. They are also the `xla` backend: always available, on any device.

Shapes use suffixes: T tokens, F channels (d_ff), K selected channels, D model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GROUP = 8  # moc_2of8: groups of 8 consecutive channels
PER_GROUP = 2  # ... of which the top 2 are kept


def index_dtype(num_channels: int) -> jnp.dtype:
  """The narrowest integer type that holds a channel index (uint16 for F < 65536)."""
  return jnp.uint16 if num_channels <= 65536 else jnp.int32


def topk_select(g_TxF: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Per row, the k largest *signed* values; ties go to the lower channel index.

  Returns (idx_TxK int32 sorted ascending by channel, val_TxK in g's dtype).
  """
  num_channels = g_TxF.shape[-1]
  if not 0 < k <= num_channels:
    raise ValueError(f"k must be in [1, {num_channels}], got {k}")
  # lax.top_k is stable: among equal values the lower index comes first.
  _, idx_TxK = jax.lax.top_k(g_TxF, k)
  idx_TxK = jnp.sort(idx_TxK, axis=-1).astype(jnp.int32)
  return idx_TxK, jnp.take_along_axis(g_TxF, idx_TxK, axis=-1)


def order_keys(g: jax.Array) -> jax.Array:
  """Unsigned integer image of a float that preserves order (-0.0 sorts just below +0.0)."""
  nbits = jnp.dtype(g.dtype).itemsize * 8
  utype = {16: jnp.uint16, 32: jnp.uint32, 64: jnp.uint64}[nbits]
  bits = jax.lax.bitcast_convert_type(g, utype)
  sign_bit = jnp.array(1 << (nbits - 1), utype)
  return jnp.where(bits & sign_bit, ~bits, bits | sign_bit)


def kth_largest_key(keys_TxF: jax.Array, k: int, axis_name: str | None = None) -> jax.Array:
  """Per row, the k-th largest key, by bisection over its bits (one counting pass per bit).

  With `axis_name` (inside shard_map) the row is split over that mesh axis: each pass's (T,)
  counts are summed across it, so every shard finds the same global threshold.
  """
  nbits = jnp.dtype(keys_TxF.dtype).itemsize * 8
  utype = keys_TxF.dtype

  def body(i, tau_T):
    bit = jnp.array(1, utype) << (nbits - 1 - i).astype(utype)
    cand_T = tau_T | bit
    count_T = jnp.sum(keys_TxF >= cand_T[:, None], axis=-1, dtype=jnp.int32)
    if axis_name is not None:
      count_T = jax.lax.psum(count_T, axis_name)
    return jnp.where(count_T >= k, cand_T, tau_T)

  return jax.lax.fori_loop(0, nbits, body, jnp.zeros(keys_TxF.shape[:-1], utype))


def topk_mask(g_TxF: jax.Array, k: int) -> jax.Array:
  """Boolean mask of the exact top-k per row (ties to the lower index), without sorting."""
  keys = order_keys(g_TxF)
  tau_T1 = kth_largest_key(keys, k)[:, None]
  above = keys > tau_T1
  at = keys == tau_T1
  room_T1 = k - jnp.sum(above, axis=-1, keepdims=True, dtype=jnp.int32)
  return above | (at & (jnp.cumsum(at, axis=-1, dtype=jnp.int32) <= room_T1))


def mask_to_indices(mask_TxF: jax.Array, k: int) -> jax.Array:
  """Ascending channel indices of the k set entries of each row (no sort, no scatter)."""
  rank_TxF = jnp.cumsum(mask_TxF, axis=-1, dtype=jnp.int32)
  slots_K = jnp.arange(1, k + 1, dtype=jnp.int32)
  find = lambda rank_F: jnp.searchsorted(rank_F, slots_K, side="left")
  return jax.vmap(find)(rank_TxF).astype(jnp.int32)


def group_mask(g_TxF: jax.Array) -> jax.Array:
  """moc_2of8 mask: a channel is kept if fewer than 2 in its group beat it (ties: lower index)."""
  *lead, num_channels = g_TxF.shape
  if num_channels % GROUP:
    raise ValueError(f"moc_2of8 needs F divisible by {GROUP}, got F={num_channels}")
  k_Gx8 = order_keys(g_TxF).reshape(*lead, num_channels // GROUP, GROUP)
  mine, other = k_Gx8[..., :, None], k_Gx8[..., None, :]
  lower_8x8 = jnp.arange(GROUP)[None, :] < jnp.arange(GROUP)[:, None]  # other index < mine
  beats = (other > mine) | ((other == mine) & lower_8x8)
  rank = jnp.sum(beats, axis=-1, dtype=jnp.int32)
  return (rank < PER_GROUP).reshape(*lead, num_channels)


def group_select(g_TxF: jax.Array) -> tuple[jax.Array, jax.Array]:
  """moc_2of8: the top 2 of every 8 consecutive channels (ties to the lower index).

  Returns (idx_TxK int32 ascending, val_TxK) with K = F // 4.
  """
  *lead, num_channels = g_TxF.shape
  if num_channels % GROUP:
    raise ValueError(f"moc_2of8 needs F divisible by {GROUP}, got F={num_channels}")
  g_TxGx8 = g_TxF.reshape(*lead, num_channels // GROUP, GROUP)
  _, local_TxGx2 = jax.lax.top_k(g_TxGx8, PER_GROUP)
  local_TxGx2 = jnp.sort(local_TxGx2, axis=-1)
  base_G = jnp.arange(num_channels // GROUP, dtype=jnp.int32) * GROUP
  idx_TxK = (local_TxGx2.astype(jnp.int32) + base_G[:, None]).reshape(*lead, -1)
  return idx_TxK, jnp.take_along_axis(g_TxF, idx_TxK, axis=-1)


def select_mask(g_TxF: jax.Array, k: int, variant: str) -> jax.Array:
  """The selection as a (T, F) boolean mask ('moc' or 'moc_2of8')."""
  if variant == "moc":
    return topk_mask(g_TxF, k)
  if variant == "moc_2of8":
    return group_mask(g_TxF)
  raise ValueError(f"unknown MoC variant {variant!r}; expected 'moc' or 'moc_2of8'")


def select(g_TxF: jax.Array, k: int, variant: str) -> tuple[jax.Array, jax.Array]:
  """(idx_TxK ascending, val_TxK) for the MoC variant; sort-free (the `xla` backend)."""
  num_channels = g_TxF.shape[-1]
  if variant == "moc" and not 0 < k <= num_channels:
    raise ValueError(f"k must be in [1, {num_channels}], got {k}")
  if variant == "moc_2of8":
    k = num_channels // GROUP * PER_GROUP
  idx = mask_to_indices(select_mask(g_TxF, k, variant), k)
  return idx, jnp.take_along_axis(g_TxF, idx, axis=-1)


def scatter_rows(val_TxK: jax.Array, idx_TxK: jax.Array, num_channels: int) -> jax.Array:
  """Zero-filled (T, F) array holding val at idx: the inverse of take_along_axis.

  The zero fill is derived from `val` (0 * its first column) rather than a constant: a constant
  fill depends on nothing, and XLA then schedules it (and its copy) at program start, keeping a
  (T, F) buffer alive across every layer of the forward.
  """
  *lead, k = val_TxK.shape
  flat_val = val_TxK.reshape(-1, k)
  flat_idx = idx_TxK.reshape(-1, k).astype(jnp.int32)
  rows = jnp.arange(flat_val.shape[0], dtype=jnp.int32)[:, None]
  out = jnp.broadcast_to(flat_val[:, :1] * 0, (flat_val.shape[0], num_channels))
  out = out.at[rows, flat_idx].set(flat_val, unique_indices=True, indices_are_sorted=True)
  return out.reshape(*lead, num_channels)


def silu_grad(g: jax.Array) -> jax.Array:
  """d/dg silu(g) = s(g) (1 + g (1 - s(g))), in fp32."""
  g32 = g.astype(jnp.float32)
  s = jax.nn.sigmoid(g32)
  return s * (1.0 + g32 * (1.0 - s))


def mask_padding(g_TxF: jax.Array, num_valid: int | None) -> jax.Array:
  """Channels at or past `num_valid` (F padding) get the lowest finite value: never selected
  (while K <= num_valid), and silu of it is exactly 0."""
  if num_valid is None or num_valid >= g_TxF.shape[-1]:
    return g_TxF
  valid_F = jnp.arange(g_TxF.shape[-1]) < num_valid
  return jnp.where(valid_F, g_TxF, jnp.finfo(g_TxF.dtype).min)


def train_forward_epilogue(
  g_TxF: jax.Array,
  u_TxF: jax.Array,
  k: int,
  variant: str,
  *,
  num_valid: int | None = None,
  idx_dtype=jnp.int32,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """From the gate and up projections to what the forward needs and keeps.

  Channels at or past `num_valid` are F padding and never selected ('moc'; for 'moc_2of8'
  whole padded groups select zeros). Returns (idx_TxK int32, g_sel_TxK, u_sel_TxK, z_TxF)
  where z is the zero-filled silu(G)*U on the selected channels, ready for the down GEMM.
  """
  g_TxF = mask_padding(g_TxF, num_valid)
  if variant == "moc_2of8":
    k = g_TxF.shape[-1] // GROUP * PER_GROUP
  mask_TxF = select_mask(g_TxF, k, variant)
  idx_TxK = mask_to_indices(mask_TxF, k)
  g_sel = jnp.take_along_axis(g_TxF, idx_TxK, axis=-1)
  u_sel = jnp.take_along_axis(u_TxF, idx_TxK, axis=-1)
  z_TxF = jnp.where(mask_TxF, silu_and_mul(g_TxF, u_TxF), jnp.zeros((), u_TxF.dtype))
  return idx_TxK.astype(idx_dtype), g_sel, u_sel, z_TxF


def silu_and_mul(g_sel: jax.Array, u_sel: jax.Array) -> jax.Array:
  """silu(g) * u in fp32, rounded once to u's dtype."""
  return (jax.nn.silu(g_sel.astype(jnp.float32)) * u_sel.astype(jnp.float32)).astype(u_sel.dtype)


def train_backward_epilogue(
  dz_TxF: jax.Array,
  idx_TxK: jax.Array,
  g_sel_TxK: jax.Array,
  u_sel_TxK: jax.Array,
  z_sel_TxK: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """From dZ = dy @ Wd^T to the zero-filled dG, dU and Z (DESIGN.md §1).

  idx may be any integer dtype (uint16 as stored). Z (for dWd = Z^T dy) is scattered from
  z_sel when kept, else recomputed from G_sel, U_sel (GCP): bit-identical either way.
  Unselected channels get exactly zero. Math in fp32, outputs in dz's dtype.
  """
  if z_sel_TxK is None:
    z_sel_TxK = silu_and_mul(g_sel_TxK, u_sel_TxK)
  z_TxF = scatter_rows(z_sel_TxK, idx_TxK, dz_TxF.shape[-1])
  dg_TxF, du_TxF = _backward_gradients(dz_TxF, idx_TxK, g_sel_TxK, u_sel_TxK)
  return dg_TxF, du_TxF, z_TxF


def _backward_gradients(dz_TxF, idx_TxK, g_sel_TxK, u_sel_TxK):
  num_channels = dz_TxF.shape[-1]
  dz_sel = jnp.take_along_axis(dz_TxF, idx_TxK.astype(jnp.int32), axis=-1).astype(jnp.float32)
  g32 = g_sel_TxK.astype(jnp.float32)
  du_sel = dz_sel * jax.nn.silu(g32)
  dg_sel = dz_sel * u_sel_TxK.astype(jnp.float32) * silu_grad(g32)
  out_dtype = dz_TxF.dtype
  return (
    scatter_rows(dg_sel.astype(out_dtype), idx_TxK, num_channels),
    scatter_rows(du_sel.astype(out_dtype), idx_TxK, num_channels),
  )


def decode_ffn(
  x_TxD: jax.Array,
  w_gate_DxF: jax.Array,
  w_up_FxD: jax.Array,
  w_down_FxD: jax.Array,
  k: int,
  variant: str,
  *,
  warm: jax.Array | None = None,
) -> jax.Array:
  """MoC FFN for a few tokens with channel-major up/down weights (F, D).

  Reads all of Wg, then only the selected rows of Wu^T and Wd. fp32 accumulation. `warm` (a
  weight for the kernels to read into L2 on the side) does not change y and is unused here.
  """
  del warm
  g_TxF = jnp.dot(x_TxD, w_gate_DxF, preferred_element_type=jnp.float32).astype(x_TxD.dtype)
  idx_TxK, g_sel = select(g_TxF, k, variant)
  wu_TxKxD = jnp.take(w_up_FxD, idx_TxK, axis=0)
  wd_TxKxD = jnp.take(w_down_FxD, idx_TxK, axis=0)
  u_sel = jnp.einsum("td,tkd->tk", x_TxD, wu_TxKxD, preferred_element_type=jnp.float32)
  z_sel = jax.nn.silu(g_sel.astype(jnp.float32)) * u_sel
  y = jnp.einsum(
    "tk,tkd->td", z_sel.astype(x_TxD.dtype), wd_TxKxD, preferred_element_type=jnp.float32
  )
  return y.astype(x_TxD.dtype)


def dense_decode_ffn(
  x_TxD: jax.Array, w_gate_DxF: jax.Array, w_up_DxF: jax.Array, w_down_FxD: jax.Array
) -> jax.Array:
  """Dense SwiGLU for a few tokens: fp32 G and U, z = silu(G) U rounded to x's dtype."""
  g = jnp.dot(x_TxD, w_gate_DxF, preferred_element_type=jnp.float32)
  u = jnp.dot(x_TxD, w_up_DxF, preferred_element_type=jnp.float32)
  z = (jax.nn.silu(g) * u).astype(x_TxD.dtype)
  return jnp.dot(z, w_down_FxD, preferred_element_type=jnp.float32).astype(x_TxD.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """`model.RMSNorm`'s arithmetic: fp32 x · rsqrt(mean(x²) + eps) · scale, in x's dtype."""
  x32 = x.astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * inv_rms * scale.astype(jnp.float32)).astype(x.dtype)


def linear(x_TxD: jax.Array, w_DxN: jax.Array, out_dtype=None) -> jax.Array:
  """y = x W with fp32 accumulation, cast to out_dtype (default x's); fp32 inputs as IEEE fp32."""
  f32 = x_TxD.dtype == jnp.float32 and w_DxN.dtype == jnp.float32
  precision = jax.lax.Precision.HIGHEST if f32 else None
  y = jnp.dot(x_TxD, w_DxN, preferred_element_type=jnp.float32, precision=precision)
  return y.astype(x_TxD.dtype if out_dtype is None else out_dtype)
