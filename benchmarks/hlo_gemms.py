"""The GEMMs of a compiled XLA program, from its optimized HLO text: for each, the kind
(cuBLAS custom call, Triton GEMM fusion, a fusion holding a `dot`, a plain `dot`, cuDNN), the
shapes, the contraction size and the FLOPs, and how often it runs per step (a while loop's
known trip count). `benchmarks/gemm_report.py` joins them with a profile's per-op times.

Formats handled: operand shapes printed inline or only at their definitions, with or without
the `%` sigil and layouts, backend_config as JSON or as an escaped string.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

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
  text: str = ""  # the whole line, stripped

  @property
  def calls(self) -> str | None:
    """The computation a fusion calls (`calls=`), if any."""
    m = _CALLS.search(self.attrs)
    return m.group(1) if m else None


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
  attrs = rest[close_at + 1 :]
  return Instr(name, op.group(1), shape, operands, inline, attrs, line.strip())


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
    elif ins.opcode == "fusion" and ins.calls:
      yield from _inner_gemms(ins.calls, comps, seen)


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
  for inner, comp in _inner_gemms(ins.calls, comps):
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
  fused = {ins.calls for c in comps.values() for ins in c.instrs if ins.opcode == "fusion"}
  gemms: dict[str, dict] = {}
  for comp in comps.values():
    if comp.name in fused:
      continue
    for ins in comp.instrs:
      if ins.opcode == "dot":
        gemms[ins.name] = _dot_entry("dot", ins, comp, every)
      elif kind := _custom_call_kind(ins):
        gemms[ins.name] = _custom_call_entry(kind, ins, comp, every)
      elif ins.opcode == "fusion" and ins.calls:
        gemms[ins.name] = _fusion_entry(ins, comps, every)
      if gemms.get(ins.name):
        gemms[ins.name]["runs_per_step"] = runs.get(comp.name)
  return {name: entry for name, entry in gemms.items() if entry}  # fusions without GEMMs: {}
