"""GEMV configs for `_decode_gemv.linear` at our presets' decode shapes, against XLA's dot.

For T in {1, 4} and each (D, N) in SHAPES: ~30 DecodeConfigs per shape (the current defaults,
`linear_config`'s pick, every one-knob change of that pick, then a seeded draw from the rest of
the grid, keeping only configs whose D splits hold at least one whole D block) and
`reference.linear` (XLA's jnp.dot) as the baseline. Timing is `decode_timing.time_chain`: one
jitted chain of C calls, each with its own x and weight (C ≥ 8, and ≥ --min_chain_mb of weights
so that at least 4× the 50-60 MB L2 streams; XLA can neither merge dots nor keep a weight in L2),
every output summed into the result, medians over trials of R dispatches. Each config's chain
result is checked once against the same chain in XLA with fp32 outputs (relative error).
Bandwidth = D·N·2 bytes / time per call, also as % of the copy bandwidth measured in the run.
The JSON is rewritten after every shape; past --budget_s the remaining rows are marked skipped.

With --methods=splitk,rowdot the output-major GEMV (`_decode_rowdot`, the weight transposed to
N × D once, outside the timed chain) is swept beside the split-K one in the same run.

  python benchmarks/gemv_sweep.py [--quick] [--budget_s=500] [--tokens=1,4]
      [--shapes=2048x6144,2048x32000] [--methods=splitk,rowdot] [--configs=30]
      [--rowdot_configs=20] [--out=benchmarks/results/gemv_sweep.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
from decode_timing import chain, copy_bandwidth, make_sets, rel_err, run_info, time_chain

from pallas_kernels import _decode_gemv, _decode_rowdot, reference
from pallas_kernels import _triton_utils as tu
from pallas_kernels._decode_config import DecodeConfig, cdiv, moc_config, pow2_at_least

SHAPES = {  # (D, N) -> what it is
  (2048, 6144): "1b qkv",
  (2048, 2048): "1b o-proj",
  (2048, 32000): "1b unembed",
  (2048, 5464): "1b MoC gate",
  (2048, 10928): "1b dense gate+up (as one weight)",
  (5464, 2048): "1b dense down",
  (4096, 12288): "7b qkv",
  (4096, 4096): "7b o-proj",
  (4096, 11008): "7b FFN gate/up",
}
QUICK_SHAPES = {(64, 200): "quick"}
GRID = {
  "gemv_block_f": (64, 128, 256),
  "gemv_block_d": (64, 128, 256),
  "gemv_splits": (1, 2, 4, 8, 16, 32),
  "gemv_warps": (4, 8),
  # 6 and 8: more bytes in flight per SM (the MoC gate at d = 2048 streams ~1.5 TB/s in a chain)
  "gemv_stages": (2, 3, 4, 6, 8),
}
ROWDOT_GRID = {  # the output-major GEMV (`_decode_rowdot`, weight stored N x D)
  "prefetch": (False, True),
  "t1_dot": (False, True),
  "block_n": (4, 8, 16, 32),
  "block_d": (256, 512, 1024, 2048),
  "warps": (2, 4, 8),
  "stages": (1, 2, 3, 4),
}
SKIPPED = "skipped: time budget spent"
XLA = "xla"


def knobs(c: DecodeConfig) -> dict:
  return {k: getattr(c, k) for k in (*GRID, "t1_dot")}


def config_name(c: DecodeConfig) -> str:
  name = "f{gemv_block_f}_d{gemv_block_d}_s{gemv_splits}_w{gemv_warps}_st{gemv_stages}"
  return name.format(**knobs(c)) + ("" if c.t1_dot else "_reduce")


def candidates(t: int, d: int, n: int, most: int) -> dict[str, DecodeConfig]:
  """Name -> config: linear_config's pick, today's gate defaults, one-knob moves, a draw."""
  pick = _decode_gemv.linear_config(t, d, n)
  gate = moc_config(t, d, n)  # what the MoC gate GEMV runs today
  out = {config_name(pick): pick, config_name(gate): gate}
  if t == 1:  # the multiply-reduce path for one token, once
    reduce = dataclasses.replace(pick, t1_dot=False)
    out[config_name(reduce)] = reduce
  fits = lambda c: c.gemv_splits * c.gemv_block_d <= d  # every split gets a whole D block
  for key, values in GRID.items():
    for v in values:
      c = dataclasses.replace(pick, **{key: v})
      if fits(c):
        out.setdefault(config_name(c), c)
  rest = [
    dataclasses.replace(pick, **dict(zip(GRID, vs, strict=True)))
    for vs in itertools.product(*GRID.values())
  ]
  rest = [c for c in rest if fits(c) and config_name(c) not in out]
  random.Random(f"{t},{d},{n}").shuffle(rest)
  for c in rest[: max(0, most - len(out))]:
    out[config_name(c)] = c
  return dict(itertools.islice(out.items(), most))


def rowdot_name(c: _decode_rowdot.RowdotConfig) -> str:
  name = "rowdot_n{block_n}_d{block_d}_w{warps}_st{stages}".format(**dataclasses.asdict(c))
  name += ("_dot" if c.t1_dot else "") + ("_pf" if c.prefetch else "")
  return name + (f"_p{c.programs}" if c.programs else "")


def streaming_moves(pick, n: int, sms: int) -> list:
  """At T = 1, grids of a few programs streaming their blocks (`RowdotConfig.programs`): the
  pick's tile on 2 or 4 programs per SM; 4 rows 512 wide on 4 per SM or on two blocks a
  program (where that fits 8 per SM); 4 rows 2048 wide on 4 per SM. Registers compiled for
  sm_90 (sass_report, the 1b gate): 104, 64 and 106, so 4 programs per SM stay resident."""
  blocks = lambda rows: -(-n // rows)
  moves = [(pick.block_n, pick.block_d, 2 * sms), (pick.block_n, pick.block_d, 4 * sms)]
  moves += [(4, 512, 4 * sms), (4, 512, -(-blocks(4) // 2)), (4, 2048, 4 * sms)]
  return [
    dataclasses.replace(pick, block_n=rows, block_d=width, programs=programs)
    for rows, width, programs in moves
    if programs < blocks(rows) and programs <= 8 * sms
  ]


def rowdot_candidates(t: int, d: int, n: int, most: int) -> dict:
  """Name -> RowdotConfig: rowdot_config's pick, (T = 1) grids of a few programs streaming
  their blocks, its one-knob moves each also with the loads one step ahead (prefetch), then
  a seeded draw."""
  pick = _decode_rowdot.rowdot_config(t, d, n)
  out = {rowdot_name(pick): pick}
  if t == 1:
    sms = tu.sm_count()
    out.update((rowdot_name(c), c) for c in streaming_moves(pick, n, sms))
  bases = (pick, dataclasses.replace(pick, prefetch=True))
  moves = [
    dataclasses.replace(b, **{k: v}) for k, vs in ROWDOT_GRID.items() for v in vs for b in bases
  ]
  rest = [
    _decode_rowdot.RowdotConfig(**dict(zip(ROWDOT_GRID, vs, strict=True)))
    for vs in itertools.product(*ROWDOT_GRID.values())
  ]
  random.Random(f"rowdot {t},{d},{n}").shuffle(rest)
  for c in moves + rest:
    if (t > 1 or c.prefetch) and c.t1_dot:  # one token has a choice; tl.dot is pipelined
      continue
    if t > 1 and c.prefetch:  # more tokens take tl.dot, which ignores it
      continue
    out.setdefault(rowdot_name(c), c)
  return dict(itertools.islice(out.items(), most))


def bench_shape(t, d, n, names, args, deadline, copy_bps) -> list[dict]:
  """All rows of one (T, D, N): XLA first, then each config; skipped past the deadline."""
  calls = max(args.calls, cdiv(args.min_chain_mb * 2**20, d * n * 2))
  base = {"T": t, "D": d, "N": n, "shape": args.shapes_map[(d, n)], "calls": calls}
  if time.perf_counter() > deadline:
    return [{**base, "name": k, "error": SKIPPED} for k in [XLA, *names]]
  dtype = jnp.bfloat16
  sets = [(s[0],) for s in make_sets(d, n, calls, dtype, seed=7 * t)]
  xs = [jax.random.normal(jax.random.key(1000 * t + i), (t, d), dtype) for i in range(calls)]
  want = chain(lambda x, w: reference.linear(x, w, jnp.float32))(xs, sets)
  interp = True if args.quick else None
  fns = {XLA: (lambda x, w: reference.linear(x, w), None)}
  for name, c in names.items():
    if isinstance(c, _decode_rowdot.RowdotConfig):
      fns[name] = (lambda x, w, c=c: _decode_rowdot.rowdot(x, w, config=c, interpret=interp), c)
    else:
      fns[name] = (lambda x, w, c=c: _decode_gemv.linear(x, w, config=c, interpret=interp), c)
  sets_t = None  # the output-major weights, transposed once when a rowdot row needs them
  rows = []
  for name, (fn, c) in fns.items():
    row = {**base, "name": name, "method": XLA if c is None else "pallas"}
    if isinstance(c, _decode_rowdot.RowdotConfig):
      row.update(method="rowdot", config=dataclasses.asdict(c))
      row["programs"] = cdiv(n, min(c.block_n, pow2_at_least(n)))
    elif c is not None:
      row["config"] = knobs(c)
      row["programs"] = cdiv(n, min(c.gemv_block_f, pow2_at_least(n))) * c.gemv_splits
    if time.perf_counter() > deadline:
      rows.append({**row, "error": SKIPPED})
      continue
    try:
      ws = sets
      if row["method"] == "rowdot":
        sets_t = sets_t or [(jax.jit(jnp.transpose)(s[0]),) for s in sets]
        ws = sets_t
      run = chain(fn)
      row["rel_err"] = rel_err(run(xs, ws), want)  # compiles; time_chain then reuses it
      timing = time_chain(run, (xs, ws), calls, args.reps, args.trials)
      row["us_per_call"] = timing["median_s"] * 1e6
      row["trials_us"] = [s * 1e6 for s in timing["trials_s"]]
      row["bandwidth_Bps"] = d * n * 2 / timing["median_s"]
      row["pct_copy"] = 100 * row["bandwidth_Bps"] / copy_bps
    except Exception as e:  # a config Triton rejects (shared memory, registers) is a row too
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps({k: v for k, v in row.items() if k not in ("trials_us", "config")}))
    rows.append(row)
  return rows


def summarize(rows: list[dict]) -> list[dict]:
  """Per (T, D, N): the fastest config, linear_config's pick and XLA, in µs per call."""
  out = []
  for key in sorted({(r["T"], r["D"], r["N"]) for r in rows}):
    mine = [r for r in rows if (r["T"], r["D"], r["N"]) == key and "us_per_call" in r]
    ours = [r for r in mine if r["method"] == "pallas"]
    rowdots = [r for r in mine if r["method"] == "rowdot"]
    xla = next((r for r in mine if r["method"] == XLA), None)
    pick = config_name(_decode_gemv.linear_config(*key))
    s = {"T": key[0], "D": key[1], "N": key[2], "timed": len(mine)}
    s["xla_us"] = xla["us_per_call"] if xla else None
    s["linear_config"] = pick
    s["linear_config_us"] = next((r["us_per_call"] for r in ours if r["name"] == pick), None)
    if ours:
      best = min(ours, key=lambda r: r["us_per_call"])
      s.update(best=best["name"], best_us=best["us_per_call"], best_config=best["config"])
      s["best_pct_copy"] = best["pct_copy"]
      s["best_vs_xla"] = s["xla_us"] / best["us_per_call"] if xla else None
    if rowdots:
      best = min(rowdots, key=lambda r: r["us_per_call"])
      s.update(rowdot_best=best["name"], rowdot_us=best["us_per_call"])
      s["rowdot_pct_copy"] = best["pct_copy"]
    out.append(s)
  return out


def print_table(result: dict) -> None:
  print(f"\ncopy {result['bandwidth']['copy_Bps'] / 1e12:.2f} TB/s; µs per call:")
  f = lambda v: "-" if v is None else f"{v:.1f}"
  for s in result["best"]:
    print(
      f"T={s['T']} D={s['D']} N={s['N']}: xla {f(s['xla_us'])} | linear_config "
      f"{s['linear_config']} {f(s['linear_config_us'])} | best {s.get('best', '-')} "
      f"{f(s.get('best_us'))} ({f(s.get('best_pct_copy'))}% copy) | rowdot "
      f"{s.get('rowdot_best', '-')} {f(s.get('rowdot_us'))} ({f(s.get('rowdot_pct_copy'))}% copy)"
    )


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="CPU dry run: tiny shape, 2 configs")
  p.add_argument("--out", default="benchmarks/results/gemv_sweep.json")
  p.add_argument("--tokens", default="1,4")
  p.add_argument("--shapes", default="", help="DxN,DxN (default: all of SHAPES)")
  p.add_argument("--configs", type=int, default=30, help="configs per shape, XLA not counted")
  p.add_argument(
    "--methods",
    default="splitk",
    help="splitk (the D x N split-K GEMV), rowdot (the N x D output-major one) or both, comma "
    "separated; with both, --configs split-K configs then --rowdot_configs rowdot ones",
  )
  p.add_argument("--rowdot_configs", type=int, default=20, help="rowdot configs per shape")
  p.add_argument("--calls", type=int, default=8, help="at least this many calls per chain")
  p.add_argument("--min_chain_mb", type=int, default=256, help="weight MiB per chain, at least")
  p.add_argument("--reps", type=int, default=4)
  p.add_argument("--trials", type=int, default=5)
  p.add_argument("--budget_s", type=float, default=1e9, help="skip what is left after this")
  args = p.parse_args(argv)
  deadline = time.perf_counter() + args.budget_s
  args.shapes_map = QUICK_SHAPES if args.quick else SHAPES
  if args.shapes:
    wanted = {tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")}
    args.shapes_map = {k: v for k, v in SHAPES.items() if k in wanted}
  if args.quick:
    args.configs, args.calls, args.min_chain_mb, args.reps, args.trials = 2, 2, 0, 1, 2
  result = {**run_info(), "method": __doc__.split("\n\n")[0], "rows": [], "best": []}
  result["bandwidth"] = copy_bandwidth(2**20 if args.quick else 2**31, 3)
  for t in (int(v) for v in args.tokens.split(",")):
    for d, n in args.shapes_map:
      methods = args.methods.split(",")
      names = candidates(t, d, n, args.configs) if "splitk" in methods else {}
      if "rowdot" in methods:
        names.update(rowdot_candidates(t, d, n, 2 if args.quick else args.rowdot_configs))
      result["rows"] += bench_shape(t, d, n, names, args, deadline, result["bandwidth"]["copy_Bps"])
      result["best"] = summarize(result["rows"])
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as fh:  # after every shape: a timeout keeps what ran
        json.dump(result, fh, indent=1)
  print_table(result)
  return result


if __name__ == "__main__":
  main()
