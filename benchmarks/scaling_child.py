"""Child process of benchmarks/scaling.py: one configuration on the devices it sees.

  python benchmarks/scaling_child.py '<spec JSON>' RECORD.json

Builds the train state the way train.py does (the plain single-device path on one device;
mesh_from_config, init_sharded, put_global_batch and use_mesh on several), compiles the
train step ahead of time (timed), runs the warmup steps, times the rest one by one with
block_until_ready and writes one JSON record. Progress lines go to stdout as they happen, so
a log cut short still says how far it got.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

VARIANTS = {
  "dense": dict(ffn="dense"),
  "moc": dict(ffn="moc"),
  "moc_gcp": dict(ffn="moc", gcp=True),
  "moc_2of8": dict(ffn="moc_2of8"),
}


def say(msg: str) -> None:
  print(msg, flush=True)


def _peak_bytes(devices) -> tuple[int | None, list[int]]:
  stats = [d.memory_stats() or {} for d in devices]
  peaks = [int(s["peak_bytes_in_use"]) for s in stats if "peak_bytes_in_use" in s]
  return (max(peaks) if peaks else None), peaks


def child(spec: dict[str, Any]) -> dict[str, Any]:
  """Build, compile, warm up and time one configuration; returns its record."""
  t_start = time.perf_counter()
  import jax
  import ml_collections
  import numpy as np
  from flax import nnx

  from benchmarks import common
  from moc_jax import compile_options, model_config, sharding, train_lib
  from moc_jax.model import Transformer, count_params

  tag, n = spec["tag"], spec["n_gpus"]
  devices = jax.devices()
  say(f"[{tag}] jax {jax.__version__}: {len(devices)} x {devices[0].device_kind}")
  if len(devices) != n:
    raise RuntimeError(f"expected {n} devices, jax sees {len(devices)} (CUDA_VISIBLE_DEVICES?)")
  cfg = model_config.from_preset(
    spec["preset"],
    **VARIANTS[spec["variant"]],
    vocab_size=train_lib.round_vocab(spec["vocab"]),
    kernel_backend=spec["backend"],
    attention=spec["attention"],
  )
  t = common.bench_train_config()
  tx, schedule = train_lib.make_optimizer(t), train_lib.make_schedule(t)
  mesh = sharding.mesh_from_config(
    ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, spec["mesh"], strict=True)))
  )
  rows, seq = spec["batch_per_gpu"] * n, spec["seq"]
  state_shardings = None
  if mesh.size == 1:  # train.py's plain path: no mesh anywhere
    mesh = None
    graphdef, state = train_lib.init_state(Transformer(cfg, nnx.Rngs(0)), tx, 0)
  else:
    sharding.check_batch(rows, mesh)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    init = lambda: train_lib.init_state(Transformer(cfg, nnx.Rngs(0)), tx, 0)[1]
    state, state_shardings, notes = sharding.init_sharded(init, mesh)
    say("\n".join(f"[{tag}] {line}" for line in sharding.describe(mesh, state, notes).split("\n")))
  n_params = count_params(nnx.merge(graphdef, state["params"]))
  state_gb = sharding.per_device_bytes(state) / 1e9
  say(f"[{tag}] state built: {n_params:,} params, {state_gb:.2f} GB/device")

  tokens = np.random.default_rng(0).integers(0, spec["vocab"], (rows, seq + 1), dtype=np.int32)
  host = {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "weights": np.ones((rows, seq), np.float32),
  }
  batch = sharding.put_global_batch(host, mesh) if mesh else jax.device_put(host)
  step = train_lib.make_train_step(
    graphdef,
    tx,
    schedule,
    grad_accum=1,
    document_mask=False,
    state_shardings=state_shardings,
    compiler_options=compile_options.parse("auto"),  # as the trainer's default
  )
  with sharding.use_mesh(mesh) if mesh else contextlib.nullcontext():
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    say(f"[{tag}] compiled in {compile_s:.1f} s")
    for _ in range(spec["warmup"]):
      state, m = compiled(state, batch)
    jax.block_until_ready(m)
    say(f"[{tag}] {spec['warmup']} warmup steps done, loss {float(m['loss']):.3f}")
    times = []
    for i in range(spec["steps"]):
      t0 = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m["loss"])
      times.append(time.perf_counter() - t0)
      say(f"[{tag}] step {i + 1}/{spec['steps']}: {times[-1] * 1e3:.1f} ms")
  compiled_b = common.compiled_bytes(compiled)
  loss = float(m["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(f"loss is {loss}")
  step_s = statistics.median(times)
  tok_s = rows * seq / step_s
  peak_tflops = train_lib.device_peak_tflops(None)
  flops = train_lib.train_flops_per_token(cfg, seq)
  peak, peaks = _peak_bytes(jax.local_devices())
  limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
  return {
    **{k: spec[k] for k in ("tag", "preset", "variant", "n_gpus", "mesh_name", "gpus")},
    "mesh": dict(mesh.shape) if mesh else dict.fromkeys(sharding.MESH_AXES, 1),
    "status": "ok",
    "params": n_params,
    "k": cfg.k if cfg.ffn != "dense" else None,
    "backend": spec["backend"],
    "batch_per_gpu": spec["batch_per_gpu"],
    "global_batch": rows,
    "seq": seq,
    "compile_s": compile_s,
    "step_ms_median": step_s * 1e3,
    "step_ms_all": [x * 1e3 for x in times],
    "tokens_per_s": tok_s,
    "tokens_per_s_per_gpu": tok_s / n,
    "mfu": tok_s / n * flops / (peak_tflops * 1e12) if peak_tflops else None,
    "peak_gb_per_gpu": peak / 1e9 if peak is not None else None,
    "peak_gb_all": [p / 1e9 for p in peaks],
    "hbm_limit_gb": limit / 1e9 if limit else None,
    "compiled_gb_per_gpu": None if compiled_b is None else compiled_b / 1e9,
    "state_gb_per_gpu": state_gb,
    "loss": loss,
    "child_s": time.perf_counter() - t_start,
    "info": common.run_info(),
  }


def main(argv: list[str]) -> None:
  record = child(json.loads(argv[0]))
  with open(argv[1], "w") as fh:
    json.dump(record, fh, indent=1, default=str)
  say("RESULT " + json.dumps({k: record[k] for k in ("tag", "tokens_per_s_per_gpu")}))


if __name__ == "__main__":
  main(sys.argv[1:])
