"""Whole-model training step on one GPU: dense vs MoC vs MoC+GCP (and dense with its FFN
rematerialised), the framework's own train step, random tokens.

  python benchmarks/model_step.py --preset=1b --batch=64 --seq=256

Each variant runs in its own process so `peak_bytes_in_use` is that variant's alone. Reports
tokens/s and step time over `--steps` steps run back to back (one sync at the end, as training
runs them; the median of as many steps, each synced alone, is kept beside it), MFU (PaLM-style
FLOPs: 6 × non-embedding params + 12 × layers × d_model × seq per token, over a 989 TFLOP/s
dense-bf16 peak for H100/H200), peak device memory and XLA's compiled memory analysis; the
largest batch without rematerialisation is estimated linearly from the compiled memory at two
batch sizes.

`--interleave=R` instead builds every variant in one process and times them in R rounds of
`--steps` steps each, the order rotated every round, so that the GPU's clock and temperature
drift over the run fall on all variants alike (one process per variant runs them in order: a
later variant meets a hotter GPU). Ratios are then medians of the per-round ratios; peak memory
is not reported there (the variants share the process). `--fit_steps=4,16,32` then also times
runs of that many steps per variant and fits total = fixed + N × steady (what one sync per run
costs, and the step time of a long training loop).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.step_variants import (  # noqa: E402
  DEFAULT_VARIANTS,
  VARIANTS,
  configure,
  wrap_step,
)


def build(
  preset: str,
  variant: str,
  backend: str,
  seq: int,
  vocab: int = 32000,
  compiler_options: str = "auto",
):
  """(cfg, graphdef, state, step, batch_of): the framework's jitted train step for a variant
  on random tokens, compiled with `train.compiler_options`-style options; batch_of(b) gives a
  (b, seq) batch."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from benchmarks import common
  from moc_jax import compile_options, model_config, train_lib
  from moc_jax.model import Transformer

  overrides = dict(configure(variant), kernel_backend=backend, vocab_size=vocab)
  cfg = model_config.from_preset(preset, **overrides)
  t = common.bench_train_config()
  tx = train_lib.make_optimizer(t)
  graphdef, state = train_lib.init_state(Transformer(cfg, nnx.Rngs(0)), tx, 0)
  step = train_lib.make_train_step(
    graphdef,
    tx,
    train_lib.make_schedule(t),
    grad_accum=1,
    document_mask=False,
    compiler_options=compile_options.parse(compiler_options),
  )

  def batch_of(b):
    tokens = jax.random.randint(jax.random.key(b), (b, seq + 1), 0, cfg.vocab_size)
    return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "weights": jnp.ones((b, seq), jnp.float32),
      "positions": jnp.broadcast_to(jnp.arange(seq), (b, seq)),
      "segment_ids": jnp.ones((b, seq), jnp.int32),
    }

  return cfg, graphdef, state, wrap_step(variant, step), batch_of


def _mfu(cfg, seq: int, tokens_per_s: float) -> float | None:
  """Model FLOPs utilisation (the docstring's count) on this device, None if its peak is unknown."""
  from moc_jax import train_lib

  flops = train_lib.train_flops_per_token(cfg, seq)
  return train_lib.mfu(tokens_per_s, flops, train_lib.device_peak_tflops(None))


def child(args) -> dict:
  import jax
  from flax import nnx

  from benchmarks import common
  from moc_jax import compile_options, train_lib
  from moc_jax.model import count_params

  cfg, graphdef, state, step, batch_of = build(
    args.preset, args.variant, args.backend, args.seq, compiler_options=args.compiler_options
  )
  n_params = count_params(nnx.merge(graphdef, state["params"]))
  compiled_bytes = {}
  for b in (args.batch // 2, args.batch) if args.estimate_max_batch else (args.batch,):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch_of(b))
    compiled_bytes[b] = common.compiled_bytes(step.lower(state, abstract).compile())
  batch = batch_of(args.batch)
  for _ in range(args.warmup):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(args.steps):  # each step alone: its wall time, launch gap included
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
  t0 = time.perf_counter()
  for _ in range(args.steps):  # back to back, as a training loop runs them
    state, m = step(state, batch)
  jax.block_until_ready(m["loss"])
  step_s = (time.perf_counter() - t0) / args.steps
  synced_s = statistics.median(times)
  tokens_per_s = args.batch * args.seq / step_s
  hbm = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
  lo, hi = args.batch // 2, args.batch
  per_seq = (compiled_bytes[hi] - compiled_bytes[lo]) / (hi - lo) if lo in compiled_bytes else 0
  fixed = compiled_bytes[hi] - per_seq * hi
  return {
    "variant": args.variant,
    "compiler_options": compile_options.parse(args.compiler_options),
    "params": n_params,
    "batch": args.batch,
    "seq": args.seq,
    "step_ms": step_s * 1e3,
    "step_ms_synced_median": synced_s * 1e3,
    "step_ms_synced_all": [x * 1e3 for x in times],
    "tokens_per_s": tokens_per_s,
    "tokens_per_s_synced": args.batch * args.seq / synced_s,
    "mfu": _mfu(cfg, args.seq, tokens_per_s),
    "peak_gb": train_lib.peak_memory_gb(),
    "compiled_gb": {str(b): v / 1e9 for b, v in compiled_bytes.items()},
    "est_max_batch": int((hbm - fixed) // per_seq) if hbm and per_seq > 0 else None,
    "hbm_limit_gb": hbm / 1e9 if hbm else None,
    "loss": float(m["loss"]),
  }


INTERLEAVED = "interleaved"  # child mode: every variant in one process, timed in rounds


def interleaved(args) -> dict:
  """Per-variant step times over rounds, and each variant's per-round ratio to the reference."""
  import jax

  from benchmarks import common

  names = args.variants.split(",")
  runs = {}
  for name in names:
    cfg, _, state, step, batch_of = build(
      args.preset, name, args.backend, args.seq, compiler_options=args.compiler_options
    )
    batch = batch_of(args.batch)
    for _ in range(args.warmup):
      state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    runs[name] = [state, step, batch, cfg]
    print(f"{name}: built and warmed up", flush=True)
  ms: dict[str, list[float]] = {name: [] for name in names}
  for r in range(args.interleave):
    for name in common.rotated(names, r):
      ms[name].append(_timed_run(runs[name], args.steps) / args.steps)
    print(f"round {r}: " + ", ".join(f"{n} {ms[n][-1]:.2f} ms" for n in names), flush=True)
  fits = _fit_runs(runs, names, args.fit_steps) if args.fit_steps else {}
  tokens_per_s = lambda step_ms: args.batch * args.seq / (step_ms / 1e3)
  rows = []
  for name in names:
    step_ms = statistics.median(ms[name])
    row = {
      "variant": name,
      "step_ms": step_ms,
      "step_ms_rounds": ms[name],
      "tokens_per_s": tokens_per_s(step_ms),
      "mfu": _mfu(runs[name][3], args.seq, tokens_per_s(step_ms)),
    }
    if args.reference in ms:
      ref = ms[args.reference]
      row["tokens_per_s_vs_dense"] = common.paired_ratio(ref, ms[name])
      row["vs_dense_rounds"] = [a / b for a, b in zip(ref, ms[name], strict=True)]
    if name in fits:
      row.update(fits[name])
      row["tokens_per_s_steady"] = tokens_per_s(fits[name]["steady_step_ms"])
      row["mfu_steady"] = _mfu(runs[name][3], args.seq, row["tokens_per_s_steady"])
      if args.reference in fits:
        row["steady_vs_dense"] = (
          fits[args.reference]["steady_step_ms"] / fits[name]["steady_step_ms"]
        )
    rows.append(row)
  return {"rows": rows}


def _timed_run(run: list, steps: int) -> float:
  """ms for `steps` back-to-back steps of run = [state, step, batch, cfg] and one sync at the
  end, as training runs them; the run keeps the new state."""
  import jax

  state, step, batch, _ = run
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m["loss"])
  run[0] = state
  return (time.perf_counter() - t0) * 1e3


def _fit_runs(runs: dict, names: list[str], fit_steps: str, repeats: int = 2) -> dict:
  """Per variant, runs of N back-to-back steps (N from `fit_steps`, rotated rounds) and the
  least-squares line total_ms = fixed_ms + N * steady_step_ms: what one sync per run costs,
  and the step time a long training loop sees."""
  from benchmarks import common

  counts = [int(n) for n in fit_steps.split(",")]
  samples: dict[str, list[tuple[int, float]]] = {name: [] for name in names}
  for r in range(repeats):
    for name in common.rotated(names, r):
      samples[name] += [(n, _timed_run(runs[name], n)) for n in counts]
  fits = {}
  for name, pts in samples.items():
    slope, intercept = statistics.linear_regression([n for n, _ in pts], [t for _, t in pts])
    fits[name] = {"steady_step_ms": slope, "fixed_ms": intercept, "fit_runs_ms": pts}
    print(f"{name}: {slope:.2f} ms/step + {intercept:.2f} ms per run (fit)", flush=True)
  return fits


def write_results(args, rows: list[dict]) -> None:
  """The JSON with ratios against `--reference` (when it ran)."""
  from benchmarks import common

  ref = next((r for r in rows if r.get("variant") == args.reference and "error" not in r), None)
  if ref:
    for r in rows:
      if "error" not in r:
        r["tokens_per_s_vs_dense"] = r["tokens_per_s"] / ref["tokens_per_s"]
        r["synced_vs_dense"] = r["tokens_per_s_synced"] / ref["tokens_per_s_synced"]
        r["peak_vs_dense"] = r["peak_gb"] / ref["peak_gb"] if ref["peak_gb"] else None
  common.write_json(args.out, {"info": common.run_info(), "args": vars(args), "rows": rows})


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="1b")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--backend", default="auto", help="MoC kernel backend: auto | xla | pallas")
  p.add_argument(
    "--compiler_options", default="auto", help="as train.compiler_options: auto | none | a=b,c=d"
  )
  p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"any of {', '.join(VARIANTS)}")
  p.add_argument("--reference", default="dense", help="variant the ratios are taken against")
  p.add_argument(
    "--estimate_max_batch",
    action="store_true",
    help="also compile at batch/2 to extrapolate the largest batch that fits",
  )
  p.add_argument(
    "--interleave",
    type=int,
    default=0,
    help="R > 0: all variants in one process, timed in R rounds (rotated order); no peak memory",
  )
  p.add_argument(
    "--fit_steps",
    default="",
    help="with --interleave: also time runs of N1,N2,... steps and fit ms = fixed + N * steady",
  )
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/model_step.json"))
  p.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
  args = p.parse_args()
  from benchmarks import common

  if args.variant == INTERLEAVED:
    print(common.RESULT + json.dumps(interleaved(args)), flush=True)
    return
  if args.variant:
    print(common.RESULT + json.dumps(child(args)), flush=True)
    return
  if args.interleave:
    r = common.run_variant_child(__file__, INTERLEAVED, sys.argv[1:])
    if "error" in r:
      print(f"interleaved run failed\n{r['error']}", flush=True)
      sys.exit(1)
    common.write_json(args.out, {"info": common.run_info(), "args": vars(args), "rows": r["rows"]})
    for row in r["rows"]:
      ratio = row.get("tokens_per_s_vs_dense")
      print(
        f"{row['variant']:>16}: {row['step_ms']:.1f} ms/step (median of {args.interleave} rounds), "
        f"{row['tokens_per_s']:,.0f} tok/s, MFU {row['mfu'] or 0:.1%}"
        + (f", {ratio:.3f}x {args.reference}" if ratio else ""),
        flush=True,
      )
    return

  rows = []
  for name in args.variants.split(","):
    t0 = time.perf_counter()
    r = common.run_variant_child(__file__, name, sys.argv[1:])
    rows.append(r)
    if "error" in r:
      print(f"{name}: failed\n{r['error']}", flush=True)
    else:
      r["wall_s"] = time.perf_counter() - t0
      print(
        f"{name:>16}: {r['step_ms']:.1f} ms/step ({r['step_ms_synced_median']:.1f} synced), "
        f"{r['tokens_per_s']:,.0f} tok/s, "
        f"MFU {r['mfu'] or 0:.1%}, peak {r['peak_gb'] or 0:.1f} GB, "
        f"est. max batch {r['est_max_batch']}",
        flush=True,
      )
    write_results(args, rows)  # after every variant: a cut session keeps what finished
  print(
    json.dumps(
      [
        {
          k: r.get(k)
          for k in (
            "variant",
            "tokens_per_s_vs_dense",
            "synced_vs_dense",
            "peak_vs_dense",
            "est_max_batch",
          )
        }
        for r in rows
      ],
      indent=1,
    )
  )


if __name__ == "__main__":
  main()
