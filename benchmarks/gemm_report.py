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
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

NO_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer="

Shape = tuple[str, list[int]]  # (element type, dims)

# A computation header: `%name (params) -> result {` or `ENTRY %name ... {`, '%' optional.
_HEADER = re.compile(r"^(ENTRY\s+)?%?([A-Za-z_][\w.\-]*)\s*(\(.*\))?\s*(->.*)?\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\](?:\{[^}]*\})?")
_OPCODE = re.compile(r"\s*([A-Za-z][\w\-]*)\(")
_CALLS = re.compile(r"\bcalls=\{?\s*%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_CONFIG_KIND = re.compile(r'\\?"kind\\?"\s*:\s*\\?"([^"\\]+)')
_BODY = re.compile(r"\bbody=%?([\w.\-]+)")
_TO_APPLY = re.compile(r"\b(?:to_apply|calls)=%?([\w.\-]+)")
_TRIP_COUNT = re.compile(r'known_trip_count\\?"?\s*:\s*\{\s*\\?"?n\\?"?\s*:\s*\\?"?(\d+)')


@dataclass
class Instr:
  """One HLO instruction, as much of it as a GEMM needs."""

  name: str
  opcode: str
  shape: Shape | None  # the result's, or its first tuple element's
  operands: list[str]
  inline_shapes: list[Shape | None]  # operand shapes printed inline, when they are
  attrs: str  # everything after the operand list


@dataclass
class Computation:
  name: str
  instrs: list[Instr] = field(default_factory=list)
  shapes: dict[str, Shape] = field(default_factory=dict)  # instruction name -> result shape
  entry: bool = False


def _close(text: str, start: int) -> int:
  """Index of the bracket closing the one at `start` (any of ()[]{}, nested)."""
  depth = 0
  for i in range(start, len(text)):
    c = text[i]
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
      if depth == 0:
        return i
  return len(text)


def _split_top(text: str) -> list[str]:
  """Split on commas outside brackets: an operand list whose shapes hold commas."""
  parts, depth, start = [], 0, 0
  for i, c in enumerate(text):
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


def _array(text: str) -> Shape | None:
  m = _ARRAY.search(text)
  if not m:
    return None
  dims = [re.sub(r"\D", "", d) for d in m.group(2).split(",")]  # `<=8` (dynamic) -> 8
  return m.group(1), [int(d) for d in dims if d]


def _shape_at(text: str, pos: int) -> tuple[Shape | None, int]:
  """The shape starting at `pos` (a tuple gives its first element) and where it ends."""
  while pos < len(text) and text[pos] == " ":
    pos += 1
  if text.startswith("(", pos):
    end = _close(text, pos)
    return _array(text[pos + 1 : end]), end + 1
  m = _ARRAY.match(text, pos)
  if not m:
    return None, pos
  return _array(m.group(0)), m.end()


def _parse_instr(line: str) -> Instr | None:
  m = _INSTR.match(line)
  if not m:
    return None
  name, rest = m.group(1), m.group(2)
  shape, pos = _shape_at(rest, 0)
  op = _OPCODE.match(rest, pos)
  if not op:
    return None
  open_at = op.end() - 1
  close_at = _close(rest, open_at)
  operands, inline = [], []
  for token in _split_top(rest[open_at + 1 : close_at]):
    words = token.split()
    operands.append(words[-1].lstrip("%"))
    inline.append(_array(" ".join(words[:-1])) if len(words) > 1 else None)
  return Instr(name, op.group(1), shape, operands, inline, rest[close_at + 1 :])


def parse_hlo(hlo_text: str) -> dict[str, Computation]:
  """Computations by name: from each header line to the `}` at column 0."""
  comps: dict[str, Computation] = {}
  current: Computation | None = None
  for line in hlo_text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and not line.startswith("HloModule"):
        current = comps.setdefault(m.group(2), Computation(m.group(2), entry=bool(m.group(1))))
      continue
    if line.startswith("}"):
      current = None
      continue
    ins = _parse_instr(line)
    if ins:
      current.instrs.append(ins)
      if ins.shape:
        current.shapes[ins.name] = ins.shape
  return comps


def _dims(attrs: str, key: str) -> list[int]:
  """`lhs_contracting_dims={1}` (a dot) or `"lhs_contracting_dimensions":["1"]` (JSON, its
  quotes maybe escaped, or none in old printers)."""
  m = re.search(rf"\b{key}=\{{([^}}]*)\}}", attrs) or re.search(
    rf'{key}\\?"?\s*:\s*\[([^\]]*)\]', attrs
  )
  return [int(d) for d in re.findall(r"\d+", m.group(1))] if m else []


def _gemm(
  kind: str,
  out: Shape | None,
  lhs: Shape | None,
  rhs: Shape | None,
  dims: dict[str, list[int]],
) -> dict:
  """The entry for one GEMM: out_shape, k, batch, m, n, flops = 2 × |out| × k, dtype."""
  k = batch = m = None
  if lhs:
    k = math.prod(lhs[1][d] for d in dims["lhs_c"] if d < len(lhs[1]))
    batch = math.prod(lhs[1][d] for d in dims["lhs_b"] if d < len(lhs[1]))
    free = set(range(len(lhs[1]))) - set(dims["lhs_c"]) - set(dims["lhs_b"])
    m = math.prod(lhs[1][d] for d in free)
  elif rhs:
    k = math.prod(rhs[1][d] for d in dims["rhs_c"] if d < len(rhs[1]))
    batch = math.prod(rhs[1][d] for d in dims["rhs_b"] if d < len(rhs[1]))
  out_size = math.prod(out[1]) if out else None
  n = out_size // (batch * m) if out_size and batch and m else None
  return {
    "kind": kind,
    "out_shape": out[1] if out else None,
    "k": k,
    "batch": batch,
    "m": m,
    "n": n,
    "flops": 2 * out_size * k if out_size is not None and k is not None else None,
    "dtype": out[0] if out else None,
    "operand_shapes": [[s[0], s[1]] if s else None for s in (lhs, rhs)],
  }


def _operand_shapes(ins: Instr, comp: Computation, every: dict[str, Shape]) -> list[Shape | None]:
  """The first two operands' shapes: printed inline, else from their defining instruction."""
  shapes = []
  for name, inline in list(zip(ins.operands, ins.inline_shapes, strict=True))[:2]:
    shapes.append(inline or comp.shapes.get(name) or every.get(name))
  return shapes + [None] * (2 - len(shapes))


_SIDES = {"lhs_c": "contracting", "rhs_c": "contracting", "lhs_b": "batch", "rhs_b": "batch"}


def _dot_entry(kind: str, ins: Instr, comp: Computation, every: dict[str, Shape]) -> dict:
  lhs, rhs = _operand_shapes(ins, comp, every)
  dims = {k: _dims(ins.attrs, f"{k[:3]}_{v}_dims") for k, v in _SIDES.items()}
  return _gemm(kind, ins.shape, lhs, rhs, dims)


def _custom_call_kind(ins: Instr) -> str | None:
  """cudnn / cublas from the target (`__cudnn$fmha...`, `__cublas$gemm`, `__cublas$lt$matmul`),
  None for other custom calls (Pallas kernels, ...)."""
  t = _TARGET.search(ins.attrs) if ins.opcode == "custom-call" else None
  target = t.group(1).lower() if t else ""
  if "cudnn" in target:
    return "cudnn"
  return "cublas" if "cublas" in target or "gemm" in target else None


def _custom_call_entry(kind: str, ins: Instr, comp: Computation, every: dict[str, Shape]) -> dict:
  lhs, rhs = _operand_shapes(ins, comp, every)
  config = ins.attrs.split("backend_config=", 1)[-1]
  dims = {k: _dims(config, f"{k[:3]}_{v}_dimensions") for k, v in _SIDES.items()}
  entry = _gemm(kind, ins.shape, lhs, rhs, dims)
  if kind == "cudnn" or not dims["lhs_c"]:  # attention, or no dimension numbers to trust
    entry.update(k=None, batch=None, m=None, n=None, flops=None)
  return {**entry, "target": _TARGET.search(ins.attrs).group(1)}


def _inner_gemms(
  name: str, comps: dict[str, Computation], seen: set[str] | None = None
) -> Iterator[tuple[Instr, Computation]]:
  """The dots (and cuBLAS calls, as in a dynamic-slice fusion) of a fused computation and of
  fusions nested in it."""
  seen = set() if seen is None else seen
  if name in seen or name not in comps:
    return
  seen.add(name)
  for ins in comps[name].instrs:
    if ins.opcode == "dot" or _custom_call_kind(ins) == "cublas":
      yield ins, comps[name]
    elif ins.opcode == "fusion" and (m := _CALLS.search(ins.attrs)):
      yield from _inner_gemms(m.group(1), comps, seen)


def _fusion_kind(ins: Instr) -> str:
  """cublas / cudnn / triton_gemm from the backend_config's fusion kind, else fusion_dot."""
  config = ins.attrs.split("backend_config=", 1)
  m = _CONFIG_KIND.search(config[1]) if len(config) > 1 else None
  kind = m.group(1).lower() if m else ""
  if "cublas" in kind:
    return "cublas"
  if "cudnn" in kind:
    return "cudnn"
  return "triton_gemm" if "gemm" in kind else "fusion_dot"


def _fusion_entry(ins: Instr, comps: dict[str, Computation], every: dict[str, Shape]) -> dict:
  """A fusion's GEMM(s): FLOPs summed, the largest one's shape; {} if it holds none."""
  kind = _fusion_kind(ins)
  entries = []
  for inner, comp in _inner_gemms(_CALLS.search(ins.attrs).group(1), comps):
    if inner.opcode == "dot":
      entries.append(_dot_entry(kind, inner, comp, every))
    else:  # a cuBLAS call wrapped in a (dynamic-slice) fusion: the fusion is the op that runs
      entries.append(_custom_call_entry("cublas", inner, comp, every))
  if not entries:
    if kind == "fusion_dot":
      return {}  # an elementwise / reduction fusion
    entries = [_gemm(kind, ins.shape, None, None, {})]  # a GEMM fusion with no dot found
  entry = max(entries, key=lambda e: e["flops"] or 0)
  flops = [e["flops"] for e in entries]
  return {**entry, "flops": None if None in flops else sum(flops), "dots": len(entries)}


def _runs_per_step(comps: dict[str, Computation]) -> dict[str, int | None]:
  """How often each computation reached from ENTRY through while bodies (times their known
  trip count; None when XLA does not know it) and plain calls runs per execution."""
  runs: dict[str, int | None] = {c.name: 1 for c in comps.values() if c.entry}
  todo = list(runs)
  while todo:
    name = todo.pop()
    for ins in comps[name].instrs:
      if ins.opcode == "while" and (body := _BODY.search(ins.attrs)):
        trip = _TRIP_COUNT.search(ins.attrs)
        n = runs[name] * int(trip.group(1)) if trip and runs[name] is not None else None
        callee = body.group(1)
      elif ins.opcode in ("call", "async-start") and (to := _TO_APPLY.search(ins.attrs)):
        n, callee = runs[name], to.group(1)
      else:
        continue
      if callee in comps and callee not in runs:
        runs[callee] = n
        todo.append(callee)
  return runs


def gemms_of_hlo(hlo_text: str) -> dict[str, dict]:
  """Every GEMM the optimized HLO runs, by instruction name (no '%'), with its FLOPs.

  Only instructions that run as ops are listed (those of computations that are not fusion
  bodies, while bodies included); a fusion's entry describes the dot(s) inside it, their
  FLOPs summed and the largest one's shape kept. `runs_per_step` is how often it runs per
  execution as far as the HLO tells (a while body's trip count; None when unknown); a
  profile's event count is the measured one.
  """
  comps = parse_hlo(hlo_text)
  runs = _runs_per_step(comps)
  every = {n: s for c in comps.values() for n, s in c.shapes.items()}
  fused = {
    m.group(1)
    for c in comps.values()
    for ins in c.instrs
    if ins.opcode == "fusion" and (m := _CALLS.search(ins.attrs))
  }
  gemms: dict[str, dict] = {}
  for comp in comps.values():
    if comp.name in fused:
      continue
    for ins in comp.instrs:
      if ins.opcode == "dot":
        gemms[ins.name] = _dot_entry("dot", ins, comp, every)
      elif kind := _custom_call_kind(ins):
        gemms[ins.name] = _custom_call_entry(kind, ins, comp, every)
      elif ins.opcode == "fusion" and _CALLS.search(ins.attrs):
        gemms[ins.name] = _fusion_entry(ins, comps, every)
      if gemms.get(ins.name):
        gemms[ins.name]["runs_per_step"] = runs.get(comp.name)
  return {name: entry for name, entry in gemms.items() if entry}  # fusions without GEMMs: {}


def op_times(events: list[dict]) -> tuple[dict[str, float], dict[str, int]]:
  """Per HLO op: device µs summed, and calls (the most events of any one kernel of the op, so
  a GEMM that launches a split-K reduce beside its main kernel is one call, not two)."""
  times: dict[str, float] = collections.defaultdict(float)
  per_kernel: collections.Counter[tuple[str, str]] = collections.Counter()
  for e in events:
    op = (e.get("args") or {}).get("hlo_op") or e["name"]
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
  fmt = lambda x, d: "-" if x is None else f"{x:.{d}f}"
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

  from benchmarks import common, model_step, step_profile
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
