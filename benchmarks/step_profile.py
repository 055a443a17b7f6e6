"""Where a training step's time goes: the device time of one train step per variant, summed
by XLA op and by kind (GEMM, attention, Pallas kernel, collective, other fusion), from a
`jax.profiler` trace.

  python benchmarks/step_profile.py --preset=1b --batch=64 --variants=dense,moc \\
      --out=benchmarks/results/step_profile_1b.json

Each variant runs in its own process: build the step (`model_step.build`), run warm-up steps,
then trace `--steps` steps and read the trace's Perfetto JSON. Device events are those of
processes named /device:GPU:* (on CPU, where there is no device timeline, the XLA client
threads' events stand in, which is enough to test the tool). Totals are per step; `busy_ms`
is the union of the device intervals, so `1 - busy / step` is the share of idle device time,
and `idle_before_op` says which ops the device waited for. `--lean` (default) traces without the
Python tracer, so the traced steps keep the pace of the untraced ones timed just before.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

KINDS = (  # first match wins, on the lower-cased op or kernel name
  ("collective", ("all-reduce", "all-gather", "reduce-scatter", "nccl", "collective")),
  ("attention", ("cudnn", "flash", "attention", "fmha")),
  ("pallas", ("moc_", "triton", "pallas")),
  ("gemm", ("gemm", "cublas", "dot", "matmul", "sm90_xmma", "nvjet")),
  ("copy", ("copy", "memcpy", "memset", "transpose")),
)


def kind_of(name: str) -> str:
  low = name.lower()
  return next((k for k, keys in KINDS if any(x in low for x in keys)), "fusion/other")


def device_events(trace: dict) -> list[dict]:
  """Complete events ('X') on GPU device timelines, else on the XLA CPU client threads."""
  events = trace.get("traceEvents", [])
  procs = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
  threads = {
    (e["pid"], e.get("tid")): e["args"]["name"] for e in events if e.get("name") == "thread_name"
  }
  gpu = {pid for pid, name in procs.items() if "/device:GPU" in name}
  xs = [e for e in events if e.get("ph") == "X" and "dur" in e]
  if gpu:
    return [e for e in xs if e["pid"] in gpu]
  on_cpu = [e for e in xs if threads.get((e["pid"], e.get("tid")), "").startswith("tf_XLA")]
  return [e for e in on_cpu if not e["name"].startswith("ThunkExecutor")]  # wrappers


def _gaps(events: list[dict]) -> Iterator[tuple[float, dict]]:
  """(idle µs, the event that ends it) for each gap in the union of the events' intervals."""
  end = None
  for e in sorted(events, key=lambda e: e["ts"]):
    if end is not None and e["ts"] > end:
      yield e["ts"] - end, e
    end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])


def busy_time(events: list[dict]) -> float:
  """Length of the union of the events' [ts, ts + dur) intervals (µs)."""
  if not events:
    return 0.0
  span = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events)
  return span - sum(gap for gap, _ in _gaps(events))


def idle_gaps(events: list[dict], steps: int, top: int = 10) -> dict:
  """Device idle time between kernels, attributed to the op that starts after each gap.

  A gap is time between the end of everything so far and the next kernel's start; the op that
  follows it is the one the device waited for (its launch, or a host-side dependency).
  """
  by_next: dict[str, float] = collections.defaultdict(float)
  by_kind: dict[str, float] = collections.defaultdict(float)
  count: dict[str, int] = collections.defaultdict(int)
  total = 0.0
  for gap, e in _gaps(events):
    total += gap
    by_next[hlo_op(e)] += gap
    by_kind[kind_of(f"{hlo_op(e)} {e['name']}")] += gap
    count[hlo_op(e)] += 1
  ranked = sorted(by_next.items(), key=lambda kv: -kv[1])[:top]
  return {
    "idle_ms_per_step": round(total / steps / 1e3, 4),
    "idle_before_kind_ms": {k: round(v / steps / 1e3, 4) for k, v in by_kind.items()},
    "idle_before_op": [
      {"op": op, "ms": round(us / steps / 1e3, 4), "gaps": round(count[op] / steps, 2)}
      for op, us in ranked
    ],
  }


def hlo_op(event: dict) -> str:
  """The HLO instruction a device event ran for (its kernel name if the trace has none)."""
  return (event.get("args") or {}).get("hlo_op") or event["name"]


def summarize(trace: dict, steps: int, top: int = 25) -> dict:
  events = device_events(trace)
  by_op: dict[str, float] = collections.defaultdict(float)
  kernel: dict[str, str] = {}  # op -> a kernel name it ran (Pallas calls are custom-call.N)
  for e in events:
    op = hlo_op(e)
    if op.startswith("command_buffer"):  # a CUDA graph's kernels all carry its op: use theirs
      op = e["name"]
    by_op[op] += e["dur"]
    kernel.setdefault(op, e["name"])
  kinds = {op: kind_of(f"{op} {kernel[op]}") for op in by_op}
  by_kind: dict[str, float] = collections.defaultdict(float)
  for op, us in by_op.items():
    by_kind[kinds[op]] += us
  ms = lambda us: round(us / steps / 1e3, 4)
  ranked = sorted(by_op.items(), key=lambda kv: -kv[1])
  return {
    "events": len(events),
    "device_ms_per_step": ms(sum(by_op.values())),
    "busy_ms_per_step": ms(busy_time(events)),
    "by_kind_ms": {k: ms(v) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
    "top_ops_ms": [
      {"op": op, "kernel": kernel[op], "kind": kinds[op], "ms": ms(us)} for op, us in ranked[:top]
    ],
    **idle_gaps(events, steps),
  }


def hlo_of(text: str, ops: list[str], lines: int = 30) -> dict[str, str]:
  """Each op's instruction in optimized HLO `text`, with the body of the computation it calls
  (a fusion's), cut to `lines` lines ('}' closes a body shown whole). Profile names may spell
  XLA's '.' as '_'."""
  from benchmarks import hlo_gemms

  norm = lambda name: name.replace(".", "_")
  comps = {norm(name): c for name, c in hlo_gemms.parse_hlo(text).items()}
  instrs = {norm(i.name): i for c in comps.values() for i in c.instrs}
  out = {}
  for op in ops:
    ins = instrs.get(norm(op))
    if ins is None:
      continue
    body = [i.text[:240] for i in comps[norm(ins.calls)].instrs] if ins.calls else []
    shown = body[:lines] + (["}"] if body and len(body) < lines else [])
    out[op] = "\n".join([ins.text[:600], *shown])
  return out


def read_trace(log_dir: str) -> dict:
  paths = sorted(glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {log_dir}")
  with gzip.open(paths[-1]) as f:
    return json.load(f)


def child(args) -> dict:
  import time

  import jax

  from benchmarks import model_step

  _, _, state, step, batch_of = model_step.build(args.preset, args.variant, args.backend, args.seq)
  batch = batch_of(args.batch)
  for _ in range(args.warmup):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  untraced_ms = (time.perf_counter() - t0) * 1e3 / args.steps
  # The default options trace every Python call and host op, which slows the steps ~2x and
  # leaves the device waiting; without them the traced steps run at their real pace.
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0 if args.lean else 1
  options.host_tracer_level = 1 if args.lean else 2
  with tempfile.TemporaryDirectory() as log_dir:
    t0 = time.perf_counter()
    with jax.profiler.trace(log_dir, create_perfetto_trace=True, profiler_options=options):
      for _ in range(args.steps):
        state, m = step(state, batch)
      jax.block_until_ready(m)
    wall_ms = (time.perf_counter() - t0) * 1e3 / args.steps
    summary = summarize(read_trace(log_dir), args.steps, top=args.top)
  if args.hlo_top:
    others = [o["op"] for o in summary["top_ops_ms"] if o["kind"] in ("fusion/other", "copy")]
    text = step.lower(state, batch).compile().as_text()
    summary["hlo"] = hlo_of(text, others[: args.hlo_top])
  return {
    "variant": args.variant,
    "wall_ms_per_step_untraced": round(untraced_ms, 3),
    "wall_ms_per_step_traced": round(wall_ms, 3),
    **summary,
  }


def main(argv: list[str] | None = None) -> int:
  from benchmarks import model_step

  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--preset", default="1b")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--backend", default="auto", help="MoC kernel backend: auto | xla | pallas")
  p.add_argument("--variants", default="dense,moc", help=f"of {', '.join(model_step.VARIANTS)}")
  p.add_argument(
    "--lean",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="trace without the Python tracer and with fewer host events (steps at their real pace)",
  )
  p.add_argument(
    "--hlo_top", type=int, default=0, help="the HLO of this many of the costliest non-GEMM ops"
  )
  p.add_argument("--top", type=int, default=25, help="how many of the costliest kernels to list")
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/step_profile.json"))
  p.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
  args = p.parse_args(argv)
  from benchmarks import common

  if args.variant:
    print(common.RESULT + json.dumps(child(args)), flush=True)
    return 0
  unknown = set(args.variants.split(",")) - set(model_step.VARIANTS)
  if unknown:
    p.error(f"unknown variants {sorted(unknown)}")
  rows = []
  for name in args.variants.split(","):
    r = common.run_variant_child(os.path.abspath(__file__), name, argv or sys.argv[1:])
    rows.append(r)
    print(f"{name}: " + (json.dumps(r.get("by_kind_ms")) if "error" not in r else "failed"))
    common.write_json(args.out, {"info": common.run_info(), "args": vars(args), "rows": rows})
  return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
