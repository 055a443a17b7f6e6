"""Reading compiled kernels: entries and instruction counts of a PTX module, and `ptxas -v`
(registers, spills, stack, static shared memory) for one entry. No jax here."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess

import numpy as np

ENTRY = re.compile(r"^[ \t]*(?:\.visible[ \t]+|\.weak[ \t]+)?\.entry[ \t]+([\w$]+)", re.M)
COUNTS = {
  "bar_sync": r"\b(?:bar|barrier)(?:\.cta)?\.(?:sync|red)\b",
  "shfl": r"\bshfl\.sync\b",
  "ld_shared": r"\bld\.shared\b",
  "st_shared": r"\bst\.shared\b",
  "ld_global": r"\bld\.global\b",
  "st_global": r"\bst\.global\b",
}
PTXAS_FIELDS = (
  ("regs", r"Used (\d+) registers"),
  ("spill_st", r"(\d+) bytes spill stores"),
  ("spill_ld", r"(\d+) bytes spill loads"),
  ("stack", r"(\d+) bytes stack frame"),
  ("smem_static", r"(\d+) bytes smem"),
)


def ptx_entries(text: str) -> list[tuple[str, str]]:
  """(name, text up to the next .entry) for every kernel entry in a PTX module."""
  ms = list(ENTRY.finditer(text))
  ends = [m.start() for m in ms[1:]] + [len(text)]
  return [(m.group(1), text[m.start() : ends[i]]) for i, m in enumerate(ms)]


def ptx_counts(body: str) -> dict:
  out = {k: len(re.findall(p, body)) for k, p in COUNTS.items()}
  out["ptx_lines"] = body.count("\n")
  return out


def kernel_ptx(sources: list[tuple[str, str]]) -> dict | None:
  """The largest .entry over the PTX modules given (the top-K kernel, not XLA's fusions)."""
  best = None
  for src, text in sources:
    entries = ptx_entries(text)
    for name, body in entries:
      if best is None or len(body) > len(best["body"]):
        best = {"src": src, "text": text, "entry": name, "body": body, "entries": len(entries)}
  return best


def ptxas_candidates() -> list[str]:
  found = [os.environ.get("TRITON_PTXAS_PATH", ""), shutil.which("ptxas") or ""]
  found.append("/usr/local/cuda/bin/ptxas")
  site = os.path.dirname(os.path.dirname(np.__file__))
  found += glob.glob(os.path.join(site, "nvidia", "*", "bin", "ptxas"))
  found += glob.glob(os.path.join(site, "nvidia", "*", "*", "bin", "ptxas"))
  spec = importlib.util.find_spec("triton")
  if spec and spec.origin:
    found += glob.glob(os.path.join(os.path.dirname(spec.origin), "backends", "*", "bin", "ptxas"))
  seen: list[str] = []
  for c in found:
    if c and os.path.exists(c) and os.path.realpath(c) not in map(os.path.realpath, seen):
      seen.append(c)
  return seen


def parse_ptxas(log: str) -> dict[str, dict]:
  """Per entry function: registers, spills, stack, static smem from `ptxas -v`."""
  funcs = {}
  for chunk in log.split("Compiling entry function '")[1:]:
    name = chunk.split("'", 1)[0]
    hits = {k: re.search(p, chunk) for k, p in PTXAS_FIELDS}
    funcs[name] = {k: int(h.group(1)) if h else None for k, h in hits.items()}
  return funcs


def run_ptxas(path: str, entry: str, arch: str | None) -> dict:
  """`ptxas -v` on one PTX module (background thread); the first ptxas that reads it."""
  if not arch:
    return {"ptxas": "no .target in the PTX"}
  exes = ptxas_candidates()
  if not exes:
    return {"ptxas": "unavailable"}
  tried = []
  for exe in exes:
    try:
      cmd = [exe, "-v", f"-arch={arch}", path, "-o", os.devnull]
      p = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    except (OSError, subprocess.SubprocessError) as e:
      tried.append(f"{exe}: {type(e).__name__}: {e}"[:300])
      continue
    log = p.stderr + p.stdout
    funcs = parse_ptxas(log)
    if entry in funcs or (p.returncode == 0 and funcs):
      got = funcs.get(entry) or max(funcs.values(), key=lambda d: d["regs"] or 0)
      return {**got, "ptxas": exe}
    tried.append(f"{exe}: rc={p.returncode} {log[-300:]}")
  return {"ptxas": " | ".join(tried)[-900:]}
