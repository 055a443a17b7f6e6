"""Top-K selection at (16384 x F) bf16: our Pallas kernel vs jax.lax.top_k and the reference.

Also times a one-read floor (a row max over G, which reads G once) and, at F=5632 K=1024,
a sweep of kernel configs. Every ours-vs-reference pair is also checked for equality.

  python benchmarks/topk.py [--quick] [--out=benchmarks/results/topk.json]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from pallas_kernels import reference, topk
from pallas_kernels.topk import TopKConfig

T = 16384
SHAPES = ((1376, 256), (2048, 384), (2736, 512), (5461, 1024), (5632, 1024), (11008, 2048))
SWEEP_SHAPE = (5632, 1024)
SWEEP = {
  "bisect16_block": TopKConfig(sample=0, count="int", granule=0),  # the plain baseline
  "bisect16_chunks": TopKConfig(sample=0, count="int"),
  "sample_int": TopKConfig(count="int"),
  "sample_fclip": TopKConfig(count="fclip"),
  "sample_fsat": TopKConfig(count="fsat"),
  "fsat_w4": TopKConfig(count="fsat", num_warps=4),
  "fsat_r2": TopKConfig(count="fsat", rows=2),
  "fsat_r4_w4": TopKConfig(count="fsat", rows=4, num_warps=4),
  "fsat_s1024": TopKConfig(count="fsat", sample=1024),
}


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


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--no-sweep", action="store_true")
  ap.add_argument("--out", default="benchmarks/results/topk.json")
  args = ap.parse_args()
  dtype = jnp.bfloat16
  info = common.run_info()
  print(info, flush=True)
  rows, sweep = [], []
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
  for f, k in SHAPES:
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
  common.write_json(args.out, {"info": info, "T": T, "rows": rows, "sweep": sweep, "2of8": group})
  print(f"\nsweep at F={SWEEP_SHAPE[0]} K={SWEEP_SHAPE[1]} (us):")
  common.print_table([{**s, "us": common.fmt(s["us"])} for s in sweep], ["name", "exact", "us"])
  print("\ntop-K (16384 x F, bf16), medians in us:")
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
  print("2of8:", group)


if __name__ == "__main__":
  main()
