"""Which fp32 form of MoC's backward JAX's Triton walk compiles to, found on a GPU.

Why: the Mosaic backward (`mgpu_backward`) writes its arithmetic as PTX and must round as the
Triton walk does, bit for bit. This runs the Mosaic kernel with variants of its per-key PTX
and counts, per output (dG, dU, Z), the elements that differ from the Triton walk's, on
16384 Gaussian rows of the 60M and 1B layers, with Z_sel (MoC) and without (GCP). A variant
with no differences at both shapes is how Triton rounds. 2026-12-05o (H100): Triton does not
contract 1 + g·(1 - s) into an fma (`mgpu_backward_rounding_h100_20261205o.txt`).

  python benchmarks/mgpu_backward_rounding.py     (a Hopper GPU; prints one line a variant)
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels import mgpu_backward as mb  # noqa: E402
from pallas_kernels import moc_train_mask as mm  # noqa: E402

ONE = "0f3F800000"
FACTOR = (  # s·(1 + g·(1 - s)) into ft, as the kernel has it
  f"sub.rn.f32 ft, {ONE}, fs; mul.rn.f32 ft, ft, fx; add.rn.f32 ft, ft, {ONE};\n"
  "mul.rn.f32 ft, fs, ft;\n"
)
DG = "mul.f32 fh, fd, fy; mul.f32 fh, fh, ft; cvt.rn.bf16.f32 xh, fh;\n"  # (dz·u)·factor
VARIANTS = {  # name: {text of the kernel's key: its replacement}
  "shipped": {},
  "fma": {FACTOR: f"sub.f32 ft, {ONE}, fs; fma.rn.f32 ft, ft, fx, {ONE}; mul.f32 ft, fs, ft;\n"},
  "dz_u_s_then_rest": {
    FACTOR: f"sub.f32 ft, {ONE}, fs; fma.rn.f32 ft, ft, fx, {ONE};\n",
    DG: "mul.f32 fh, fd, fy; mul.f32 fh, fh, fs; mul.f32 fh, fh, ft; cvt.rn.bf16.f32 xh, fh;\n",
  },
  "dz_times_u_factor": {DG: "mul.f32 fh, fy, ft; mul.f32 fh, fh, fd; cvt.rn.bf16.f32 xh, fh;\n"},
  "s_plus_gs_1ms": {
    FACTOR: f"mul.f32 fn, fs, fx; sub.f32 ft, {ONE}, fs; fma.rn.f32 ft, fn, ft, fs;\n"
  },
  "div_rn": {"div.full.f32": "div.rn.f32"},
  "div_approx": {"div.full.f32": "div.approx.f32"},
}


def residuals(t: int, f: int, k: int, nv: int, seed: int):
  """dZ and the forward's (words, G_sel, U_sel, Z_sel) for Gaussian bf16 rows."""
  g, u, dz = (
    jax.random.normal(key, (t, f)).astype(jnp.bfloat16)
    for key in jax.random.split(jax.random.key(seed), 3)
  )
  words, gs, us, _, zs = mm.train_forward_bitmask(g, u, k, num_valid=nv, z_sel=True)
  return dz, words, gs, us, zs


def variant_key(edits: dict[str, str]):
  """`mgpu_backward.backward_key` with `edits` applied (each must match the shipped text)."""
  shipped = mb.backward_key

  def key(f, k, dtype, has_z):
    text = shipped(f, k, dtype, has_z)
    for old, new in edits.items():
      if old not in text:
        raise ValueError(f"variant text not in the shipped key: {old!r}")
      text = text.replace(old, new)
    return text

  return key


def main() -> None:
  shipped = mb.backward_key
  for f, k, nv in ((1408, 256, 1376), (5504, 1024, 5461)):
    seed = time.time_ns() % (2**31)
    dz, words, gs, us, zs = residuals(16384, f, k, nv, seed)
    runs = {"moc": zs, "gcp": None}  # with Z_sel, and Z recomputed
    ins = (dz, words, gs, us)
    walk = mm._triton_walk(f)  # the Triton walk (the shipped default is the Mosaic kernel)
    want = {
      run: [np.asarray(a, np.float32) for a in mm.train_backward_bitmask(*ins, z, config=walk)]
      for run, z in runs.items()
    }
    for name, edits in VARIANTS.items():
      mb.backward_key = variant_key(edits)
      jax.clear_caches()
      counts = []
      try:
        for run, z in runs.items():
          got = mb.backward(dz, words, gs, us, z, interpret=False)
          diff = [
            int(np.count_nonzero(np.asarray(b, np.float32) != a))
            for a, b in zip(want[run], got, strict=True)
          ]
          counts.append(diff)
      except Exception as e:  # a variant that does not assemble: say so, go on
        counts = repr(e)[:300]
      finally:
        mb.backward_key = shipped
      print(f"F={f} {name:18s} differing (dG, dU, Z) with Z_sel / GCP: {counts}", flush=True)


if __name__ == "__main__":
  main()
