"""Shared helpers for benchmark scripts: run metadata, timing medians, JSON results.

Every result file carries when, where and on what code it was measured, so a number in
NOTES or the README can be traced to a run:

  from benchmarks import common
  info = common.run_info()
  stats = common.time_fn(jax.jit(f), x)        # {'median_us': ..., ...}
  common.write_json("benchmarks/results/x.json", {"info": info, "rows": rows})
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


def _git(*args: str) -> str:
  try:
    out = subprocess.run(
      ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
    )
    return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ""


def _commit() -> str:
  """GIT_COMMIT from the environment when set (a snapshot run away from its repo), else HEAD."""
  if os.environ.get("GIT_COMMIT"):
    return os.environ["GIT_COMMIT"]
  sha = _git("rev-parse", "HEAD")
  if len(sha) == 40 and all(c in "0123456789abcdef" for c in sha):
    return sha
  return os.environ.get("GIT_COMMIT", "unknown")


def run_info() -> dict[str, Any]:
  """Date (UTC), git commit (+ dirty flag), device, jax/jaxlib/python versions."""
  dev = jax.devices()[0]
  try:
    import jaxlib

    jaxlib_version = jaxlib.__version__
  except (ImportError, AttributeError):
    jaxlib_version = ""
  return {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "commit": _commit(),
    # a GIT_COMMIT run is a `git archive` snapshot of that commit: clean by construction
    "dirty": not os.environ.get("GIT_COMMIT")
    and bool(_git("status", "--porcelain", "--untracked-files=no")),
    "device": getattr(dev, "device_kind", str(dev)),
    "platform": dev.platform,
    "num_devices": jax.device_count(),
    "jax": jax.__version__,
    "jaxlib": jaxlib_version,
    "python": platform.python_version(),
    "host": platform.node(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def block(tree: Any) -> Any:
  return jax.block_until_ready(tree)


def _sample(fn: Callable, arg_sets: Sequence[tuple], inner: int) -> float:
  """µs per call of `inner` calls dispatched back to back, inputs rotated, one sync at the end."""
  t0 = time.perf_counter()
  out = None
  for i in range(inner):
    out = fn(*arg_sets[i % len(arg_sets)])
  block(out)
  return (time.perf_counter() - t0) / inner * 1e6


def rotated(names: Sequence[str], turn: int) -> list[str]:
  """names starting at position turn (mod len): the order of round `turn`."""
  i = turn % len(names)
  return [*names[i:], *names[:i]]


def time_fn(
  fn: Callable,
  *args: Any,
  inner: int = 10,
  trials: int = 7,
  warmup: int = 2,
  arg_sets: Sequence[tuple] | None = None,
) -> dict[str, float]:
  """Median over `trials` of (wall time of `inner` back-to-back calls) / inner, in µs.

  Calls are dispatched without waiting, so the GPU queue stays full and the figure is
  device time plus at most the per-call dispatch gap. `arg_sets` rotates inputs between
  calls (use it when inputs would otherwise stay in L2).
  """
  sets = list(arg_sets) if arg_sets else [args]
  for i in range(warmup):
    block(fn(*sets[i % len(sets)]))
  samples = [_sample(fn, sets, inner) for _ in range(trials)]
  return {
    "median_us": statistics.median(samples),
    "min_us": min(samples),
    "max_us": max(samples),
    "trials": trials,
    "inner": inner,
  }


def time_interleaved(
  fns: dict[str, Callable],
  arg_sets: Sequence[tuple],
  inner: int = 10,
  trials: int = 7,
  warmup: int = 2,
) -> dict[str, list[float]]:
  """Per-call µs of each fn, `trials` samples each, the fns taken in turn within every trial
  (order rotated by one each trial), so that clock and thermal drift over the run fall on all
  of them alike: compare them trial by trial (`paired_ratio`). A fn that raises is dropped
  (its error printed) and the others go on."""
  live = dict(fns)
  for name, fn in fns.items():
    try:
      for i in range(warmup):
        block(fn(*arg_sets[i % len(arg_sets)]))
    except Exception as e:  # reported, not fatal: the others are still compared
      print(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
      del live[name]
  samples: dict[str, list[float]] = {name: [] for name in live}
  for t in range(trials):
    for name in rotated(list(live), t):
      samples[name].append(_sample(live[name], arg_sets, inner))
  return samples


def paired_ratio(a: Sequence[float] | None, b: Sequence[float] | None) -> float | None:
  """Median over trials of a[i] / b[i] (samples from `time_interleaved`), or None."""
  if not a or not b:
    return None
  return statistics.median(x / y for x, y in zip(a, b, strict=True))


def ratio(a: float | None, b: float | None) -> float | None:
  """a / b, or None when either is missing."""
  if a is None or b is None or b == 0:
    return None
  return a / b


def write_json(path: str, payload: dict[str, Any]) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as fh:
    json.dump(payload, fh, indent=1, default=str)
  return path


def fmt(x: float | None, digits: int = 1) -> str:
  return "-" if x is None else f"{x:.{digits}f}"


def print_table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> None:
  """A plain fixed-width table (the device tool returns only the end of the output)."""
  cells = [[str(r.get(c, "")) for c in cols] for r in rows]
  widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(cols)]
  print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
  for row in cells:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def bench_train_config():
  """The optimizer/schedule section the training-step benchmarks share (AdamW, no clipping)."""
  import ml_collections

  return ml_collections.ConfigDict(
    dict(steps=1000, lr=1e-4, warmup_frac=0.1, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=0.0)
  )


def compiled_bytes(compiled) -> int | None:
  """XLA's per-device memory estimate: arguments + temporaries + outputs - aliased."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # not every backend/version reports it
    return None
  return int(
    m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  )


def hlo_moves(compiled_text: str) -> dict[str, Any]:
  """What a compiled program moves besides its kernels: each `copy` (shape, MB) and each
  custom call's target, from the optimized HLO text (`jit(f).lower(...).compile().as_text()`).
  Why: a copy of a large operand around a kernel costs as much as a pass over it."""
  import re

  sizes = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1}
  copies = []
  for dtype, dims in re.findall(r"= (\w+)\[([\d,]*)\]\S* copy\(", compiled_text):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    copies.append({"shape": f"{dtype}[{dims}]", "mb": round(n * sizes.get(dtype, 4) / 2**20, 1)})
  targets = re.findall(r'custom_call_target="([^"]+)"', compiled_text)
  blocks = _computations(compiled_text)
  in_buffers = [n for n in blocks if "command_buffer" in n]
  return {
    "copies": copies,
    "copy_mb": round(sum(c["mb"] for c in copies), 1),
    "custom_calls": targets,
    # XLA records runs of kernels into CUDA graphs (computations named command_buffer*);
    # a custom call it cannot record runs between two graphs, each launched on its own
    "command_buffers": len(in_buffers),
    "custom_calls_in_command_buffers": [
      t for n in in_buffers for t in re.findall(r'custom_call_target="([^"]+)"', blocks[n])
    ],
  }


def _computations(hlo_text: str) -> dict[str, str]:
  """name -> body of each computation of an HLO module's text (a header line ending in '{'
  at column 0, up to the next '}' at column 0)."""
  out, name, lines = {}, None, []
  for line in hlo_text.splitlines():
    if name is None and line and not line[0].isspace() and line.rstrip().endswith("{"):
      name, lines = line.removeprefix("ENTRY ").split()[0].lstrip("%"), []
    elif name is not None and line.startswith("}"):
      out[name] = "\n".join(lines)
      name = None
    elif name is not None:
      lines.append(line)
  return out


RESULT = "RESULT "  # the line a variant's child process prints its JSON record on


def run_variant_child(script: str, variant: str, argv: list[str]) -> dict[str, Any]:
  """Run `script --variant=NAME ARGV` in a fresh process (its own device memory and peak) and
  return the record it printed after RESULT, or {"variant", "error": stderr tail}."""
  import subprocess
  import sys

  cmd = [sys.executable, script, f"--variant={variant}", *argv]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [x for x in out.stdout.splitlines() if x.startswith(RESULT)]
  if not lines:
    return {"variant": variant, "error": out.stderr[-1500:]}
  return json.loads(lines[-1][len(RESULT) :])


@contextlib.contextmanager
def forward_selection(selection: str | None, **fields):
  """While tracing inside it, MoC's train forward finds its selection with this kernel
  (`TopKConfig.selection`, e.g. 'mgpu') and these other `TopKConfig` fields (e.g.
  async_rows=True); None and no fields change nothing. Wrap a jitted call in it: the first
  call traces and compiles under it, later calls reuse that program."""
  from pallas_kernels import moc_train

  if selection:
    fields["selection"] = selection
  if not fields:
    yield
    return
  saved = moc_train.FORWARD_DEFAULT
  moc_train.FORWARD_DEFAULT = dataclasses.replace(saved, **fields)
  try:
    yield
  finally:
    moc_train.FORWARD_DEFAULT = saved


@contextlib.contextmanager
def backward_mode(mode: str | None):
  """While tracing inside it, MoC's train backward takes this `StreamConfig.mode` at every
  width (e.g. 'mgpu'), or 'triton': the Triton walks by width (the default before
  2026-12-05o); None changes nothing. Wrap the backward's trace (the vjp's call)."""
  from pallas_kernels import moc_train_mask as mm

  if not mode:
    yield
    return
  saved = mm.BACKWARD_DEFAULT
  triton = mode == "triton"
  mm.BACKWARD_DEFAULT = mm.TRITON_BACKWARD if triton else dataclasses.replace(saved, mode=mode)
  try:
    yield
  finally:
    mm.BACKWARD_DEFAULT = saved
