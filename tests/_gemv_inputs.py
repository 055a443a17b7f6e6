"""Inputs and the float64 check shared by the decode GEMV tests (`linear`, `rowdot`).

Fresh random inputs every run (seed from the clock, in every failure message). Interpret mode
fills each output with NaN before the kernel runs, so a NaN-free result was fully written.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 6e-3}  # bf16: one rounding of the output


def seed() -> int:
  return time.time_ns() % (2**31)


def inputs(seed: int, lead: tuple[int, ...], d: int, n: int, dtype):
  """x (lead, D) and a D × N weight scaled to keep x W near unit size."""
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (*lead, d), dtype)
  w = (jax.random.normal(kw, (d, n)) * d**-0.5).astype(dtype)
  return x, w


def rel_err_f64(y, x, w) -> float:
  """‖y − x W‖ / ‖x W‖ with x W in float64 from the same (rounded) inputs; NaN never passes."""
  y = np.asarray(y, np.float64)
  assert np.isfinite(y).all(), "an output element was not written (NaN)"
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  return float(np.linalg.norm(y - want) / np.linalg.norm(want))
