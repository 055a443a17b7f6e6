"""FFN decode latency for T in {1, 4, 16}: XLA dense, our dense kernels, MoC xla path, MoC kernels.

Each figure is the median over trials of (wall time of R back-to-back dispatches of one jitted
chain of C calls) / (R·C): every call's output is summed into the chain's result (so XLA can
neither drop nor merge calls; a first version returned only the last output and XLA dropped the
rest), the GPU queue never drains between dispatches, and the chain rotates over
enough weight sets that the bytes touched per round are several times the 60 MB L2. Single-call
latency (one blocking dispatch each) is reported beside it: it is launch-bound.
Bandwidth = bytes the method must read / time: dense 3·D·F·2; MoC D·F·2 + 2·U·D·2 where U is
the number of channels some token selected (the union), measured on the run's own inputs.

  python benchmarks/decode_ffn.py [--quick] [--out=benchmarks/results/decode_ffn.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import moc_decode, reference

SHAPES = ((2048, 5464, 1024), (4096, 11008, 2048), (4096, 14336, 2048))
TOKENS = (1, 4, 16)
L2_BYTES = 60e6
Cfg = moc_decode.DecodeConfig


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


def chain(ffn, num_sets: int, unroll: int):
  """jit(x, sets) -> y after unroll·num_sets dependent calls, one weight set after another."""
  inner = jax.jit(ffn)

  def run(x, sets):
    y, ys = x, []
    for _ in range(unroll):
      for s in range(num_sets):
        xx, _ = jax.lax.optimization_barrier((x, y))  # distinct inputs: no CSE across calls
        y = inner(xx, *sets[s])
        ys.append(y)
    return jnp.sum(jnp.stack(ys).astype(jnp.float32), axis=0)  # every call's output is live

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


def bench_shape(d, f, k, variant, tokens, moc_cfgs, dense_cfgs, args) -> list[dict]:
  dtype = jnp.bfloat16
  dense_bytes = 3 * d * f * 2
  num_sets = max(2, int(np.ceil(4 * L2_BYTES / dense_bytes))) if not args.quick else 2
  sets = make_sets(d, f, num_sets, dtype)
  rows = []
  for t in tokens:
    x = jax.random.normal(jax.random.key(100 + t), (t, d), dtype)
    union = []
    for wg, *_ in sets:
      g = jnp.dot(x, wg, preferred_element_type=jnp.float32).astype(dtype)
      idx, _ = reference.select(g, k, variant)
      union.append(len(np.unique(np.asarray(idx))))
    moc_bytes = d * f * 2 + 2 * float(np.mean(union)) * d * 2
    interp = True if args.quick else None
    methods = {
      "xla_dense": (lambda x, wg, wu, wut, wd: reference.dense_decode_ffn(x, wg, wu, wd), {}),
      "moc_xla": (lambda x, wg, wu, wut, wd: reference.decode_ffn(x, wg, wut, wd, k, variant), {}),
    }
    for name, c in dense_cfgs.items():
      methods[f"dense_kernel[{name}]"] = (
        lambda x, wg, wu, wut, wd, c=c, i=interp: moc_decode.dense_decode_ffn(
          x, wg, wu, wd, config=c, interpret=i
        ),
        c,
      )
    for name, c in moc_cfgs.items():
      methods[f"moc_kernel[{name}]"] = (
        lambda x, wg, wu, wut, wd, c=c, i=interp: moc_decode.decode_ffn(
          x, wg, wut, wd, k, variant, config=c, interpret=i
        ),
        c,
      )
    ref_dense = reference.dense_decode_ffn(x, *[sets[0][i] for i in (0, 1, 3)])
    ref_moc = reference.decode_ffn(x, sets[0][0], sets[0][2], sets[0][3], k, variant)
    for name, (fn, c) in methods.items():
      row = {"d": d, "F": f, "K": k, "T": t, "variant": variant, "method": name}
      row["bytes_must_read"] = moc_bytes if "moc" in name else dense_bytes
      row["union_channels"] = float(np.mean(union))
      if c:
        row["config"] = c.__dict__
      try:
        jfn = jax.jit(fn)
        y = jfn(x, *sets[0])
        row["rel_err_vs_reference"] = rel_err(y, ref_moc if "moc" in name else ref_dense)
        unroll = max(1, args.calls // num_sets)
        timing = time_chain(
          chain(fn, num_sets, unroll), (x, sets), unroll * num_sets, args.reps, args.trials
        )
        row["time_s"] = timing["median_s"]
        row["trials_s"] = timing["trials_s"]
        row["single_call_s"] = time_single(jfn, (x, *sets[0]), args.trials)
        row["bandwidth_Bps"] = row["bytes_must_read"] / row["time_s"]
      except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      print(
        json.dumps({k2: v for k2, v in row.items() if k2 not in ("trials_s", "config")}), flush=True
      )
      rows.append(row)
  return rows


def sweep_configs(d: int, f: int, t: int) -> tuple[dict, dict]:
  base = moc_decode.default_config(t, d, f)
  rep = lambda **kw: Cfg(**{**base.__dict__, **kw})
  moc = {
    "default": base,
    "gemv_bf64": rep(gemv_block_f=64, gemv_block_d=128, gemv_splits=max(1, base.gemv_splits // 2)),
    "w8": rep(gemv_warps=8, up_warps=8, down_warps=8, select_warps=16),
    "up8_down16": rep(
      up_block_c=8, up_block_d=1024, down_splits=2 * base.down_splits, down_block_c=16
    ),
  }
  dense = {
    "splits": base,
    "swiglu_bf32": rep(gemv_splits=1, gemv_block_f=32, gemv_block_d=128),
    "splits_bf64": rep(gemv_block_f=64, gemv_block_d=128),
  }
  return moc, dense


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny shapes in interpret mode (CPU)")
  p.add_argument("--out", default="benchmarks/results/decode_ffn.json")
  p.add_argument("--calls", type=int, default=16, help="dependent calls per jitted chain")
  p.add_argument("--reps", type=int, default=8)
  p.add_argument("--trials", type=int, default=5)
  p.add_argument("--variant", default="moc")
  p.add_argument("--sweep", default="t1", choices=("none", "t1", "all"), help="config sweep")
  args = p.parse_args()
  shapes = ((64, 200, 40),) if args.quick else SHAPES
  tokens = (1, 4) if args.quick else TOKENS
  result = {**run_info(), "method": __doc__.split("\n\n")[0], "rows": []}
  result["bandwidth"] = copy_bandwidth(2**20 if args.quick else 2**31, args.trials)
  print(json.dumps(result["bandwidth"]), flush=True)
  for d, f, k in shapes:
    for t in tokens:
      moc, dense = sweep_configs(d, f, t)
      if args.quick or args.sweep == "none" or (args.sweep == "t1" and t != 1):
        moc, dense = {"default": moc["default"]}, {"splits": dense["splits"]}
      result["rows"] += bench_shape(d, f, k, args.variant, (t,), moc, dense, args)
      os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
      with open(args.out, "w") as fh:  # after every case: a timeout keeps what was measured
        json.dump(result, fh, indent=1)
  print_table(result)


def best(rows, prefix):
  ok = [r for r in rows if r["method"].startswith(prefix) and "time_s" in r]
  return min(ok, key=lambda r: r["time_s"]) if ok else None


def print_table(result: dict) -> None:
  copy = result["bandwidth"]["copy_Bps"]
  print(f"\ncopy {copy / 1e12:.2f} TB/s, read {result['bandwidth']['read_Bps'] / 1e12:.2f} TB/s")
  print("d     F      T  | xla_dense  dense_k (%copy) | moc_xla  moc_k (%copy) | moc_k/dense_k")
  keys = sorted({(r["d"], r["F"], r["T"]) for r in result["rows"]})
  for d, f, t in keys:
    rows = [r for r in result["rows"] if (r["d"], r["F"], r["T"]) == (d, f, t)]
    xd, dk, mx, mk = (best(rows, p) for p in ("xla_dense", "dense_kernel", "moc_xla", "moc_kernel"))
    us = lambda r: f"{r['time_s'] * 1e6:7.1f}" if r else "    n/a"
    pct = lambda r: f"({100 * r['bandwidth_Bps'] / copy:3.0f}%)" if r else "(n/a)"
    ratio = f"{dk['time_s'] / mk['time_s']:.2f}x" if dk and mk else "n/a"
    print(
      f"{d:<5} {f:<6} {t:<2} | {us(xd)}  {us(dk)} {pct(dk)} | {us(mx)} {us(mk)} {pct(mk)} | {ratio}"
    )


if __name__ == "__main__":
  main()
