"""Every GEMM a compiled training step runs, with its FLOPs and, from a profiler trace, its
achieved TFLOP/s: which GEMMs keep a step below peak (cuBLAS custom calls vs XLA's Triton GEMM
fusions, odd shapes, GEMMs run many times in a loop).

  python benchmarks/gemm_report.py --preset=1b --batch=64 --seq=256 --profile \\
      --out=benchmarks/results/gemm_report_1b.json

The GEMMs come from the optimized HLO (`step.lower(...).compile().as_text()`): cuBLAS
custom calls (contraction dims from their backend_config), Triton GEMM fusions and other
fusions whose called computation holds a `dot` (XLA:CPU's `__ynn_fusion`s), plain `dot`s
outside fusions, and cuDNN custom calls (attention; no FLOPs). With `--profile` the step is
traced and each GEMM's device time is joined on its HLO instruction name (the trace event's
`hlo_op`), with calls per step counted from the trace, so a GEMM inside a while loop over
layers gets its N runs per step (`runs_per_step` is the HLO's own count, from the loop's
known trip count, to check it against).

On GPU the trace must be taken with command buffers off (XLA_FLAGS=
--xla_gpu_enable_command_buffer=): kernels run inside a CUDA graph all carry the graph's op
name (`command_buffer_N`), so no GEMM could be matched. The CLI appends that flag to XLA_FLAGS
itself before jax is imported, unless `--keep_command_buffers` is given; GEMM time measured so
may differ slightly from a graph-launched step's.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks import step_profile  # noqa: E402  (no jax at import: XLA_FLAGS come first)
from benchmarks.hlo_gemms import gemms_of_hlo  # noqa: E402

NO_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer="


def op_times(events: list[dict]) -> tuple[dict[str, float], dict[str, int]]:
  """Per HLO op: device µs summed, and calls (the most events of any one kernel of the op, so
  a GEMM that launches a split-K reduce beside its main kernel is one call, not two)."""
  times: dict[str, float] = collections.defaultdict(float)
  per_kernel: collections.Counter[tuple[str, str]] = collections.Counter()
  for e in events:
    op = step_profile.hlo_op(e)
    times[op] += e["dur"]
    per_kernel[op, e["name"]] += 1
  calls: dict[str, int] = {}
  for (op, _), n in per_kernel.items():
    calls[op] = max(calls.get(op, 0), n)
  return dict(times), calls


def gemm_table(
  gemms: dict[str, dict], op_times_us: dict[str, float], op_calls: dict[str, int], steps: int
) -> list[dict]:
  """One row per GEMM, costliest first: per-step calls, ms and TFLOP, achieved TFLOP/s.

  `op_times_us` is summed over `steps` steps; a GEMM absent from it gets ms 0, no rate. A
  name not found is tried as its kernel name ('.' -> '_': `gemm_fusion_dot.3` runs as kernel
  `gemm_fusion_dot_3`, which is all a trace taken with command buffers names it by).
  `tflops_per_call_total` is TFLOP per step over all its calls (flops × calls/step).
  """
  rows = []
  for name, g in gemms.items():
    key = name if name in op_times_us else name.replace(".", "_")
    us = op_times_us.get(key, 0.0)
    calls = op_calls.get(key, steps if us else 0) / steps
    ms = us / steps / 1e3
    tflop = g["flops"] * calls / 1e12 if g["flops"] is not None else None
    rows.append(
      {
        "name": name,
        "kind": g["kind"],
        "out_shape": g["out_shape"],
        "batch": g["batch"],
        "m": g.get("m"),
        "n": g.get("n"),
        "k": g["k"],
        "dtype": g["dtype"],
        "operand_dtypes": [o[0] if o else None for o in g.get("operand_shapes") or []],
        "flops": g["flops"],
        "calls_per_step": calls,
        "runs_per_step": g.get("runs_per_step"),  # the HLO's count, to check `calls` against
        "ms_per_step": ms,
        "tflops_per_call_total": tflop,
        "tflops_per_s": tflop / (ms / 1e3) if tflop and ms > 0 else None,
      }
    )
  return sorted(rows, key=lambda r: (-r["ms_per_step"], -(r["flops"] or 0), r["name"]))


def _totals(rows: list[dict], peak_tflops: float | None) -> dict:
  timed = [r for r in rows if r["ms_per_step"] > 0 and r["tflops_per_call_total"] is not None]
  ms = sum(r["ms_per_step"] for r in timed)
  tflop = sum(r["tflops_per_call_total"] for r in timed)
  rate = tflop / (ms / 1e3) if ms > 0 else None
  return {
    "gemms": len(rows),
    "timed": len(timed),
    "ms_per_step": ms,
    "tflop_per_step": tflop,
    "tflops_per_s": rate,
    "share_of_peak": rate / peak_tflops if rate is not None and peak_tflops else None,
    # time of GEMM-like ops with no FLOP count (cuDNN attention): not in the rate above
    "ms_without_flops": sum(r["ms_per_step"] for r in rows if r["tflops_per_call_total"] is None),
  }


def summary(rows: list[dict], peak_tflops: float | None) -> dict:
  """Total GEMM ms, TFLOP and achieved TFLOP/s per step (timed GEMMs with FLOPs), also by
  kind, with each rate's share of `peak_tflops`."""
  kinds = sorted({r["kind"] for r in rows})
  return {
    "peak_tflops": peak_tflops,
    **_totals(rows, peak_tflops),
    "by_kind": {k: _totals([r for r in rows if r["kind"] == k], peak_tflops) for k in kinds},
  }


COLUMNS = ("name", "kind", "types", "batch", "MxNxK", "calls", "ms", "TFLOP/s")


def _fmt_rows(rows: list[dict], top: int) -> list[dict]:
  from benchmarks.common import fmt  # imports jax: not before main() sets XLA_FLAGS

  return [
    {
      "name": r["name"],
      "kind": r["kind"],
      "types": ",".join(str(t) for t in r["operand_dtypes"]) + f"->{r['dtype']}",
      "batch": r["batch"] if r["batch"] not in (None, 1) else "",
      "MxNxK": "x".join(str(v or "?") for v in (r["m"], r["n"], r["k"])) if r["k"] else "-",
      "calls": fmt(r["calls_per_step"] if r["ms_per_step"] else r["runs_per_step"], 0),
      "ms": fmt(r["ms_per_step"], 3),
      "TFLOP/s": "-" if r["tflops_per_s"] is None else f"{r['tflops_per_s']:.3g}",
    }
    for r in rows[:top]
  ]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="1b")
  p.add_argument("--variant", default="dense", help="a benchmarks/model_step.py variant")
  p.add_argument("--backend", default="auto", help="MoC kernel backend: auto | xla | pallas")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--vocab", type=int, default=32000)
  p.add_argument("--profile", action="store_true", help="trace steps and join per-GEMM time")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--top", type=int, default=20, help="rows printed")
  p.add_argument("--trace_dir", help="keep the trace here (default: a temporary directory)")
  p.add_argument(
    "--keep_command_buffers",
    action="store_true",
    help="do not turn CUDA graphs off (their kernels then all carry the graph's op name)",
  )
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/gemm_report.json"))
  args = p.parse_args(argv)
  if not args.keep_command_buffers:
    flags = os.environ.get("XLA_FLAGS", "")
    if NO_COMMAND_BUFFERS not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} {NO_COMMAND_BUFFERS}".strip()
    if "jax" in sys.modules:
      print("note: jax was imported before XLA_FLAGS was set; the flag may not apply")

  import jax

  from benchmarks import common, model_step
  from moc_jax import train_lib

  cfg, _, state, step, batch_of = model_step.build(
    args.preset, args.variant, args.backend, args.seq, vocab=args.vocab
  )
  batch = batch_of(args.batch)
  compiled = step.lower(state, batch).compile()  # run this executable: the names match
  gemms = gemms_of_hlo(compiled.as_text())
  peak = train_lib.device_peak_tflops(None)
  hlo_tflop = sum((g["flops"] or 0) * (g["runs_per_step"] or 1) for g in gemms.values()) / 1e12
  model_tflop = train_lib.train_flops_per_token(cfg, args.seq) * args.batch * args.seq / 1e12
  payload = {
    "info": common.run_info(),
    "args": vars(args),
    "hlo_gemm_tflop_per_step": hlo_tflop,  # loops of unknown trip count counted once
    "model_tflop_per_step": model_tflop,
    "gemms": [{"name": n, **g} for n, g in gemms.items()],
  }
  print(
    f"{len(gemms)} GEMMs, {hlo_tflop:.4g} TFLOP/step in the HLO, {model_tflop:.4g} in the model"
  )
  if args.profile:
    for _ in range(args.warmup):
      state, _ = compiled(state, batch)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as tmp:
      log_dir = args.trace_dir or tmp
      with jax.profiler.trace(log_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
          state, _ = compiled(state, batch)
        jax.block_until_ready(state)
      events = step_profile.device_events(step_profile.read_trace(log_dir))
    times, calls = op_times(events)
    rows = gemm_table(gemms, times, calls, args.steps)
    payload.update(table=rows, summary=summary(rows, peak))
    payload["summary"]["step"] = {  # what the GEMM time is a share of
      "device_ms_per_step": sum(times.values()) / args.steps / 1e3,
      "busy_ms_per_step": step_profile.busy_time(events) / args.steps / 1e3,
    }
    common.print_table(_fmt_rows(rows, args.top), COLUMNS)
    s = payload["summary"]
    share = f", {s['share_of_peak']:.1%} of {peak:g}" if s["share_of_peak"] else ""
    rate = f"{s['tflops_per_s']:.3g}" if s["tflops_per_s"] else "-"
    print(
      f"GEMMs: {s['ms_per_step']:.3f} of {s['step']['busy_ms_per_step']:.3f} busy ms/step, "
      f"{s['tflop_per_step']:.4g} TFLOP/step, {rate} TFLOP/s{share}"
    )
    for kind, t in s["by_kind"].items():
      rate = f"{t['tflops_per_s']:.3g} TFLOP/s" if t["tflops_per_s"] else "no FLOP count"
      extra = f" (+{t['ms_without_flops']:.3f} ms, no FLOPs)" if t["ms_without_flops"] else ""
      print(
        f"  {kind:>12}: {t['timed']}/{t['gemms']} timed, {t['ms_per_step']:.3f} ms{extra}, {rate}"
      )
  else:
    rows = gemm_table(gemms, {}, {}, 1)
    rows.sort(key=lambda r: -(r["flops"] or 0))
    common.print_table(_fmt_rows(rows, args.top), COLUMNS)
  common.write_json(args.out, payload)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
