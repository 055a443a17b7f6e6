"""Timing helpers of the decode benchmarks (`decode_ffn`, `gemv_sweep`, `decode_e2e`).

Chains of calls, each on its own input and weight set, dispatched back to back: XLA can neither
drop calls nor merge two dots on shared weights, and the GPU queue never drains between
dispatches. Also the run's header (date, commit, device) and the copy bandwidth to compare with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np


def run_info() -> dict:
  """Date, commit, device and versions (benchmarks.common's if it exists)."""
  try:
    from benchmarks import common  # type: ignore[attr-defined]

    return dict(common.run_info())
  except (ImportError, AttributeError):
    pass
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    commit = os.environ.get("GIT_COMMIT", "unknown")
  dev = jax.devices()[0]
  return {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "commit": commit,
    "device": getattr(dev, "device_kind", str(dev)),
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "python": platform.python_version(),
  }


def time_chain(fn, args, calls: int, reps: int, trials: int) -> dict:
  """Per-call seconds: median over trials of R async dispatches of a C-call chain."""
  jax.block_until_ready(fn(*args))
  for _ in range(2):
    out = fn(*args)
  jax.block_until_ready(out)
  per_call = []
  for _ in range(trials):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    per_call.append((time.perf_counter() - t0) / (reps * calls))
  return {"median_s": statistics.median(per_call), "trials_s": per_call}


def time_single(fn, args, trials: int) -> float:
  """Median of blocking single calls: what one launch-bound dispatch costs."""
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(trials):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def chain(ffn):
  """jit(xs, sets) -> the sum of one call per (x, weight set): no two calls share an operand."""
  inner = jax.jit(ffn)

  def run(xs, sets):
    ys = [inner(x, *ws) for x, ws in zip(xs, sets, strict=True)]
    return jnp.sum(jnp.stack(ys).astype(jnp.float32), axis=0)  # all live; one fusion at the end

  return jax.jit(run)


def copy_bandwidth(num_bytes: int, trials: int) -> dict:
  """Device-to-device copy (read + write counted) and a pure read (sum), bytes/s."""
  a = jax.random.normal(jax.random.key(0), (num_bytes // 4,), jnp.float32)
  copy = jax.jit(lambda v: v * 1.0001)
  read = jax.jit(lambda v: jnp.sum(v))
  t_copy = time_chain(copy, (a,), 1, reps=5, trials=trials)["median_s"]
  t_read = time_chain(read, (a,), 1, reps=5, trials=trials)["median_s"]
  return {"bytes": num_bytes, "copy_Bps": 2 * num_bytes / t_copy, "read_Bps": num_bytes / t_read}


def make_sets(d, f, num_sets, dtype, seed=0):
  """Weight sets: (wg DxF, wu DxF, wu_t FxD, wd FxD), N(0, 1/fan_in)."""
  sets = []
  for s in range(num_sets):
    ks = jax.random.split(jax.random.key(seed + s), 3)
    wg = (jax.random.normal(ks[0], (d, f)) * d**-0.5).astype(dtype)
    wu = (jax.random.normal(ks[1], (d, f)) * d**-0.5).astype(dtype)
    wd = (jax.random.normal(ks[2], (f, d)) * f**-0.5).astype(dtype)
    sets.append((wg, wu, wu.T.copy(), wd))
  return sets


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def streaming_rowdot(pick):
  """`_decode_rowdot.rowdot_config` with every T = 1 GEMV on a grid of about what stays
  resident (`RowdotConfig.programs`): 4 programs per SM, 2 with 2048-wide steps or the
  SwiGLU's two weights (104, 174 and 168 registers for sm_90 at the 1b shapes, `sass_report`).
  pick: the rule it wraps. (`rowdot_config(streaming=True)` does this for the narrow GEMVs
  alone, with their loads one step ahead.)"""
  from pallas_kernels import _decode_rowdot, _triton_utils

  sms = _triton_utils.sm_count()

  def config(t, d, n, weights=1, itemsize=2, streaming=False):
    cfg = pick(t, d, n, weights, itemsize, streaming)
    if t != 1:
      return cfg
    per_sm = 2 if cfg.block_d >= 2048 or weights == 2 else _decode_rowdot.STREAMING_PER_SM
    return dataclasses.replace(cfg, programs=per_sm * sms)

  return config


@contextlib.contextmanager
def rowdot_streaming():
  """While inside it (while tracing), the rowdot GEMVs pick `streaming_rowdot` configs."""
  from pallas_kernels import _decode_rowdot

  pick = _decode_rowdot.rowdot_config
  _decode_rowdot.rowdot_config = streaming_rowdot(pick)
  try:
    yield
  finally:
    _decode_rowdot.rowdot_config = pick


def streamed(fn):
  """fn, traced (on its jit's first call) with `rowdot_streaming`'s rowdot configs."""

  def run(*args):
    with rowdot_streaming():
      return fn(*args)

  return run
