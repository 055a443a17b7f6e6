"""The train backward's streaming pass as a Mosaic GPU kernel: from dZ = dy·Wdᵀ, the selection's
words and the compact residuals (G_sel, U_sel, Z_sel or none) to the zero-filled dG, dU and Z.

Why: the Triton block walk (`moc_train_mask._backward_kernel`) took ~342 µs at the 1B layer
shape on an H200 where its bytes (dZ and the K-long rows read, dG, dU and Z written) need ~210
at copy bandwidth (NOTES_kernels 2026-12-01/02), and it computes silu' at every channel.

Each CTA's next row (dZ, G_sel, U_sel[, Z_sel]) arrives by bulk async copy into shared memory
while it works on the current one (`_mgpu_stream.RowStream`); per row the [dG | dU | Z] row is
zeroed, then for each selected key (channel c, slot s; every thread ceil(K / 128) of them) the
walk reads dz at c and g, u (z) at s, computes

    s = sigmoid(g),  dU = dz·(g·s),  dG = (dz·u)·(s·(1 + g·(1 - s))),  Z = (s·g)·u (GCP)

in fp32 as `moc_train_mask.backward_values` does and JAX's Triton compiles it
(`_mgpu_stream.sigmoid_ptx`; 1 + g·(1 - s) rounded after the product, not one fma: with the
fma 9 of the 60M shape's 4.2 M selected dG differed by an ulp, without it none; H100,
2026-12-05o), and stores them at c; the rows go out by TMA. `.rn` keeps ptxas from
contracting it.
"""

from __future__ import annotations

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import _mgpu_stream as stream
from pallas_kernels import _triton_utils as tu

WHAT = "backward pass"
K_MULTIPLE = 64  # the K-long rows come in by bulk copy: 128-byte multiples


def backward_key(f: int, k: int, dtype, has_z: bool) -> str:
  """The walk's work per selected key (channel c, slot s): dz at c and g, u (z) at s of the
  row ($4: [dZ | G_sel | U_sel | Z_sel]), then dG, dU, Z to c of [dG | dU | Z] ($5)."""
  kind = "bf16" if jnp.dtype(dtype) == jnp.bfloat16 else "f16"
  z_in = f" ld.shared.b16 zh, [a+{2 * f + 4 * k}];" if has_z else ""
  z = f"cvt.f32.{kind} fy, uh;" if has_z else "mul.f32 fh, fs, fx; " + _times_u(kind)
  return (
    "mad.lo.u32 a, c, 2, $4; ld.shared.b16 dh, [a];\n"
    f"mad.lo.u32 a, s, 2, $4; ld.shared.b16 gh, [a+{2 * f}]; ld.shared.b16 uh, [a+{2 * f + 2 * k}];"
    f"{z_in}\n{stream.sigmoid_ptx(dtype)}\n{z}\n"
    f"cvt.f32.{kind} fd, dh; mul.f32 fh, fs, fx; mul.f32 fh, fh, fd; cvt.rn.{kind}.f32 yh, fh;\n"
    "sub.rn.f32 ft, 0f3F800000, fs; mul.rn.f32 ft, ft, fx; add.rn.f32 ft, ft, 0f3F800000;\n"
    "mul.rn.f32 ft, fs, ft;\n"
    f"mul.f32 fh, fd, fy; mul.f32 fh, fh, ft; cvt.rn.{kind}.f32 xh, fh;\n"
    f"mad.lo.u32 a, c, 2, $5; st.shared.b16 [a], xh; st.shared.b16 [a+{2 * f}], yh;"
    f" st.shared.b16 [a+{4 * f}], zh;"
  )


def _times_u(kind: str) -> str:
  """zh = fh·u rounded (fh = s·g): the end of silu(g)·u, fy = u."""
  return f"cvt.f32.{kind} fy, uh; mul.f32 fh, fh, fy; cvt.rn.{kind}.f32 zh, fh;"


def smem_bytes(f: int, k: int, has_z: bool, dtype=jnp.bfloat16) -> int:
  """A CTA's shared memory: two input rows, the [dG | dU | Z] row, the loop's."""
  e = jnp.dtype(dtype).itemsize
  return stream.smem(2 * (f + (2 + has_z) * k) * e, 3 * f * e, *stream.STREAM_SMEM)


def kernel(
  t: int, f: int, k: int, ctas: int, dtype, *, has_z: bool, fused: bool, interpret: bool = False
):
  """(T, F) dZ, (T, F/32) int32 words with K set bits a row, (T, K) G_sel, U_sel[, Z_sel] to
  ([dG | dU] (T, 2F), Z) (fused) or (dG, dU, Z), each (T, F) zero off the selection."""
  stream.check(WHAT, f, k, dtype, K_MULTIPLE)
  if not 0 < ctas <= t or (interpret and ctas != 1):
    raise ValueError(f"need 0 < ctas <= T (1 in interpret mode), got {ctas} for T={t}")
  width = f + (2 + has_z) * k  # an input row: [dZ | G_sel | U_sel[ | Z_sel]]
  key = backward_key(f, k, dtype, has_z)
  rows = stream.RowStream(t, f, k, ctas, interpret, key, 2, 3 * f * jnp.dtype(dtype).itemsize)

  def body(dz_gmem, words_gmem, *refs):
    n_in = 2 + has_z
    ins, refs = refs[:n_in], refs[n_in:]
    outs, (in_ref, out_ref, arrived, *loop_refs) = refs[: 3 - fused], refs[3 - fused :]
    pieces = [(2 * f, outs[0]), (f, outs[1])] if fused else [(f, o) for o in outs]
    copies, at = [], 0
    for n, dst in pieces:  # [dG | dU | Z] in pieces: one per output
      copies.append((out_ref.at[pl.ds(at, n)], dst))
      at += n

    def fetch(r, slot) -> None:
      """in[slot] = [dZ | G_sel | U_sel[ | Z_sel]] of row r, by bulk async copies."""
      parts = [(dz_gmem, 0, f)] + [(src, f + i * k, k) for i, src in enumerate(ins)]
      for src, start, n in parts:
        rows.copy_in(src.at[r], in_ref.at[slot, pl.ds(start, n)], arrived, slot)

    def row_in_jnp(r, slot, words) -> None:
      from pallas_kernels.moc_train_mask import backward_values

      _, sel, at = stream.words_in_jnp(words, f, k)
      at = jnp.minimum(at, k - 1)  # unselected channels read slot K - 1, then zeroed
      row = in_ref[slot]
      g, u, *z = (row[f + i * k : f + (i + 1) * k][at] for i in range(2 + has_z))
      dg, du, z = backward_values(row[:f], g, u, z[0] if has_z else None, dtype)
      zero = jnp.zeros((), dtype)
      out_ref[...] = jnp.concatenate([jnp.where(sel, v.astype(dtype), zero) for v in (dg, du, z)])

    rows.run(
      words_gmem,
      loop_refs,
      fetch=fetch,
      arrived=arrived,
      fill_ref=out_ref,
      walk_refs=lambda slot: (in_ref.at[slot], out_ref),
      row_in_jnp=row_in_jnp,
      copies=copies,
    )

  outs = [(t, 2 * f), (t, f)] if fused else [(t, f)] * 3
  arrived = rows.arrived(3 + has_z)  # one arrival per copy into a slot
  scratch = [plgpu.SMEM((2, width), dtype), plgpu.SMEM((3 * f,), dtype), arrived]
  out_type = [jax.ShapeDtypeStruct(shape, dtype) for shape in outs]
  return rows.kernel(body, out_type, scratch, "moc_backward_pass")


def backward(
  dz_TxF: jax.Array,
  words_TxW: jax.Array,
  g_sel_TxK: jax.Array,
  u_sel_TxK: jax.Array,
  z_sel_TxK: jax.Array | None = None,
  *,
  fused: bool = False,
  interpret: bool | None = None,
  ctas: int | None = None,
) -> tuple[jax.Array, ...]:
  """`moc_train_mask.train_backward_bitmask`'s outputs by this kernel: (dG, dU, Z) or, fused,
  ([dG | dU], Z). All values one 16-bit dtype; every row's words hold exactly K set bits."""
  has_z = z_sel_TxK is not None
  ks = [g_sel_TxK, u_sel_TxK] + ([z_sel_TxK] if has_z else [])
  dtypes = {a.dtype for a in (dz_TxF, *ks)}
  if len(dtypes) != 1:
    raise ValueError(f"the Mosaic GPU {WHAT} takes one dtype for dZ and the residuals: {dtypes}")
  t, f = dz_TxF.shape
  k = g_sel_TxK.shape[1]
  stream.check(WHAT, f, k, dz_TxF.dtype, K_MULTIPLE)
  interpret = tu.default_interpret(interpret)
  n = stream.ctas_for(t, smem_bytes(f, k, has_z, dz_TxF.dtype), interpret, ctas)
  build = kernel(t, f, k, n, dz_TxF.dtype, has_z=has_z, fused=fused, interpret=interpret)
  return tuple(build(dz_TxF, words_TxW, *ks))
