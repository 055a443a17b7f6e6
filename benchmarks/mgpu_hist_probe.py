"""Probe: one shared-memory radix-histogram pass over each row of G, in Pallas Mosaic GPU.

Why: the Triton selection is instruction-bound (~270 µs at 16384 × 5504, NOTES_kernels.md), and
a radix select with shared-memory histograms (one atomic add per key and 8-bit digit) is how
fast GPU top-K kernels work. Pallas-Triton cannot express those atomics; Mosaic GPU can, through
`plgpu.inline_mgpu` (`red.shared::cta.add.u32` at a per-lane address). This times the first
pass alone (the high byte of each order-preserving 16-bit key: sign and exponent bits) before
anyone builds a whole select that way:

  exact: per-row 256-bin histograms equal to jnp's;
  us: median time per call, beside one XLA read of G (the floor of any pass over G).

`--copies=4` gives each warp its own histogram copy (fewer same-address conflicts: Gaussian rows
put most keys in a handful of high-byte bins). One warpgroup per CTA, rows strided over CTAs.

  python3 benchmarks/mgpu_hist_probe.py [--t=16384 --f=5632 --ctas=1024 --copies=1,4] [--out=F]
  python3 benchmarks/mgpu_hist_probe.py --lower_only   # CPU: lower for CUDA, nothing runs
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm
from jax.experimental.mosaic.gpu import utils as mgpu_utils

from benchmarks import common

BINS = 256
WARPS = 4  # per warpgroup


def _hist_add(layout, copies: int):
  """In-kernel: hist[bin (+ 256 × warp when copies = 4)] += 1 for every element of `bins`."""

  @plgpu.inline_mgpu(arg_types=(layout, plgpu.RefType()))
  def add(ctx, bins, hist_ref):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    base = mgpu_utils.memref_ptr(hist_ref)
    if copies > 1:
      warp = arith.remui(mgpu_utils.warp_idx(sync=False), arith.constant(i32, WARPS))
      base = mgpu_utils.getelementptr(base, [arith.muli(warp, arith.constant(i32, BINS))], i32)
    one = arith.constant(i32, 1)
    for reg in bins.registers.flat:
      for j in range(ir.VectorType(reg.type).shape[0]):
        ptr = mgpu_utils.getelementptr(
          base, [llvm.extractelement(reg, arith.constant(i32, j))], i32
        )
        llvm.inline_asm(
          ir.Type.parse("!llvm.void"),
          [ptr, one],
          "red.shared::cta.add.u32 [$0], $1;",
          "r,r",
          has_side_effects=True,
        )

  return add


@plgpu.inline_mgpu()
def _barrier(ctx):
  del ctx
  mgpu_utils.warpgroup_barrier()


def keys_high_byte(g: jax.Array) -> jax.Array:
  """Bins 0…255 of the order-preserving 16-bit key's high byte (jnp; also used in-kernel)."""
  b = lax.bitcast_convert_type(g, jnp.int16).astype(jnp.int32)
  key = jnp.where(b < 0, b ^ 0x7FFF, b)
  return lax.shift_right_arithmetic(key, 8) + 128


def hist_kernel(t: int, f: int, ctas: int, copies: int):
  """(T, F) bf16 -> (T, copies × 256) int32 counts of keys_high_byte per row."""
  layout = plgpu.Layout.WG_STRIDED((f,), vec_size=4)
  add = _hist_add(layout, copies)
  width = copies * BINS

  def body(g_ref, out_ref, hist_ref):
    pid = lax.axis_index("cta")

    def row(i, carry):
      r = pid + i * ctas
      hist_ref[...] = jnp.zeros((width,), jnp.int32)
      _barrier()
      add(plgpu.layout_cast(keys_high_byte(g_ref[r]), layout), hist_ref)
      _barrier()
      out_ref[r] = hist_ref[...]
      _barrier()
      return carry

    lax.fori_loop(0, t // ctas, row, 0)

  return plgpu.kernel(
    body,
    out_type=jax.ShapeDtypeStruct((t, width), jnp.int32),
    grid=(ctas,),
    grid_names=("cta",),
    scratch_types=[plgpu.SMEM((width,), jnp.int32)],
  )


def reference_hist(g: jax.Array) -> jax.Array:
  return jax.vmap(lambda r: jnp.zeros((BINS,), jnp.int32).at[r].add(1))(keys_high_byte(g))


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--t", type=int, default=16384)
  p.add_argument("--f", type=int, default=5632, help="a multiple of 512 (128 lanes × 4)")
  p.add_argument("--ctas", type=int, default=1024, help="must divide T")
  p.add_argument("--copies", default="1,4", help="histogram copies per CTA: 1 or 4 (per warp)")
  p.add_argument("--lower_only", action="store_true", help="lower for CUDA and stop (CPU)")
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  if a.t % a.ctas or a.f % 512:
    p.error(f"need T % ctas == 0 and F % 512 == 0, got T={a.t}, ctas={a.ctas}, F={a.f}")
  copies = [int(c) for c in a.copies.split(",")]
  if set(copies) - {1, WARPS}:
    p.error(f"--copies takes 1 and/or {WARPS}, got {a.copies}")
  kernels = {f"hist_c{c}": hist_kernel(a.t, a.f, a.ctas, c) for c in copies}
  g_spec = jax.ShapeDtypeStruct((a.t, a.f), jnp.bfloat16)
  if a.lower_only:
    for name, k in kernels.items():
      text = jax.jit(k).trace(g_spec).lower(lowering_platforms=("cuda",)).as_text()
      print(f"{name}: lowered for CUDA ({len(text)} characters)")
    return
  sets = [
    (jax.random.normal(jax.random.PRNGKey(s), (a.t, a.f)).astype(jnp.bfloat16),) for s in (0, 1)
  ]
  want = reference_hist(sets[0][0])
  rows = {}
  fns = {"xla_read_max": jax.jit(lambda g: jnp.max(g, axis=1))}
  for name, k in kernels.items():
    fn = jax.jit(k)
    got = fn(sets[0][0]).reshape(a.t, -1, BINS).sum(axis=1)
    rows[name] = {"exact": bool(jnp.array_equal(got, want))}
    print(f"{name}: exact={rows[name]['exact']}", flush=True)
    fns[name] = fn
  samples = common.time_interleaved(fns, sets, inner=10, trials=9)
  for name, us in samples.items():
    row = rows.setdefault(name, {})
    row["median_us"] = sorted(us)[len(us) // 2]
    row["samples_us"] = us
    print(f"{name:14s} {row['median_us']:8.1f} us", flush=True)
  if a.out:
    shape = {"t": a.t, "f": a.f, "ctas": a.ctas}
    common.write_json(a.out, {"info": common.run_info(), "shape": shape, "rows": rows})


if __name__ == "__main__":
  main()
