"""The train forward's streaming pass as a Mosaic GPU kernel: from the selection's words and
(G, U) to the zero-filled Z and the compact G_sel, U_sel (and Z_sel, the channels).

Why: the Triton pass (`_apply_gather`) took ~290 µs at the 1B layer shape on an H200, where
its bytes (G and U read, Z and the compact rows written) need ~165 at copy bandwidth, and at
the 60m shape it is launch- and occupancy-bound (~90-100 µs against XLA's 51 for silu(G)·U).
With the selection it is where MoC's forward loses to dense's (NOTES_kernels 2026-12-05e).

Each CTA's next [G | U] row arrives by bulk async copy into shared memory while it works on
the current one (`_mgpu_stream.RowStream`); per row Z's row is zeroed, then for each selected
key (channel c, slot s; every thread ceil(K / 128) of them) the walk reads g, u from the row,
computes z = silu(g)·u, and stores z at Z[c] and g, u (z, c) at slot s; the rows go out by
TMA. Only the K selected keys are computed (1 in 5 channels at the 1B shape). Silu is the PTX
the Triton epilogues compile to (`_mgpu_stream.silu_mul_ptx`): Z equals theirs bit for bit
on the GPU (H100, 2026-12-05o).

On an H100 (NOTES_kernels 2026-12-05o) the pass took 272 vs 338 µs at the 1B layer, and the
same walk inside the select (`in_select`) the selection and pass 275 vs 461: the default
`TopKConfig.apply_mode='auto'` takes `in_select` on the fused buffer, this pass after another
selection (2:8) there; split G, U only as 'mgpu' (not yet compiled on a GPU).
"""

from __future__ import annotations

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import _mgpu_stream as stream
from pallas_kernels import _triton_utils as tu
from pallas_kernels._mgpu_ptx import BINS

WHAT = "forward pass"


def forward_key(f: int, dtype, z_sel: bool, idx_bytes: int, num_valid: int | None = None) -> str:
  """The walk's work per selected key (channel c, slot s): g, u from the [G | U] row ($4; U
  2F bytes on), z = silu(g)·u to Z's row ($5) at c, g, u to G_sel, U_sel ($6, $7) at s, then
  z to Z_sel and c to the channels (the next operands) where asked. Channels from num_valid
  on take G as the selection saw it, the lowest finite value (`as_selected`: 2:8 can select
  whole padding groups)."""
  low = "0xFF7F" if jnp.dtype(dtype) == jnp.bfloat16 else "0xFBFF"
  pad = "" if num_valid is None else f" setp.ge.u32 q, c, {num_valid}; @q mov.b16 gh, {low};"
  text = (
    f"mad.lo.u32 a, c, 2, $4; ld.shared.b16 gh, [a]; ld.shared.b16 uh, [a+{2 * f}];{pad}\n"
    f"{stream.silu_mul_ptx(dtype)}\n"
    "mad.lo.u32 a, c, 2, $5; st.shared.b16 [a], zh;\n"
    "mad.lo.u32 a, s, 2, $6; st.shared.b16 [a], gh; mad.lo.u32 a, s, 2, $7; st.shared.b16 [a], uh;"
  )
  n = 8
  if z_sel:
    text += f"\nmad.lo.u32 a, s, 2, ${n}; st.shared.b16 [a], zh;"
    n += 1
  if idx_bytes:
    text += f"\nmad.lo.u32 a, s, {idx_bytes}, ${n}; st.shared.b{8 * idx_bytes} [a], c;"
  return text


def forward_in_jnp(row, words, f: int, k: int, z_sel: bool, num_valid, z_ref, compact_refs):
  """What a row's fill and walk write (`forward_key`), as jnp (interpret mode): row is the
  [G | U] row, words its bins array; Z's row to z_ref, the K-long rows to compact_refs
  (g_sel, u_sel[, z_sel][, idx])."""
  from pallas_kernels.moc_train_mask import as_selected, silu_mul

  chan, sel, at = stream.words_in_jnp(words, f, k)
  g, u = as_selected(row[:f], chan, num_valid), row[f:]
  z = jnp.where(sel, silu_mul(g, u, row.dtype), jnp.zeros((), row.dtype))
  z_ref[...] = z
  values = [g, u] + ([z] if z_sel else []) + [chan]  # the key's order; chan only with idx
  for ref, value in zip(compact_refs, values, strict=False):
    ref[...] = jnp.zeros_like(ref[...]).at[at].set(value.astype(ref.dtype), mode="drop")


def smem_bytes(f: int, k: int, z_sel: bool, idx_bytes: int, dtype=jnp.bfloat16) -> int:
  """A CTA's shared memory: two [G | U] rows, Z's row, the K-long rows, the loop's."""
  e = jnp.dtype(dtype).itemsize
  compact = [k * e] * (2 + z_sel) + ([k * idx_bytes] if idx_bytes else [])
  return stream.smem(4 * f * e, f * e, *compact, *stream.STREAM_SMEM)


def check(f: int, k: int, dtype, idx_dtype=None) -> None:
  """Raises on what the kernel cannot take."""
  stream.check(WHAT, f, k, dtype)
  if idx_dtype is not None and jnp.dtype(idx_dtype) not in (jnp.int16, jnp.int32):
    raise ValueError(f"the channels out are int16 or int32, got {idx_dtype}")


def kernel(
  t: int,
  f: int,
  k: int,
  ctas: int,
  dtype,
  *,
  fused: bool,
  idx_dtype=None,
  z_sel: bool = False,
  num_valid: int | None = None,
  interpret: bool = False,
):
  """(T, F/32) int32 words with K set bits a row, and the (T, 2F) [G | U] buffer (fused) or
  (T, F) G and U, to ([idx,] g_sel, u_sel, z[, z_sel]) as `moc_train_mask.apply_call` gives
  them: Z (T, F) zero off the selection, the others (T, K) in channel order."""
  check(f, k, dtype, idx_dtype)
  if not 0 < ctas <= t or (interpret and ctas != 1):
    raise ValueError(f"need 0 < ctas <= T (1 in interpret mode), got {ctas} for T={t}")
  idx_bytes = 0 if idx_dtype is None else jnp.dtype(idx_dtype).itemsize
  n_compact = 2 + z_sel + bool(idx_bytes)  # g_sel, u_sel[, z_sel][, idx]: the key's order
  key = forward_key(f, dtype, z_sel, idx_bytes, num_valid)
  rows = stream.RowStream(
    t, f, k, ctas, interpret, key, 2 + n_compact, f * jnp.dtype(dtype).itemsize
  )

  def body(words_gmem, g_gmem, *refs):
    u_gmem, refs = (None, refs) if fused else (refs[0], refs[1:])
    n_out = 3 + z_sel + bool(idx_bytes)
    outs, (rows_ref, z_ref, arrived, *refs) = refs[:n_out], refs[n_out:]
    compact_refs, loop_refs = refs[:n_compact], refs[n_compact:]
    idx_out, outs = (outs[0], outs[1:]) if idx_bytes else (None, outs)
    gs_out, us_out, z_out, *zs_out = outs
    copies = [(z_ref, z_out), (compact_refs[0], gs_out), (compact_refs[1], us_out)]
    copies += [(compact_refs[2], zs_out[0])] if z_sel else []
    copies += [(compact_refs[-1], idx_out)] if idx_bytes else []

    def fetch(r, slot) -> None:
      """rows[slot] = [G | U] row r, by bulk async copies (one from the fused buffer)."""
      if fused:
        rows.copy_in(g_gmem.at[r, pl.ds(0, 2 * f)], rows_ref.at[slot], arrived, slot)
        return
      for n, src in enumerate((g_gmem, u_gmem)):
        rows.copy_in(src.at[r, pl.ds(0, f)], rows_ref.at[slot, pl.ds(n * f, f)], arrived, slot)

    def row_in_jnp(r, slot, words) -> None:
      forward_in_jnp(rows_ref[slot], words, f, k, z_sel, num_valid, z_ref, compact_refs)

    rows.run(
      words_gmem,
      loop_refs,
      fetch=fetch,
      arrived=arrived,
      fill_ref=z_ref,
      walk_refs=lambda slot: (rows_ref.at[slot], z_ref, *compact_refs),
      row_in_jnp=row_in_jnp,
      copies=copies,
    )

  compact = lambda dt: jax.ShapeDtypeStruct((t, k), dt)
  out_type = [compact(dtype), compact(dtype), jax.ShapeDtypeStruct((t, f), dtype)]
  out_type = ([compact(idx_dtype)] if idx_bytes else []) + out_type
  out_type += [compact(dtype)] if z_sel else []
  arrived = rows.arrived(1 if fused else 2)  # one arrival per copy into a slot
  scratch = [plgpu.SMEM((2, 2 * f), dtype), plgpu.SMEM((f,), dtype), arrived]  # [G | U] rows, Z
  scratch += [plgpu.SMEM((k,), dtype)] * (2 + z_sel)  # g_sel, u_sel[, z_sel]
  scratch += [plgpu.SMEM((k,), idx_dtype)] if idx_bytes else []
  return rows.kernel(body, out_type, scratch, "moc_forward_pass")


def apply(
  words_TxW: jax.Array,
  g2: jax.Array,
  u2: jax.Array | None,
  k: int,
  *,
  idx_dtype=None,
  z_sel: bool = False,
  num_valid: int | None = None,
  interpret: bool | None = None,
  ctas: int | None = None,
) -> tuple[jax.Array, ...]:
  """`moc_train_mask.apply_call`'s ([idx,] g_sel, u_sel, z[, z_sel]) by this kernel. u2 None:
  g2 is the (T, 2F) [G | U] buffer of one fused GEMM. Every row's words must hold exactly K
  set bits (the selection's contract)."""
  fused = u2 is None
  t, f = g2.shape[0], g2.shape[1] // 2 if fused else g2.shape[1]
  if not fused and u2.dtype != g2.dtype:
    raise ValueError(
      f"the Mosaic GPU {WHAT} takes G and U of one dtype, got {g2.dtype}, {u2.dtype}"
    )
  check(f, k, g2.dtype, idx_dtype)
  interpret = tu.default_interpret(interpret)
  idx_bytes = 0 if idx_dtype is None else jnp.dtype(idx_dtype).itemsize
  n = stream.ctas_for(t, smem_bytes(f, k, z_sel, idx_bytes, g2.dtype), interpret, ctas)
  kw = dict(fused=fused, idx_dtype=idx_dtype, z_sel=z_sel, num_valid=num_valid)
  build = kernel(t, f, k, n, g2.dtype, interpret=interpret, **kw)
  return tuple(build(words_TxW, g2, *(() if fused else (u2,))))


def select_forward_row(ops, f: int, k: int, dtype, z_sel: bool, num_valid: int | None):
  """`mgpu_select.kernel(forward=True)`'s step after a row's words, with the select's
  `SelectOps`: forward_row(r, words, row_ref, tmp_ref, words_ref, first_ref, outs, out_refs)
  writes Z's row and G_sel, U_sel (Z_sel) from the [G | U] row in shared memory (`outs`:
  g_sel, u_sel, z[, z_sel]) and copies them out."""
  e = jnp.dtype(dtype).itemsize
  if not ops.interpret:
    key = forward_key(f, dtype, z_sel, 0, num_valid)
    write = stream.fill_and_walk(ops.bin_layout, k, key, 4 + z_sel, f * e)

  def forward_row(r, words, row_ref, tmp_ref, words_ref, first_ref, outs, out_refs) -> None:
    gs, us, z, *zs = outs
    if ops.interpret:
      forward_in_jnp(row_ref[...], words, f, k, z_sel, num_valid, z, [gs, us, *zs])
    else:
      first = ops.exclusive_prefix(ops.popcount(words), tmp_ref, 24)
      write(first, words_ref, first_ref, z, row_ref, z, gs, us, *zs)
    ops.commit()
    for src, dst in zip(outs, out_refs, strict=True):
      ops.copy_out(src, dst.at[r])

  return forward_row


def in_select(
  gu_Tx2F: jax.Array,
  k: int,
  *,
  num_valid: int | None = None,
  z_sel: bool = False,
  interpret: bool | None = None,
  ctas: int | None = None,
) -> tuple[jax.Array, ...]:
  """`moc_train_mask.train_forward_bitmask`'s (words, g_sel, u_sel, z[, z_sel]) for 'moc' from
  the (T, 2F) [G | U] buffer in one kernel: the Mosaic select writes the words, then this
  pass's outputs from the row it holds (`mgpu_select.kernel(forward=True)`). As many CTAs
  an SM as shared memory holds, at most the select's 8."""
  from pallas_kernels import mgpu_select

  t, f = gu_Tx2F.shape[0], gu_Tx2F.shape[1] // 2
  check(f, k, gu_Tx2F.dtype)
  interpret = tu.default_interpret(interpret)
  e = jnp.dtype(gu_Tx2F.dtype).itemsize
  select = [(BINS + 8) * 4] * 2 + [BINS * 4] * 2 + [32 * 4, 16]  # histograms, words, scan, stash
  per_cta = stream.smem(4 * f * e, f * e, *[k * e] * (2 + z_sel), *select)
  n = stream.ctas_for(t, per_cta, interpret, ctas)
  kw = dict(async_rows=True, round_dtype=gu_Tx2F.dtype, forward=True, z_sel=z_sel)
  build = mgpu_select.kernel(t, f, k, n, num_valid, interpret=interpret, **kw)
  return tuple(build(gu_Tx2F))
