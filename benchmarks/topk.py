"""Top-K selection at (16384 x F) bf16: our Pallas kernel vs jax.lax.top_k and the reference.

Also times a one-read floor (a row max over G, which reads G once) and, at F=5632 K=1024,
a sweep of kernel configs. Every ours-vs-reference pair is also checked for equality.

  python benchmarks/topk.py [--quick] [--out=benchmarks/results/topk.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from pallas_kernels import moc_train, reference, topk
from pallas_kernels.moc_train import BackwardConfig
from pallas_kernels.topk import TopKConfig

T = 16384
SHAPES = ((1376, 256), (2048, 384), (2736, 512), (5461, 1024), (5632, 1024), (11008, 2048))
SWEEP_SHAPE = (5632, 1024)
SWEEP = {
  "default": TopKConfig(),
  "contig": TopKConfig(strided=False),  # the vectorized layout (lanes 8 columns apart)
  "w2": TopKConfig(num_warps=2),
  "w8": TopKConfig(num_warps=8),
  "fan3": TopKConfig(fan=3),
  "r2": TopKConfig(rows=2),
}
EPILOGUE_T, EPILOGUE_F, EPILOGUE_K, EPILOGUE_NV = 16384, 5504, 1024, 5461
# the Triton top-K (GAUSS_GATHER with the Triton bitmask): the default before the Mosaic one
TRITON_GATHER = dataclasses.replace(topk.GAUSS_GATHER, selection="triton")


def _inputs(f: int, dtype, sets: int) -> list[tuple[jax.Array]]:
  keys = jax.random.split(jax.random.PRNGKey(f), sets)
  return [(jax.random.normal(k_, (T, f), jnp.float32).astype(dtype),) for k_ in keys]


def _check(fn, g, k) -> bool:
  idx, val = fn(g)
  ref_idx, ref_val = reference.select(g, k, "moc")
  return bool(np.array_equal(np.asarray(idx), np.asarray(ref_idx))) and bool(
    np.array_equal(np.asarray(val.astype(jnp.float32)), np.asarray(ref_val.astype(jnp.float32)))
  )


def _time(fn, sets, quick) -> float | None:
  try:
    return common.time_fn(fn, arg_sets=sets, inner=5 if quick else 10, trials=5 if quick else 9)[
      "median_us"
    ]
  except Exception as e:  # a variant that fails to compile is reported, not fatal
    print(f"  failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return None


def epilogue_sweep(quick: bool) -> list[dict]:
  """Train epilogues at the 1B shape (F padded 5461 -> 5504), vs XLA references and a copy."""
  t, f, k, nv = EPILOGUE_T, EPILOGUE_F, EPILOGUE_K, EPILOGUE_NV
  out = []
  sets = []
  for s_ in range(2):
    ks = jax.random.split(jax.random.PRNGKey(100 + s_), 3)
    g, u, dz = (jax.random.normal(k_, (t, f), jnp.float32).astype(jnp.bfloat16) for k_ in ks)
    sets.append((g, u, dz))
  ref_f = jax.jit(lambda g, u: reference.train_forward_epilogue(g, u, k, "moc", num_valid=nv))
  fwd_sets = [(g, u) for g, u, _ in sets]
  r_idx, r_g, r_u, r_z = ref_f(*fwd_sets[0])
  copy_f = jax.jit(lambda g, u: (g + u, g - u))  # read 2 x TxF, write 2 x TxF
  out.append({"name": "fwd_floor_copy2", "us": _time(copy_f, fwd_sets, quick)})
  out.append({"name": "fwd_xla_ref", "us": _time(ref_f, fwd_sets, quick)})
  for name, cfg in (
    ("fwd_default", TopKConfig()),
    ("fwd_contig", TopKConfig(strided=False)),
    ("fwd_w2", TopKConfig(num_warps=2)),
    ("fwd_w8", TopKConfig(num_warps=8)),
  ):
    fn = jax.jit(
      lambda g, u, cfg=cfg: moc_train.train_forward_epilogue(
        g, u, k, "moc", num_valid=nv, config=cfg, idx_dtype=jnp.uint16
      )
    )
    idx, gs, us, z = fn(*fwd_sets[0])
    ok = bool(
      np.array_equal(np.asarray(idx).astype(np.int32), np.asarray(r_idx))
      and np.array_equal(np.asarray(gs.astype(jnp.float32)), np.asarray(r_g.astype(jnp.float32)))
      and np.array_equal(np.asarray(us.astype(jnp.float32)), np.asarray(r_u.astype(jnp.float32)))
      and float(jnp.max(jnp.abs(z.astype(jnp.float32) - r_z.astype(jnp.float32)))) < 0.05
    )
    out.append({"name": name, "exact": ok, "us": _time(fn, fwd_sets, quick)})
    print("epilogue", out[-1], flush=True)
  idx16 = r_idx.astype(jnp.uint16)
  zs = reference.silu_and_mul(r_g, r_u)
  bwd_sets = [(dz, idx16, r_g, r_u, zs) for _, _, dz in sets]
  ref_b = jax.jit(lambda dz, i, g, u, z: reference.train_backward_epilogue(dz, i, g, u, z))
  rdg, rdu, rz = ref_b(*bwd_sets[0])
  out.append({"name": "bwd_xla_ref", "us": _time(ref_b, bwd_sets, quick)})
  out.append(
    {
      "name": "bwd_floor_zeros3",
      "us": _time(jax.jit(lambda dz, *_: (dz * 0, dz * 0, dz * 0)), bwd_sets, quick),
    }
  )
  for name, cfg, gcp in (
    ("bwd_default", BackwardConfig(), False),
    ("bwd_default_gcp", BackwardConfig(), True),
    ("bwd_contig", BackwardConfig(strided=False), False),
    ("bwd_w8", BackwardConfig(num_warps=8), False),
    ("bwd_r2_w8", BackwardConfig(rows=2, num_warps=8), False),
  ):
    fn = jax.jit(
      lambda dz, i, g, u, z, cfg=cfg, gcp=gcp: moc_train.train_backward_epilogue(
        dz, i, g, u, None if gcp else z, config=cfg
      )
    )
    dg, du, z = fn(*bwd_sets[0])
    err = max(
      float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
      for a, b in ((dg, rdg), (du, rdu), (z, rz))
    )
    same_zero = bool(
      np.array_equal(np.asarray(dg == 0), np.asarray(rdg == 0))
      and np.array_equal(np.asarray(z == 0), np.asarray(rz == 0))
    )
    out.append(
      {"name": name, "max_abs_err": err, "zeros_match": same_zero, "us": _time(fn, bwd_sets, quick)}
    )
    print("epilogue", out[-1], flush=True)
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--no-sweep", action="store_true")
  ap.add_argument("--epilogues", action="store_true")
  ap.add_argument("--no-shapes", action="store_true")
  ap.add_argument("--widths", default="", help="only these F of SHAPES, comma-separated")
  ap.add_argument("--triton_too", action="store_true", help="also the Triton top-K at each F")
  ap.add_argument("--out", default="benchmarks/results/topk.json")
  args = ap.parse_args()
  dtype = jnp.bfloat16
  info = common.run_info()
  print(info, flush=True)
  rows, sweep, epi = [], [], []
  if args.epilogues:
    epi = epilogue_sweep(args.quick)
  if not args.no_sweep:
    f, k = SWEEP_SHAPE
    sets = _inputs(f, dtype, 2)
    for name, cfg in SWEEP.items():
      fn = jax.jit(lambda g, cfg=cfg, k=k: topk.select(g, k, "moc", config=cfg))
      try:
        ok = _check(fn, sets[0][0], k)
      except Exception as e:
        print(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        ok = None
      us = _time(fn, sets, args.quick) if ok is not None else None
      sweep.append({"name": name, "config": str(cfg), "exact": ok, "us": us})
      print("sweep", name, ok, common.fmt(us), flush=True)
  widths = {int(w) for w in args.widths.split(",")} if args.widths else {f for f, _ in SHAPES}
  for f, k in () if args.no_shapes else [(f, k) for f, k in SHAPES if f in widths]:
    sets = _inputs(f, dtype, 2)
    g = sets[0][0]
    ours = jax.jit(lambda g, k=k: topk.select(g, k, "moc"))
    try:
      ok = _check(ours, g, k)
    except Exception as e:
      print(f"  ours failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
      ok = None
    row = {"F": f, "K": k, "dtype": "bf16", "exact": ok}
    row["ours_us"] = _time(ours, sets, args.quick)
    if args.triton_too:  # the Triton bitmask + gathered compaction, checked and timed beside
      triton = jax.jit(lambda g, k=k: topk.select(g, k, "moc", config=TRITON_GATHER))
      row["triton_gather_exact"] = _check(triton, g, k)
      row["triton_gather_us"] = _time(triton, sets, args.quick)
      row["triton_over_ours"] = common.ratio(row["triton_gather_us"], row["ours_us"])
    row["floor_read_us"] = _time(jax.jit(lambda g: jnp.max(g, axis=-1)), sets, args.quick)
    row["lax_top_k_us"] = _time(jax.jit(lambda g, k=k: jax.lax.top_k(g, k)), sets, args.quick)
    row["reference_us"] = _time(
      jax.jit(lambda g, k=k: reference.select(g, k, "moc")), sets, args.quick
    )
    row["bytes_min"] = T * f * 2 + T * k * (4 + 2)  # read G; write idx (int32) + values
    row["ours_GBps"] = (row["bytes_min"] / row["ours_us"] / 1e3) if row["ours_us"] else None
    row["lax_over_ours"] = common.ratio(row["lax_top_k_us"], row["ours_us"])
    row["ours_over_floor"] = common.ratio(row["ours_us"], row["floor_read_us"])
    rows.append(row)
    print(row, flush=True)
  g28 = _inputs(5632, dtype, 1)[0][0]
  fn28 = jax.jit(lambda g: topk.select(g, 0, "moc_2of8"))
  ref28 = jax.jit(lambda g: reference.select(g, 0, "moc_2of8"))
  i1, _ = fn28(g28)
  i2, _ = ref28(g28)
  group = {
    "F": 5632,
    "exact": bool(np.array_equal(np.asarray(i1), np.asarray(i2))),
    "ours_us": _time(fn28, [(g28,)], args.quick),
    "reference_us": _time(ref28, [(g28,)], args.quick),
  }
  common.write_json(
    args.out, {"info": info, "T": T, "rows": rows, "sweep": sweep, "2of8": group, "epilogues": epi}
  )
  if sweep:
    print(f"\nsweep at F={SWEEP_SHAPE[0]} K={SWEEP_SHAPE[1]} (us):")
    common.print_table([{**s, "us": common.fmt(s["us"])} for s in sweep], ["name", "exact", "us"])
  print("\ntop-K (16384 x F, bf16), medians in us:")
  _shape_table(rows)
  print("2of8:", group)
  if epi:
    print("\nepilogues at 16384 x 5504 (nv 5461), K=1024 (us):")
    cols = ["name", "exact", "max_abs_err", "us"]
    common.print_table([{**e, "us": common.fmt(e["us"])} for e in epi], cols)


def _shape_table(rows: list[dict]) -> None:
  if not rows:
    return
  common.print_table(
    [
      {
        **r,
        **{
          c: common.fmt(r[c], 2 if "over" in c else 1)
          for c in (
            "ours_us",
            "floor_read_us",
            "lax_top_k_us",
            "reference_us",
            "lax_over_ours",
            "ours_over_floor",
          )
        },
      }
      for r in rows
    ],
    [
      "F",
      "K",
      "exact",
      "ours_us",
      "floor_read_us",
      "lax_top_k_us",
      "reference_us",
      "lax_over_ours",
      "ours_over_floor",
    ],
  )


if __name__ == "__main__":
  main()
