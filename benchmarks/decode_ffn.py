"""FFN decode latency for T in {1, 4, 16}: XLA dense, our dense kernels, MoC xla path, MoC kernels.

Each figure is the median over trials of (wall time of R back-to-back dispatches of one jitted
chain of C calls) / (R·C). Every call reads its own input and weight set (C distinct sets, together
many times the 60 MB L2) and every call's output is summed into the chain's result: XLA can neither
drop calls nor merge two dots on shared weights into one (it did so on an earlier version that
reused weight sets within a chain, timing XLA dense at 270 MB in 14 µs). The GPU queue never
drains between dispatches. `stage:` rows time prefixes of the MoC pipeline (gate GEMV; GEMV +
select) and the list rows kernel alone, to place the time. `--phases` picks and orders the work
(see PHASES); with `--budget_s`, what is left when it is spent is listed as skipped, unbuilt.
Single-call latency (one blocking dispatch each) is reported beside it: it is launch-bound.
Bandwidth = bytes the method must read / time: dense 3·D·F·2; MoC D·F·2 + 2·U·D·2 where U is
the number of channels some token selected (the union), measured on the run's own inputs.

  python benchmarks/decode_ffn.py [--quick] [--phases=stages,t1] [--out=benchmarks/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np
from decode_timing import (
  chain,
  copy_bandwidth,
  make_sets,
  rel_err,
  run_info,
  streamed,
  time_chain,
  time_single,
)

from pallas_kernels import _triton_utils as tu
from pallas_kernels import moc_decode, reference
from pallas_kernels._decode_config import LINEAR_DOWN, LIST_TOPK, default_config, legacy_config

SHAPES = ((2048, 5464, 1024), (4096, 11008, 2048), (4096, 14336, 2048))
SKIPPED = "skipped: time budget spent"
# name -> (T, which shapes, kinds). `stages` also times the main methods at the 1B shape, so
# that stage times and totals come from one run; `t1` then does the other shapes.
FIRST, REST, ALL = slice(0, 1), slice(1, None), slice(None)
PHASES = {
  "stages": (1, FIRST, frozenset({"stages", "main"})),
  "t1": (1, REST, frozenset({"main"})),
  "t4": (4, ALL, frozenset({"main"})),
  "t16": (16, ALL, frozenset({"main"})),
  "sweep": (1, FIRST, frozenset({"sweep"})),
  # after the GEMV sweep: the main rows at every shape, the select's knobs on the new default
  "main1": (1, ALL, frozenset({"main"})),
  "selsweep": (1, FIRST, frozenset({"selsweep"})),
  "mask16": (16, ALL, frozenset({"masksweep"})),
  # the dense path's GEMVs: gate+up and down knobs around `dense_config` (2026-12-04 sweep)
  "dense": (1, ALL, frozenset({"dense"})),
  "dense4": (4, FIRST, frozenset({"dense"})),
  # the list pipeline selecting with the Mosaic GPU radix select (opt-in), against its default
  # (the Triton top-K), and the dense FFN's default beside them
  "mgpu1": (1, FIRST, frozenset({"mgpu"})),
  "mgpu4": (4, FIRST, frozenset({"mgpu"})),
  # the FFN GEMVs output-major (`model.decode_gemv='rowdot'`) against the split-K defaults
  "rowdot1": (1, ALL, frozenset({"rowdot"})),
  "rowdot4": (4, FIRST, frozenset({"rowdot"})),
}
# gate+up GEMV knobs (F-block, D-step, splits, warps, stages; 1 split fuses the SwiGLU) and down
# GEMV knobs (column block, row step, splits, warps, stages), each varied with the other default
DENSE_GATE_UP = ((64, 64, 2, 4, 4), (128, 64, 2, 4, 4), (64, 64, 1, 4, 4), (128, 64, 1, 4, 4))
DENSE_GATE_UP += ((64, 128, 2, 4, 4), (64, 64, 4, 4, 4), (64, 64, 2, 4, 6), (128, 64, 8, 4, 3))
DENSE_DOWN = ((256, 128, 16, 4, 3), (128, 64, 16, 4, 3), (128, 64, 8, 4, 4), (256, 128, 8, 4, 3))
DENSE_DOWN += ((256, 128, 32, 4, 3), (256, 64, 16, 4, 3))


def dense_variants(dense_cfg) -> dict:
  """tag -> config: `dense_cfg` with one of DENSE_GATE_UP or DENSE_DOWN."""
  out = {}
  for f, d, s, w, st in DENSE_GATE_UP:
    c = replace(
      dense_cfg, gemv_block_f=f, gemv_block_d=d, gemv_splits=s, gemv_warps=w, gemv_stages=st
    )
    out[f"gu:f{f}_d{d}_s{s}_w{w}_st{st}"] = c
  for f, d, s, w, st in DENSE_DOWN:
    c = replace(
      dense_cfg, down_block_d=f, down_block_c=d, down_splits=s, down_warps=w, down_stages=st
    )
    out[f"down:f{f}_d{d}_s{s}_w{w}_st{st}"] = c
  return out


def mosaic_rows(moc_cfg, moc, f: int, k: int, interp) -> dict:
  """The list pipeline's top-K as the Mosaic GPU radix select (`selection='mgpu'`: one CTA per
  token, the gate partials summed as it loads them; these rows pass no weight to warm), where
  it can run: a compiled Hopper GPU, F <= 8192, K % 8 == 0."""
  auto = replace(moc_cfg.topk, selection="auto")
  if not moc_decode._mosaic_select(jnp.bfloat16, f, k, "moc", auto, tu.default_interpret(interp)):
    return {}
  cfg = replace(moc_cfg, topk=replace(moc_cfg.topk, selection="mgpu"))
  return {"moc_kernel[mgpu]": (moc(cfg), cfg)}


def methods_for(d, f, k, t, variant, interp, kinds: frozenset) -> dict:
  """name -> (fn(x, wg, wu, wu_t, wd), config or None) of the given kinds."""
  new = default_config(t, d, f)
  dense_cfg = moc_decode.dense_config(t, d, f)
  # the dense defaults before 2026-12-04: default_config's gate+up, linear_config's down rule
  before = replace(new, dense_down="gemv", **LINEAR_DOWN)
  moc_cfg = moc_decode.moc_config(t, d, f)
  xla_sum = replace(moc_cfg, fold_gate_sum=False)
  fold = replace(moc_cfg, fold_gate_sum=True)
  old = legacy_config(t, d, f)
  rows_down = replace(new, dense_down="rows")
  # the select before 2026-12-03 (radix steps on one program, 256-lane chunks at d <= 2048)
  own_select = replace(moc_cfg, topk=None, select_chunk=256 if d <= 2048 else 0)
  no_gauss = (
    moc_cfg
    if moc_cfg.topk is None
    else replace(moc_cfg, topk=replace(moc_cfg.topk, gauss_margin=0.0))
  )
  moc = lambda c: (
    lambda x, wg, wu, wut, wd: moc_decode.decode_ffn(
      x, wg, wut, wd, k, variant, config=c, interpret=interp
    )
  )
  dense = lambda c: (
    lambda x, wg, wu, wut, wd: moc_decode.dense_decode_ffn(
      x, wg, wu, wd, config=c, interpret=interp
    )
  )
  dense_defaults = {  # what dense_decode_ffn picks, and what it picked before
    "dense_kernel[new]": (dense(dense_cfg), dense_cfg),
    "dense_kernel[before]": (dense(before), before),
  }
  out = {}
  if "main" in kinds:
    out = {
      "xla_dense": (lambda x, wg, wu, wut, wd: reference.dense_decode_ffn(x, wg, wu, wd), None),
      **dense_defaults,
      "dense_kernel[rows_down]": (dense(rows_down), rows_down),
      "moc_kernel[default]": (moc(moc_cfg), moc_cfg),  # what decode_ffn picks by itself
    }
    if moc_cfg.pipeline == "list":
      mask = replace(new, pipeline="mask")
      out |= {  # the gate partials summed by XLA or by the select: one of the two is the
        # default, so the pair also shows the spread between two timings of one config
        "moc_kernel[xla_gate_sum]": (moc(xla_sum), xla_sum),
        "moc_kernel[fold_gate_sum]": (moc(fold), fold),
        "moc_kernel[own_select]": (moc(own_select), own_select),
        "moc_kernel[no_gauss]": (moc(no_gauss), no_gauss),  # the top-K search over all keys
        "moc_kernel[mask]": (moc(mask), mask),
      }
    else:  # the mask pipeline is the default (T > 4)
      as_list = replace(moc_cfg, pipeline="list", topk=LIST_TOPK, fold_gate_sum=False)
      out["moc_kernel[list]"] = (moc(as_list), as_list)
      # all of Wd through the dense FFN's down GEMV (the default skips rows no token selected)
      dense_down = {knob: getattr(dense_cfg, knob) for knob in LINEAR_DOWN}
      gemv = replace(moc_cfg, dense_down="gemv", **dense_down)
      out["moc_kernel[gemv_down]"] = (moc(gemv), gemv)
  if ("main" in kinds or "mgpu" in kinds) and moc_cfg.topk is not None:
    out |= mosaic_rows(moc_cfg, moc, f, k, interp)
    if "mgpu" in kinds:
      out |= {"dense_kernel[new]": dense_defaults["dense_kernel[new]"]}
      out["moc_kernel[default]"] = (moc(moc_cfg), moc_cfg)
  # The 2026-11-28c rows (histogram select, in-kernel sum of the list partials) are gone with
  # those options (slower on the H200; NOTES_decode.md has the figures).
  if "rowdot" in kinds:  # these rows take two more weights: Wgᵀ and Wdᵀ (`bench_case`)
    out["xla_dense"] = (lambda x, wg, wu, wut, wd: reference.dense_decode_ffn(x, wg, wu, wd), None)
    out.update(dense_defaults)
    dense_rowdot = lambda x, wg, wu, wut, wd, wgt, wdt: moc_decode.dense_decode_ffn(
      x, wgt, wut, wdt, interpret=interp, output_major=True
    )
    moc_rowdot = lambda x, wg, wu, wut, wd, wgt, wdt: moc_decode.decode_ffn(
      x, wgt, wut, wd, k, variant, config=moc_cfg, interpret=interp, output_major=True
    )
    out["dense_kernel[rowdot]"] = (dense_rowdot, None)
    out["moc_kernel[default]"] = (moc(moc_cfg), moc_cfg)
    out["moc_kernel[rowdot]"] = (moc_rowdot, moc_cfg)
    # the same with every T = 1 GEMV on a resident grid (`RowdotConfig.programs`, untimed)
    out["dense_kernel[rowdot_rds]"] = (streamed(dense_rowdot), None)
    out["moc_kernel[rowdot_rds]"] = (streamed(moc_rowdot), moc_cfg)
  if "selsweep" in kinds:  # knobs of the decode select (`own_select`), not of the top-K one
    for tag, c in (
      ("own,sel8w", replace(own_select, select_warps=8)),
      ("own,sel32w", replace(own_select, select_warps=32)),
      ("own,radix4", replace(own_select, select_radix_bits=4)),
      ("own,gemv_s1", replace(own_select, gemv_splits=1, gemv_block_f=32, gemv_block_d=256)),
      ("own,pieces256", replace(own_select, select_granule=256)),  # 5632 lanes, not 8192
      # equal chunks summed lane-wise (one reduction per radix step), final pass on pieces
      ("own,chunk512", replace(own_select, select_chunk=512)),
      ("own,chunk256", replace(own_select, select_chunk=256)),
      ("own,chunk512,radix4", replace(own_select, select_chunk=512, select_radix_bits=4)),
      ("own,chunk512,sel8w", replace(own_select, select_chunk=512, select_warps=8)),
    ):
      out[f"moc_kernel[{tag}]"] = (moc(c), c)
  # the mask pipeline's knobs (the default at T > 4). Swept one at a time on 12-04
  # (decode_ffn_mask16_h200_20261204{,b}.json): 16 down splits of 64-row steps won (now the
  # default); a gate GEMV of 2 splits or 4 stages, 8 or 1024-wide up blocks, 8 up warps,
  # 256-wide down blocks or 8 select warps did not
  if "masksweep" in kinds:
    out.update(dense_defaults)
    out["moc_kernel[default]"] = (moc(moc_cfg), moc_cfg)
    for tag, c in (
      ("before", replace(new, pipeline="mask")),  # default_config's 4 or 8 down splits
      ("down_c32", replace(moc_cfg, down_block_c=32)),
      ("up_c32", replace(moc_cfg, up_block_c=32)),
      ("down_s8", replace(moc_cfg, down_splits=8)),
    ):
      out[f"moc_kernel[{tag}]"] = (moc(c), c)
  if "dense" in kinds:
    out.update(dense_defaults)
    for tag, c in dense_variants(dense_cfg).items():
      if c != dense_cfg:
        out[f"dense_kernel[{tag}]"] = (dense(c), c)
    out["moc_kernel[default]"] = (moc(moc_cfg), moc_cfg)
  if "sweep" in kinds:  # a few guesses around the new defaults, each a single knob
    lst = replace(new, pipeline="list")
    for tag, c in (
      ("list,sel32w", replace(lst, select_warps=32)),
      ("list,sel32w,radix4", replace(lst, select_warps=32, select_radix_bits=4)),
      ("list,rows16", replace(lst, list_rows=16, list_warps=2 * lst.list_warps)),
      ("list,prog256", replace(lst, list_programs=256)),
      ("list,prog64", replace(lst, list_programs=64)),
      ("list,gemv_bf256", replace(lst, gemv_block_f=256, gemv_warps=8)),
      ("list,gemv_bd128_st4", replace(lst, gemv_block_d=128, gemv_stages=4)),
      # one D split: the select loads one fp32 row of G, not 4-8 partial rows, on one SM
      ("list,gemv_nosplit", replace(lst, gemv_splits=1, gemv_block_f=32, gemv_block_d=256)),
    ):
      out[f"moc_kernel[{tag}]"] = (moc(c), c)
  if "stages" in kinds:
    i = tu.default_interpret(interp)
    gemv = lambda c, x, wg: moc_decode._gemv(x, (wg,), c, swiglu=False, interpret=i)
    sel = lambda c, x, wg, lists: moc_decode._decode_select.select_scale(
      gemv(c, x, wg),
      k,
      variant,
      d_ff=f,
      round_dtype=x.dtype,
      warps=c.select_warps,
      radix_bits=c.select_radix_bits,
      lists=lists,
      interpret=i,
    )
    lst = replace(new, pipeline="list")
    # rows kernel (+ the XLA sum of its partials) alone, on K channels spread evenly over F
    idx = jnp.broadcast_to((jnp.arange(k, dtype=jnp.int32) * f) // k, (t, k))
    rows = lambda x, wut, wd: moc_decode._decode_list.rows_ffn(
      x, idx, jnp.full((t, k), 0.5, jnp.float32), wut, wd, lst, interpret=i
    )
    out["stage:rows[list]"] = (lambda x, wg, wu, wut, wd: rows(x, wut, wd), lst)
    out["stage:gemv[new]"] = (lambda x, wg, wu, wut, wd: gemv(new, x, wg), new)
    out["stage:gemv+select_list[new]"] = (
      lambda x, wg, wu, wut, wd: sel(new, x, wg, True)[1],
      new,
    )
    out["stage:gemv+select_mask[new]"] = (
      lambda x, wg, wu, wut, wd: sel(new, x, wg, False),
      new,
    )
    out["stage:gemv[old]"] = (lambda x, wg, wu, wut, wd: gemv(old, x, wg), old)
    out["stage:gemv+select_mask[old]"] = (
      lambda x, wg, wu, wut, wd: sel(old, x, wg, False),
      old,
    )
  return out


def bench_case(d, f, k, variant, t, kinds, sets, args, deadline) -> list[dict]:
  dtype = jnp.bfloat16
  dense_bytes = 3 * d * f * 2
  xs = [jax.random.normal(jax.random.key(100 * t + i), (t, d), dtype) for i in range(len(sets))]
  x = xs[0]
  union = []
  for xi, (wg, *_) in zip(xs, sets, strict=True):
    g = jnp.dot(xi, wg, preferred_element_type=jnp.float32).astype(dtype)
    idx, _ = reference.select(g, k, variant)
    union.append(len(np.unique(np.asarray(idx))))
  moc_bytes = d * f * 2 + 2 * float(np.mean(union)) * d * 2
  interp = True if args.quick else None
  methods = methods_for(d, f, k, t, variant, interp, kinds)
  ref_dense = reference.dense_decode_ffn(x, *[sets[0][i] for i in (0, 1, 3)])
  ref_moc = reference.decode_ffn(x, sets[0][0], sets[0][2], sets[0][3], k, variant)
  sets_t = None  # (..., Wgᵀ, Wdᵀ) for the output-major rows, transposed once
  rows = []
  for name, (fn, c) in methods.items():
    row = {"d": d, "F": f, "K": k, "T": t, "variant": variant, "method": name}
    row_sets = sets
    if "rowdot" in name:
      transpose = jax.jit(jnp.transpose)
      sets_t = sets_t or [(*s, transpose(s[0]), transpose(s[3])) for s in sets]
      row_sets = sets_t
    row["bytes_must_read"] = dense_bytes if "dense" in name else moc_bytes
    if name.startswith("stage:"):  # what the stage itself must read
      row["bytes_must_read"] = 2 * t * k * d * 2 if "rows" in name else d * f * 2
    row["union_channels"] = float(np.mean(union))
    if c:
      row["config"] = asdict(c)
    if time.perf_counter() > deadline:
      row["error"] = SKIPPED
      rows.append(row)
      continue
    try:
      jfn = jax.jit(fn)
      y = jfn(x, *row_sets[0])
      if not name.startswith("stage:"):
        row["rel_err_vs_reference"] = rel_err(y, ref_dense if "dense" in name else ref_moc)
      timing = time_chain(chain(fn), (xs, row_sets), len(sets), args.reps, args.trials)
      row["time_s"] = timing["median_s"]
      row["trials_s"] = timing["trials_s"]
      row["single_call_s"] = time_single(jfn, (x, *row_sets[0]), args.trials)
      row["bandwidth_Bps"] = row["bytes_must_read"] / row["time_s"]
    except Exception as e:
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    brief = {k2: v for k2, v in row.items() if k2 not in ("trials_s", "config", "variant")}
    print(json.dumps(brief), flush=True)
    rows.append(row)
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny shapes in interpret mode (CPU)")
  p.add_argument("--out", default="benchmarks/results/decode_ffn.json")
  p.add_argument("--calls", type=int, default=8, help="calls (= distinct weight sets) per chain")
  p.add_argument("--reps", type=int, default=4)
  p.add_argument("--trials", type=int, default=3)
  p.add_argument("--variant", default="moc")
  p.add_argument(
    "--phases",
    default="stages,t4,sweep,t1,t16",
    help=f"comma-separated, run in this order; of {','.join(PHASES)}",
  )
  p.add_argument("--budget_s", type=float, default=1e9, help="skip what is left after this")
  args = p.parse_args()
  deadline = time.perf_counter() + args.budget_s
  shapes = ((64, 200, 40),) if args.quick else SHAPES
  result = {**run_info(), "method": __doc__.split("\n\n")[0], "rows": []}
  result["bandwidth"] = copy_bandwidth(2**20 if args.quick else 2**31, args.trials)
  print(json.dumps(result["bandwidth"]), flush=True)
  calls = 2 if args.quick else args.calls
  for phase in args.phases.split(","):
    t, which, kinds = PHASES[phase]
    for d, f, k in shapes[which]:
      if time.perf_counter() > deadline:  # no weight sets, no references: just the row names
        names = methods_for(d, f, k, t, args.variant, True, kinds)
        result["rows"] += [
          {"d": d, "F": f, "K": k, "T": t, "method": n, "error": SKIPPED} for n in names
        ]
      else:
        sets = make_sets(d, f, calls, jnp.bfloat16)
        result["rows"] += bench_case(d, f, k, args.variant, t, kinds, sets, args, deadline)
        del sets
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as fh:  # after every case: a timeout keeps what was measured
        json.dump(result, fh, indent=1)
  print_table(result)


def _fastest(rows: list[dict], prefix: str) -> dict | None:
  mine = [r for r in rows if r["method"].startswith(prefix)]
  return min(mine, key=lambda r: r["time_s"], default=None)


def print_table(result: dict) -> None:
  """One line per (shape, T): every method's µs; then best dense kernel vs best MoC kernel."""
  copy = result["bandwidth"]["copy_Bps"]
  print(f"\ncopy {copy / 1e12:.2f} TB/s, read {result['bandwidth']['read_Bps'] / 1e12:.2f} TB/s")
  keys = sorted({(r["d"], r["F"], r["T"]) for r in result["rows"]})
  for d, f, t in keys:
    rows = [r for r in result["rows"] if (r["d"], r["F"], r["T"]) == (d, f, t)]
    ok = [r for r in rows if "time_s" in r]
    cells = [f"{r['method']}={r['time_s'] * 1e6:.1f}" for r in ok]
    cells += [
      f"{r['method']}={'skip' if r['error'] == SKIPPED else 'ERR'}" for r in rows if "error" in r
    ]
    print(f"d={d} F={f} T={t}: " + " ".join(cells))
    dk, mk, xd = (_fastest(ok, pre) for pre in ("dense_kernel", "moc_kernel", "xla_dense"))
    if dk and mk:
      dense = min((r for r in (dk, xd) if r), key=lambda r: r["time_s"])
      print(
        f"   best dense {dense['method']} {dense['time_s'] * 1e6:.1f}us "
        f"({100 * dense['bandwidth_Bps'] / copy:.0f}% copy) | best moc {mk['method']} "
        f"{mk['time_s'] * 1e6:.1f}us ({100 * mk['bandwidth_Bps'] / copy:.0f}% copy) | "
        f"moc speedup vs our dense {dk['time_s'] / mk['time_s']:.2f}x, vs best dense "
        f"{dense['time_s'] / mk['time_s']:.2f}x"
      )


if __name__ == "__main__":
  main()
