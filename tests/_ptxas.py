"""ptxas on a CPU machine (the system's, else the one Triton's wheel bundles): the CPU tests of
the inline-PTX kernels assemble their PTX for sm_90a, a syntax and register check."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

_HEAD = ".version 8.0\n.target sm_90a\n.address_size 64\n.visible .entry k() {\n"


def path() -> str | None:
  found = shutil.which("ptxas")
  if found:
    return found
  try:
    import triton
  except ImportError:
    return None
  bundled = f"{triton.__path__[0]}/backends/nvidia/bin/ptxas"
  return bundled if os.path.exists(bundled) else None


def bind(text: str, kinds: list[str], prefix: str) -> str:
  """An inline asm block whose operands $0, $1, ... are registers %<prefix>0, ... of the PTX
  kinds given (b32, b64), declared and zeroed before it, so that it assembles on its own."""
  regs = [f"%{prefix}{i}" for i in range(len(kinds))]
  decls = "".join(
    f".reg .{kind} {regs[i]}; mov.{kind} {regs[i]}, 0;\n" for i, kind in enumerate(kinds)
  )
  return decls + "{\n" + re.sub(r"\$(\d+)", lambda m: regs[int(m.group(1))], text) + "\n}\n"


def assemble(body: str, tmp_dir) -> subprocess.CompletedProcess:
  """ptxas -v on one kernel whose body is `body` (registers declared in it): its return code
  and the stderr that reports registers and spills."""
  ptx = os.path.join(tmp_dir, "k.ptx")
  with open(ptx, "w") as f:
    f.write(_HEAD + body + "\nret;\n}\n")
  cmd = [path(), "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp_dir, "k.cubin")]
  return subprocess.run(cmd, capture_output=True, text=True)


def record_asm(monkeypatch) -> dict[str, list[str]]:
  """Every inline PTX block `_mgpu_ptx._asm` emits from now on (the Mosaic GPU kernels all
  go through it), with its operands' constraints: text -> constraints."""
  from pallas_kernels import _mgpu_ptx

  snippets: dict[str, list[str]] = {}
  original = _mgpu_ptx._asm

  def record(text, operands, constraints, result=False):
    snippets[text] = constraints.split(",")
    return original(text, operands, constraints, result)

  monkeypatch.setattr(_mgpu_ptx, "_asm", record)
  return snippets


def assemble_snippets(snippets: dict[str, list[str]], tmp_dir) -> subprocess.CompletedProcess:
  """All recorded blocks in one kernel, each its operands bound to registers (`bind`)."""
  body = [
    bind(text, ["b64" if c.endswith("l") else "b32" for c in constraints], f"x{n}_")
    for n, (text, constraints) in enumerate(snippets.items())
  ]
  return assemble("\n".join(body), tmp_dir)
