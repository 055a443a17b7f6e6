"""A numpy evaluator for the arithmetic of the Mosaic kernels' inline PTX (the fp32 ops of the
epilogues' silu and sigmoid, the bf16 / f16 conversions), vectorized over many inputs: a CPU
check that the PTX computes the formula it claims (constants, operands, rounding modes).

`ex2.approx` and `div.full` are evaluated exactly (the hardware's are within 2 ulp), so results
may differ from a GPU's in the last fp32 bit; `fma.rm` rounds toward -inf as PTX says. Address
arithmetic, loads and stores are skipped: the caller binds the 16-bit input registers.
"""

from __future__ import annotations

import re

import ml_dtypes
import numpy as np

_SKIP = ("mad.lo", "ld.", "st.", "setp", "@", "mov.b32 a")
_HALF = {"bf16": ml_dtypes.bfloat16, "f16": np.float16}


def _f32(bits: np.ndarray) -> np.ndarray:
  return bits.astype(np.uint32).view(np.float32)


def _bits(x: np.ndarray) -> np.ndarray:
  return np.asarray(x, np.float32).view(np.uint32)


def _round_down(x64: np.ndarray) -> np.ndarray:
  """float64 -> float32 rounding toward -inf."""
  r = x64.astype(np.float32)
  return np.where(r.astype(np.float64) > x64, np.nextafter(r, np.float32(-np.inf)), r)


def run(ptx: str, regs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Evaluate the arithmetic statements of `ptx` over `regs` (name -> uint32 bit patterns,
  16-bit registers in their low bits); returns the registers after."""
  regs = {name: np.asarray(v, np.uint32) for name, v in regs.items()}

  def val(op: str) -> np.ndarray:
    if op.startswith("0f"):
      return np.uint32(int(op[2:], 16))
    if re.fullmatch(r"-?\d+", op):
      return np.uint32(int(op))
    return regs[op]

  for stmt in (s.strip() for s in ptx.replace("\n", ";").split(";")):
    if not stmt or stmt.startswith(_SKIP):
      continue
    opcode, _, rest = stmt.partition(" ")
    dst, *src = [o.strip() for o in rest.split(",")]
    x = [val(o) for o in src]
    f = [_f32(np.asarray(v)) for v in x]
    parts = opcode.split(".")
    if parts[0] == "cvt" and parts[1] == "rn":  # fp32 -> 16-bit, round to nearest even
      half = f[0].astype(_HALF[parts[2]])
      out = half.view(np.uint16).astype(np.uint32)
    elif parts[0] == "cvt" and "sat" in parts:
      out = _bits(np.clip(f[0], 0.0, 1.0))
    elif parts[0] == "cvt":  # 16-bit -> fp32
      half = np.asarray(x[0] & 0xFFFF, np.uint16).view(_HALF[parts[-1]])
      out = _bits(half.astype(np.float32))
    elif parts[0] == "fma":
      exact = f[0].astype(np.float64) * f[1].astype(np.float64) + f[2].astype(np.float64)
      out = _bits(_round_down(exact) if parts[1] == "rm" else exact.astype(np.float32))
    elif parts[0] in ("add", "sub", "mul", "div"):
      a, b = f[0].astype(np.float64), f[1].astype(np.float64)
      exact = {"add": a + b, "sub": a - b, "mul": a * b, "div": a / b}[parts[0]]
      out = _bits(exact.astype(np.float32))
    elif parts[0] == "neg":
      out = _bits(-f[0])
    elif parts[0] == "ex2":
      out = _bits(np.exp2(f[0].astype(np.float64)).astype(np.float32))
    elif parts[0] == "shl":
      out = (x[0].astype(np.uint64) << int(x[1]) & 0xFFFFFFFF).astype(np.uint32)
    else:
      raise ValueError(f"no evaluator for {stmt!r}")
    regs[dst] = np.broadcast_to(out, np.broadcast(*[np.asarray(v) for v in x]).shape).copy()
  return regs
