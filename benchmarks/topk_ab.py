"""Top-K configs of `topk_variants.SWEEP` timed in turn within every trial (paired ratios).

The sweep in `topk_gpu_session.py` times each config once, one after another, so two configs
within ~5% of each other cannot be told apart there. This times a few of them interleaved
(`common.time_interleaved`, order rotated each trial) and reports each one's median and its
median per-trial ratio to the first, after checking each exact against the reference.

  python3 benchmarks/topk_ab.py cmp_gather_g1 cmp_gather_g1_w8 --f=5632 --k=1024 \
    --out=benchmarks/results/topk_ab_h200_DATE.json
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, topk_variants
from pallas_kernels import reference, topk


def _exact(fn, x: jax.Array, k: int) -> bool:
  idx, val = fn(x)
  ref_idx, ref_val = reference.select(x, k, "moc")
  return bool(
    np.array_equal(np.asarray(idx), np.asarray(ref_idx))
    and np.array_equal(np.asarray(val, np.float32), np.asarray(ref_val, np.float32))
  )


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("names", nargs="+", help="topk_variants.SWEEP names; the first is the base")
  p.add_argument("--t", type=int, default=16384, help="rows")
  p.add_argument("--f", type=int, default=5632, help="channels per row")
  p.add_argument("--k", type=int, default=1024)
  p.add_argument("--trials", type=int, default=15)
  p.add_argument("--inner", type=int, default=10)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  unknown = [n for n in args.names if n not in topk_variants.SWEEP]
  if unknown:
    p.error(f"unknown configs {unknown}; see topk_variants.SWEEP")

  keys = jax.random.split(jax.random.PRNGKey(args.f), 3)
  sets = [(jax.random.normal(k_, (args.t, args.f)).astype(jnp.bfloat16),) for k_ in keys[:2]]
  ties = jax.random.randint(keys[2], (min(args.t, 512), args.f), -3, 4).astype(jnp.bfloat16)
  fns, rows = {}, {}
  for name in args.names:
    cfg = topk_variants.SWEEP[name]
    fn = jax.jit(lambda g, cfg=cfg: topk.select(g, args.k, "moc", config=cfg))
    exact = _exact(fn, sets[0][0], args.k) and _exact(fn, ties, args.k)
    rows[name] = {"config": str(cfg), "exact": exact}
    print(f"{name}: exact={exact}", flush=True)
    if exact:  # an inexact config is reported, never timed
      fns[name] = fn
  samples = common.time_interleaved(fns, sets, inner=args.inner, trials=args.trials)
  base = args.names[0]
  for name, us in samples.items():
    rows[name] |= {
      "median_us": float(np.median(us)),
      "samples_us": us,
      "ratio_to_base": common.paired_ratio(us, samples.get(base)),
    }
    print(
      f"{name:24s} {np.median(us):8.1f} us  ÷ {base}: "
      f"{common.fmt(rows[name]['ratio_to_base'], 3)}  (min {min(us):.1f}, max {max(us):.1f})",
      flush=True,
    )
  if args.out:
    shape = {"t": args.t, "f": args.f, "k": args.k, "trials": args.trials, "inner": args.inner}
    common.write_json(args.out, {"info": common.run_info(), "shape": shape, "rows": rows})


if __name__ == "__main__":
  main()
