"""FFN layer fwd and fwd+bwd (grads for x and all weights), bf16, B=64 x S=256 tokens.

Methods, all through `moc_jax.moc.moc_ffn` (so all get the same F padding on GPU):
dense (XLA autodiff), MoC xla (lax.top_k references), MoC pallas, MoC pallas + GCP.
Also residual bytes per token. Ratios are to dense measured in the same run: the methods of
a shape are timed in turn within every trial (`common.time_interleaved`), and a ratio is the
median of the per-trial ratios, so drift in the GPU's clock over the run cancels. Before
2026-12-04 each method's trials ran back to back, dense first: `--protocols=sequential` (ratio of
medians); `--protocols=interleaved,sequential` times both in one run. `--inner` sets the calls
per sample, several comma-separated (a longer block lets each method settle into its own clock
and power state). Each shape is preceded by `--heat_s` seconds of load (15 on GPU), so no method
is timed on a cold GPU. `--hlo` also records what each method's compiled fwd moves besides
its kernels (`common.hlo_moves`: copies and their sizes, custom calls, and which of those XLA
recorded into its command buffers).

  python benchmarks/ffn_layer.py [--quick] [--out=benchmarks/results/ffn_layer.json]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks import common
from moc_jax import compile_options, moc

TOKENS = 64 * 256
SHAPES = ((512, 1376, 256), (768, 2048, 384), (1024, 2736, 512), (2048, 5461, 1024))


def _moc(gcp: bool = False, **fields) -> dict:
  """A MoC method on the Pallas backend; `fields` go to the forward's config (`apply_mode`,
  `selection`, ...), `backward` to the backward's mode, `keep_weights` to the op."""
  return {"variant": "moc", "gcp": gcp, "backend": "pallas", **fields}


METHODS = {
  "dense": {"variant": "dense", "gcp": False, "backend": "xla"},
  "moc_xla": {"variant": "moc", "gcp": False, "backend": "xla"},
  "moc_pallas": _moc(),
  "moc_pallas_gcp": _moc(gcp=True),
  # the backward padding (and casting) the weights again instead of reusing the forward's
  "moc_pallas_recast": _moc(keep_weights=False),
  # the forward's selection by the Triton kernel (the default's 'auto' takes the Mosaic GPU
  # radix select on Hopper: ffn_layer_h200_20261204e.json)
  "moc_pallas_triton": _moc(selection="triton"),
  "moc_pallas_gcp_triton": _moc(gcp=True, selection="triton"),
  # both streaming passes by Triton kernels, the forward's a gather after the select: the
  # defaults before 2026-12-05o (whose 'auto's have the Mosaic select write the forward pass's
  # outputs itself and the Mosaic backward compute only the selected keys); `_tbwd`: the
  # Triton backward after today's forward
  "moc_pallas_gather": _moc(apply_mode="gather", backward="triton"),
  "moc_pallas_gcp_gather": _moc(gcp=True, apply_mode="gather", backward="triton"),
  "moc_pallas_tbwd": _moc(backward="triton"),
  # the Mosaic select as before 2026-12-05i: its rows loaded at each row's start, no warp-per-row
  # form for narrow rows (`TopKConfig.async_rows`, `warp_rows`)
  "moc_pallas_sync": _moc(async_rows=False, warp_rows=False),
  # the streaming passes as Mosaic GPU kernels (`mgpu_apply`, `mgpu_backward`) after the
  # select: the forward's alone (`_mapply`, the Triton backward) and both (`_mgpu`)
  "moc_pallas_mapply": _moc(apply_mode="mgpu", backward="triton"),
  "moc_pallas_mgpu": _moc(apply_mode="mgpu", backward="mgpu"),
  "moc_pallas_gcp_mgpu": _moc(gcp=True, apply_mode="mgpu", backward="mgpu"),
  # the Mosaic select writing the forward pass's outputs itself (`apply_mode='in_select'`),
  # the backward by `mgpu_backward`: what the defaults' 'auto's take on Hopper since 2026-12-05o
  "moc_pallas_insel": _moc(apply_mode="in_select", backward="mgpu"),
  "moc_pallas_gcp_insel": _moc(gcp=True, apply_mode="in_select", backward="mgpu"),
  # the same with one warp a row for F <= 2048 (`apply_mode='in_select_warp'`; untimed yet;
  # wider rows: the warpgroup in_select)
  "moc_pallas_inselw": _moc(apply_mode="in_select_warp"),
}
DEFAULT_METHODS = "dense,moc_xla,moc_pallas,moc_pallas_gcp,moc_pallas_recast"


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
  method = dict(method)
  selection = method.pop("selection", None)
  fields = {f: method.pop(f) for f in ("async_rows", "warp_rows", "apply_mode") if f in method}
  backward = method.pop("backward", None)  # `StreamConfig.mode`

  def fwd(x, wg, wu, wd, dy):
    del dy
    with common.forward_selection(selection, **fields):
      return moc.moc_ffn(x, wg, wu, wd, k=k, **method)

  def fwd_bwd(x, wg, wu, wd, dy):
    with common.forward_selection(selection, **fields), common.backward_mode(backward):
      y, vjp = jax.vjp(lambda *a: moc.moc_ffn(*a, k=k, **method), x, wg, wu, wd)
      return y, vjp(dy)

  return jax.jit(fwd, compiler_options=opts), jax.jit(fwd_bwd, compiler_options=opts)


PROTOCOLS = ("interleaved", "sequential")


def _samples(fns: dict, sets, protocol: str, inner: int, trials: int) -> dict[str, list[float]]:
  if protocol == "interleaved":
    return common.time_interleaved(fns, sets, inner=inner, trials=trials)
  out = {}
  for name, fn in fns.items():  # all of one method's samples, then the next method's
    out.update(common.time_interleaved({name: fn}, sets, inner=inner, trials=trials))
  return out


def _vs_dense(ours: list[float] | None, dense: list[float] | None, protocol: str) -> float | None:
  if protocol == "interleaved":
    return common.paired_ratio(ours, dense)
  return common.ratio(statistics.median(ours), statistics.median(dense)) if ours and dense else None


def _heat(fn, sets, seconds: float) -> None:
  """Run fn back to back for `seconds`: a GPU timed from cold runs its first samples at clocks
  it cannot hold (H200, 2026-12-04: dense at 1B took 4.9 ms in the first trials, 5.3-5.6 after),
  which flatters whatever is timed first."""
  t0 = time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    common.block([fn(*a) for a in sets])


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"of {', '.join(METHODS)}")
  ap.add_argument("--d_models", default="", help="only these shapes' d_model, comma-separated")
  ap.add_argument("--compiler_options", default="auto", help="as train.compiler_options")
  ap.add_argument("--protocols", default="interleaved", help=f"any of {', '.join(PROTOCOLS)}")
  ap.add_argument(
    "--inner", default="", help="calls per sample, comma-separated to try several (10; quick 5)"
  )
  ap.add_argument(
    "--heat_s", type=float, default=None, help="seconds of load before each shape (GPU 15, else 0)"
  )
  ap.add_argument("--hlo", action="store_true", help="record each compiled fwd's copies")
  ap.add_argument("--out", default="benchmarks/results/ffn_layer.json")
  args = ap.parse_args()
  opts = compile_options.parse(args.compiler_options)
  info = {**common.run_info(), "compiler_options": opts}
  print(info, flush=True)
  inner, trials = (5, 5) if args.quick else (10, 9)
  inners = [int(n) for n in args.inner.split(",") if n] or [inner]
  heat_s = args.heat_s if args.heat_s is not None else 15.0 * (jax.default_backend() == "gpu")
  protocols = args.protocols.split(",")
  if set(protocols) - set(PROTOCOLS):
    ap.error(f"--protocols: unknown {sorted(set(protocols) - set(PROTOCOLS))}")
  rows = []
  only = {int(d) for d in args.d_models.split(",") if d}
  for d, f, k in SHAPES:
    if only and d not in only:
      continue
    sets = [_params(d, f, s) for s in range(2)]
    names = args.methods.split(",")
    fns = {name: _fns(k, METHODS[name], opts) for name in names}
    moves = {}
    for n, (fn, _) in fns.items() if args.hlo else ():
      moves[n] = common.hlo_moves(fn.lower(*sets[0]).compile().as_text())
      print(f"{d} {n} fwd: {moves[n]}", flush=True)
    _heat(next(iter(fns.values()))[1], sets, heat_s)
    for protocol, inner in itertools.product(protocols, inners):
      samples = {
        label: _samples({n: pair[i] for n, pair in fns.items()}, sets, protocol, inner, trials)
        for i, label in enumerate(("fwd_us", "fwd_bwd_us"))
      }
      for name in names:
        method = METHODS[name]
        row = {"d": d, "F": f, "K": k, "method": name, "protocol": protocol, "inner": inner}
        for label, by_name in samples.items():
          ours, dense = by_name.get(name), by_name.get("dense")
          row[label] = statistics.median(ours) if ours else None
          row[label.replace("_us", "_vs_dense")] = _vs_dense(ours, dense, protocol)
          row[label.replace("_us", "_samples_us")] = ours
        if args.hlo:
          row["hlo_fwd"] = moves[name]
        row["residual_bytes_per_token"] = moc.residual_bytes_per_token(
          f, k, method["variant"], method["gcp"], backend=method["backend"]
        )
        rows.append(row)
        print({k_: v for k_, v in row.items() if "samples" not in k_}, flush=True)
  common.write_json(
    args.out,
    {
      "info": info,
      "tokens": TOKENS,
      "dtype": "bf16",
      "protocols": protocols,
      "heat_s": heat_s,
      "rows": rows,
    },
  )
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
      "protocol",
      "inner",
      "fwd_us",
      "fwd_vs_dense",
      "fwd_bwd_us",
      "fwd_bwd_vs_dense",
      "res_B/tok",
    ],
  )


if __name__ == "__main__":
  main()
