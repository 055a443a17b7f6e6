"""Probe: one shared-memory radix-histogram pass over each row of G, in Pallas Mosaic GPU.

Why: the Triton selection is instruction-bound (~270 µs at 16384 × 5504, NOTES_kernels.md), and
a radix select with shared-memory histograms (one atomic add per key and 8-bit digit) is how
fast GPU top-K kernels work. Pallas-Triton cannot express those atomics; Mosaic GPU can, through
`plgpu.inline_mgpu` (`red.shared::cta.add.u32` at a per-lane address). This times the first
pass alone (the high byte of each order-preserving 16-bit key: sign and exponent bits) before
anyone builds a whole select that way:

  exact: per-row 256-bin histograms equal to jnp's;
  us: median time per call, beside one XLA read of G (the floor of any pass over G).

`hist` adds one key at a time; `hist_agg` adds each warp's keys of one bin at once (Gaussian
rows put most keys in a handful of high-byte bins, so plain adds conflict). The adds are
`pallas_kernels/_mgpu_ops.py`'s, as in `mgpu_select`. One warpgroup per CTA, rows strided over
CTAs. A variant that fails to compile is recorded and not timed.

  python3 benchmarks/mgpu_hist_probe.py [--t=16384 --f=5632 --ctas=1024] [--out=F]
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

from benchmarks import common
from pallas_kernels._mgpu_ops import LaneOps

BINS = 256
HIST_VARIANTS = {"hist": False, "hist_agg": True}  # name: atomics aggregated per warp


def keys_high_byte(g: jax.Array) -> jax.Array:
  """Bins 0…255 of the order-preserving 16-bit key's high byte (jnp; also used in-kernel)."""
  b = lax.bitcast_convert_type(g, jnp.int16).astype(jnp.int32)
  key = jnp.where(b < 0, b ^ 0x7FFF, b)
  return lax.shift_right_arithmetic(key, 8) + 128


def hist_kernel(t: int, f: int, ctas: int, aggregate: bool):
  """(T, F) bf16 -> (T, 256) int32 counts of keys_high_byte per row (`_mgpu_ops.LaneOps`'s
  shared-memory adds, plain or aggregated per warp)."""
  layout = plgpu.Layout.WG_STRIDED((f,), vec_size=4)
  ops = LaneOps(layout, plgpu.Layout.WG_STRIDED((BINS,), vec_size=2), f, False, aggregate)

  def body(g_ref, out_ref, hist_ref):
    pid = lax.axis_index("cta")

    def row(i, carry):
      r = pid + i * ctas
      hist_ref[...] = jnp.zeros((BINS,), jnp.int32)
      ops.barrier()
      ops.count(plgpu.layout_cast(keys_high_byte(g_ref[r]), layout), None, hist_ref)
      ops.barrier()
      out_ref[r] = hist_ref[...]
      ops.barrier()
      return carry

    lax.fori_loop(0, t // ctas, row, 0)

  return plgpu.kernel(
    body,
    out_type=jax.ShapeDtypeStruct((t, BINS), jnp.int32),
    grid=(ctas,),
    grid_names=("cta",),
    scratch_types=[plgpu.SMEM((BINS,), jnp.int32)],
  )


def reference_hist(g: jax.Array) -> jax.Array:
  return jax.vmap(lambda r: jnp.zeros((BINS,), jnp.int32).at[r].add(1))(keys_high_byte(g))


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--t", type=int, default=16384)
  p.add_argument("--f", type=int, default=5632, help="a multiple of 512 (128 lanes × 4)")
  p.add_argument("--ctas", type=int, default=1024, help="must divide T")
  p.add_argument("--lower_only", action="store_true", help="lower for CUDA and stop (CPU)")
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  if a.t % a.ctas or a.f % 512:
    p.error(f"need T % ctas == 0 and F % 512 == 0, got T={a.t}, ctas={a.ctas}, F={a.f}")
  kernels = {name: hist_kernel(a.t, a.f, a.ctas, agg) for name, agg in HIST_VARIANTS.items()}
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
    try:
      rows[name] = {"exact": bool(jnp.array_equal(fn(sets[0][0]), want))}
    except Exception as e:  # reported, not timed; the other variant still runs
      rows[name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
    print(name, rows[name], flush=True)
    if rows[name].get("exact"):
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
