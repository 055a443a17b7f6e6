"""FFN layer fwd and fwd+bwd (grads for x and all weights), bf16, B=64 x S=256 tokens.

Methods, all through `moc_jax.moc.moc_ffn` (so all get the same F padding on GPU):
dense (XLA autodiff), MoC xla (lax.top_k references), MoC pallas, MoC pallas + GCP.
Also residual bytes per token. Ratios are to dense measured in the same run.

  python benchmarks/ffn_layer.py [--quick] [--out=benchmarks/results/ffn_layer.json]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks import common
from moc_jax import compile_options, moc

TOKENS = 64 * 256
SHAPES = ((512, 1376, 256), (768, 2048, 384), (1024, 2736, 512), (2048, 5461, 1024))
METHODS = {
  "dense": {"variant": "dense", "gcp": False, "backend": "xla"},
  "moc_xla": {"variant": "moc", "gcp": False, "backend": "xla"},
  "moc_pallas": {"variant": "moc", "gcp": False, "backend": "pallas"},
  "moc_pallas_gcp": {"variant": "moc", "gcp": True, "backend": "pallas"},
}


def _params(d: int, f: int, seed: int):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  dt = jnp.bfloat16
  x = jax.random.normal(ks[0], (TOKENS, d), jnp.float32).astype(dt)
  wg = (jax.random.normal(ks[1], (d, f)) * d**-0.5).astype(dt)
  wu = (jax.random.normal(ks[2], (d, f)) * d**-0.5).astype(dt)
  wd = (jax.random.normal(ks[3], (f, d)) * f**-0.5).astype(dt)
  dy = jax.random.normal(ks[4], (TOKENS, d), jnp.float32).astype(dt)
  return x, wg, wu, wd, dy


def _fns(k: int, method: dict, opts: dict):
  """Jitted fwd and fwd+bwd, compiled with the train step's XLA options (`opts`)."""

  def fwd(x, wg, wu, wd, dy):
    del dy
    return moc.moc_ffn(x, wg, wu, wd, k=k, **method)

  def fwd_bwd(x, wg, wu, wd, dy):
    y, vjp = jax.vjp(lambda *a: moc.moc_ffn(*a, k=k, **method), x, wg, wu, wd)
    return y, vjp(dy)

  return jax.jit(fwd, compiler_options=opts), jax.jit(fwd_bwd, compiler_options=opts)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--d_models", default="", help="only these shapes' d_model, comma-separated")
  ap.add_argument("--compiler_options", default="auto", help="as train.compiler_options")
  ap.add_argument("--out", default="benchmarks/results/ffn_layer.json")
  args = ap.parse_args()
  opts = compile_options.parse(args.compiler_options)
  info = {**common.run_info(), "compiler_options": opts}
  print(info, flush=True)
  inner, trials = (5, 5) if args.quick else (10, 9)
  rows = []
  only = {int(d) for d in args.d_models.split(",") if d}
  for d, f, k in SHAPES:
    if only and d not in only:
      continue
    sets = [_params(d, f, s) for s in range(2)]
    for name in args.methods.split(","):
      method = METHODS[name]
      fwd, fwd_bwd = _fns(k, method, opts)
      row = {"d": d, "F": f, "K": k, "method": name}
      for label, fn in (("fwd_us", fwd), ("fwd_bwd_us", fwd_bwd)):
        try:
          row[label] = common.time_fn(fn, arg_sets=sets, inner=inner, trials=trials)["median_us"]
        except Exception as e:  # report and keep going
          print(f"  {name} {label} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
          row[label] = None
      row["residual_bytes_per_token"] = moc.residual_bytes_per_token(
        f, k, method["variant"], method["gcp"], backend=method["backend"]
      )
      rows.append(row)
      print(row, flush=True)
  for r in rows:
    base = next(b for b in rows if b["d"] == r["d"] and b["method"] == "dense")
    r["fwd_vs_dense"] = common.ratio(r["fwd_us"], base["fwd_us"])
    r["fwd_bwd_vs_dense"] = common.ratio(r["fwd_bwd_us"], base["fwd_bwd_us"])
  common.write_json(args.out, {"info": info, "tokens": TOKENS, "dtype": "bf16", "rows": rows})
  print(f"\nFFN layer, {TOKENS} tokens, bf16, medians (us); ratios vs dense in this run:")
  common.print_table(
    [
      {
        **r,
        "fwd_us": common.fmt(r["fwd_us"]),
        "fwd_bwd_us": common.fmt(r["fwd_bwd_us"]),
        "fwd_vs_dense": common.fmt(r["fwd_vs_dense"], 3),
        "fwd_bwd_vs_dense": common.fmt(r["fwd_bwd_vs_dense"], 3),
        "res_B/tok": r["residual_bytes_per_token"],
      }
      for r in rows
    ],
    [
      "d",
      "F",
      "K",
      "method",
      "fwd_us",
      "fwd_vs_dense",
      "fwd_bwd_us",
      "fwd_bwd_vs_dense",
      "res_B/tok",
    ],
  )


if __name__ == "__main__":
  main()
