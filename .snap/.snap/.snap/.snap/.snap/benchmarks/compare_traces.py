"""Do two training runs give the same trace, bit for bit? (MoC vs MoC+GCP: GCP only changes
what is recomputed, so with deterministic kernels every logged value must be equal.)

  python benchmarks/compare_traces.py RUN_A RUN_B [--out=verdict.json]

Compares, step by step, the train loss and gradient norm and the validation loss of the two
workdirs' metrics.jsonl. Exit status 0 when identical, 1 when not.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moc_jax.metrics import read_metrics

FIELDS = {"train": ("loss", "grad_norm"), "eval": ("loss",)}


def trace(workdir: str) -> dict[tuple[str, int, str], float]:
  """(kind, step, field) -> value for every compared value of the run."""
  out = {}
  for r in read_metrics(workdir):
    for field in FIELDS.get(r.get("kind"), ()):
      if field in r:
        out[(r["kind"], r["step"], field)] = r[field]
  return out


def compare(run_a: str, run_b: str) -> dict:
  a, b = trace(run_a), trace(run_b)
  keys = sorted(a.keys() & b.keys(), key=lambda k: (k[1], k[0], k[2]))
  diffs = [{"kind": k[0], "step": k[1], "field": k[2], "a": a[k], "b": b[k]} for k in keys]
  diffs = [d for d in diffs if d["a"] != d["b"]]
  only = sorted(map(str, a.keys() ^ b.keys()))
  return {
    "runs": [run_a, run_b],
    "values_compared": len(keys),
    "last_step": max((k[1] for k in keys), default=None),
    "identical": bool(keys) and not diffs and not only,
    "first_differences": diffs[:5],
    "in_one_run_only": only[:5],
  }


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("run_a")
  p.add_argument("run_b")
  p.add_argument("--out", help="also write the verdict here as JSON")
  args = p.parse_args(argv)
  verdict = compare(args.run_a, args.run_b)
  text = json.dumps(verdict, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return 0 if verdict["identical"] else 1


if __name__ == "__main__":
  sys.exit(main())
