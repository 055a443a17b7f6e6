# ruff: noqa: E402  (XLA_FLAGS must be set before jax is imported)
"""Helper run by tests/test_sharding.py in a fresh process with 8 virtual CPU devices.

One train step of a tiny model on several (data, fsdp, tensor) meshes against the
single-device step; exact tensor-parallel MoC selection; save on one mesh, restore on another.
Prints one JSON line of measurements; the test asserts on them.
"""

from __future__ import annotations

import os
import sys

from _fast_compile import with_flags  # this script's folder, tests/, is on sys.path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  os.environ["XLA_FLAGS"] = with_flags(flags, cpu_only=True)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

jax.config.update("jax_default_matmul_precision", "highest")

from moc_jax import checkpoint, moc, moc_tp, sharding, train_lib
from moc_jax.model import Transformer
from moc_jax.model_config import ModelConfig
from pallas_kernels import reference

MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8))
B, L = 8, 16


def model_cfg(ffn: str) -> ModelConfig:
  return ModelConfig(
    vocab_size=64, d_model=32, d_ff=96, num_layers=1, num_heads=8, k=16, ffn=ffn, dtype="float32"
  )


def train_cfg() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.update(steps=10, lr=1e-2, warmup_frac=0.0, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip=0.0)
  return t


def make_batch(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, size=(B, L + 1), dtype=np.int32)
  weights = (rng.random((B, L)) > 0.1).astype(np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


class Setup:
  """Model, optimizer and a host copy of the initial state for one FFN variant."""

  def __init__(self, ffn: str):
    cfg, t = model_cfg(ffn), train_cfg()
    self.tx, self.schedule = train_lib.make_optimizer(t), train_lib.make_schedule(t)
    self.init = lambda: train_lib.init_state(Transformer(cfg, nnx.Rngs(0)), self.tx, 0)[1]
    self.graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))
    self.host_state = jax.device_get(jax.jit(self.init)())
    self.single = self.step_fn()  # compiled once, reused

  def step_fn(self, shardings=None):
    return train_lib.make_train_step(
      self.graphdef,
      self.tx,
      self.schedule,
      grad_accum=1,
      document_mask=False,
      state_shardings=shardings,
    )

  def on_mesh(self, mesh, host_state=None):
    shardings = sharding.state_shardings(jax.eval_shape(self.init), mesh)
    state = jax.device_put(self.host_state if host_state is None else host_state, shardings)
    return state, shardings


def max_diff(a, b) -> float:
  leaves = jax.tree.leaves(jax.tree.map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b))
  return float(max(leaves))


def single_step(setup: Setup, state, batch):
  state = jax.device_put(state, jax.local_devices()[0])
  return jax.device_get(setup.single(state, batch))


def mesh_step(setup: Setup, shape, host_state, batch):
  mesh = sharding.make_mesh(shape)
  state, shardings = setup.on_mesh(mesh, host_state)
  with sharding.use_mesh(mesh):
    new, metrics = setup.step_fn(shardings)(state, sharding.put_global_batch(batch, mesh))
  kept = jax.tree.map(lambda a, s: a.sharding == s, new, shardings)
  return new, jax.device_get(metrics), all(jax.tree.leaves(kept))


SETUPS: dict[str, Setup] = {}
AFTER_STEP: dict = {}  # (ffn, mesh shape) -> state after the step, for the checkpoint check


def setup_for(ffn: str) -> Setup:
  if ffn not in SETUPS:
    SETUPS[ffn] = Setup(ffn)
  return SETUPS[ffn]


def check_steps(out: dict) -> None:
  batch = make_batch(1)
  calls = []
  original = moc_tp.moc_ffn_tp

  def counting(*a, **kw):
    calls.append(1)
    return original(*a, **kw)

  moc_tp.moc_ffn_tp = counting
  for ffn in ("dense", "moc"):
    setup = setup_for(ffn)
    ref_state, ref_m = single_step(setup, setup.host_state, batch)
    for shape in MESHES:
      calls.clear()
      new, m, kept = mesh_step(setup, shape, setup.host_state, batch)
      AFTER_STEP[ffn, shape] = new
      out[f"{ffn}/{shape}"] = {
        "loss": abs(float(m["loss"]) - float(ref_m["loss"])),
        "grad_norm": abs(float(m["grad_norm"]) - float(ref_m["grad_norm"])),
        "mu": max_diff(jax.device_get(new["opt_state"][0].mu), ref_state["opt_state"][0].mu),
        "params": max_diff(jax.device_get(new["params"]), ref_state["params"]),
        "shardings_kept": kept,
        "tp_op_calls": len(calls),
      }
  moc_tp.moc_ffn_tp = original


def check_selection(out: dict) -> None:
  rng = np.random.default_rng(0)
  results = []
  # (dtype, T, F, K, valid F, tensor): ties everywhere; F padding; K > F/tensor; bf16 keys.
  cases = [
    ("float32", 32, 96, 16, 96, 4),
    ("float32", 32, 96, 40, 90, 8),
    ("bfloat16", 32, 96, 7, 93, 2),
  ]
  for dtype, t_, f_, k_, valid, tp in cases:
    g = jnp.asarray(np.round(rng.normal(size=(t_, f_)) * 2) / 2, dtype)  # many ties
    want = reference.topk_mask(reference.mask_padding(g, valid), k_)
    with sharding.use_mesh(sharding.make_mesh((8 // tp, 1, tp))):
      got = jax.jit(lambda a, k=k_, v=valid: moc_tp.select_mask_tp(a, k, d_ff=v))(g)
    results.append(bool(jnp.all(got == want)) and int(got.sum()) == t_ * k_)
  with sharding.use_mesh(sharding.make_mesh((2, 1, 4))):
    got = jax.jit(lambda a: moc_tp.select_mask_tp(a, 0, variant="moc_2of8"))(g)
  results.append(bool(jnp.all(got == reference.group_mask(g))))
  out["selection_exact"] = results


def check_pallas_rows(out: dict) -> None:
  """MoC's Pallas epilogues (interpret mode here) run per batch shard under a data×fsdp mesh."""
  from pallas_kernels import moc_train, moc_train_mask

  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(B, L, 32)), jnp.float32)
  ws = [jnp.asarray(rng.normal(size=s) / 6, jnp.float32) for s in ((32, 96), (32, 96), (96, 32))]

  def loss(x, wg, wu, wd, backend):
    return jnp.sum(moc.moc_ffn(x, wg, wu, wd, k=16, backend=backend) ** 2)

  want = jax.grad(lambda *a: loss(*a, "xla"), argnums=(0, 1, 2, 3))(x, *ws)
  rows = []
  patched = [
    (moc_train, "train_forward_epilogue"),
    (moc_train, "train_backward_epilogue"),
    (moc_train_mask, "train_forward_bitmask"),
    (moc_train_mask, "train_backward_bitmask"),
  ]
  originals = [getattr(module, name) for module, name in patched]

  def recording(fn):
    def wrapped(first, *a, **kw):
      rows.append(first.shape[0])
      return fn(first, *a, **kw)

    return wrapped

  for (module, name), fn in zip(patched, originals, strict=True):
    setattr(module, name, recording(fn))
  try:
    mesh = sharding.make_mesh((4, 2, 1))
    with sharding.use_mesh(mesh):
      x_s = jax.device_put(
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
      )
      got = jax.jit(jax.grad(lambda *a: loss(*a, "pallas"), argnums=(0, 1, 2, 3)))(x_s, *ws)
  finally:
    for (module, name), fn in zip(patched, originals, strict=True):
      setattr(module, name, fn)
  out["pallas_rows"] = {
    "max_diff": max_diff(jax.device_get(got), want),
    "rows_seen": sorted(set(rows)),
  }


def check_checkpoint(out: dict) -> None:
  setup = setup_for("moc")
  batch2 = make_batch(2)
  mesh_a = sharding.make_mesh((2, 4, 1))
  state_a = AFTER_STEP.get(("moc", (2, 4, 1)))
  if state_a is None:
    state_a = mesh_step(setup, (2, 4, 1), setup.host_state, make_batch(1))[0]
  saved = jax.device_get(state_a)
  with tempfile.TemporaryDirectory() as workdir:
    manager = checkpoint.make_manager(workdir, every=1, keep=1)
    with sharding.use_mesh(mesh_a):
      checkpoint.save(manager, 1, state_a, {"pos": 1}, force=True)
    manager.wait_until_finished()
    manager.close()
    mesh_b = sharding.make_mesh((1, 2, 4))
    target, shardings_b = setup.on_mesh(mesh_b)
    manager = checkpoint.make_manager(workdir, every=1, keep=1)
    with sharding.use_mesh(mesh_b):
      step, restored, data_state = checkpoint.restore_latest(
        manager, checkpoint.abstract_like(target)
      )
    manager.close()
  resharded = jax.tree.map(lambda a, s: a.sharding == s, restored, shardings_b)
  out["ckpt_restored_exact"] = max_diff(jax.device_get(restored), saved) == 0.0
  out["ckpt_resharded"] = all(jax.tree.leaves(resharded)) and step == 1 and data_state == {"pos": 1}
  with sharding.use_mesh(mesh_b):
    step_b = setup.step_fn(shardings_b)
    new_b, m_b = step_b(restored, sharding.put_global_batch(batch2, mesh_b))
  ref_state, ref_m = single_step(setup, saved, batch2)
  out["ckpt_next_step"] = {
    "loss": abs(float(m_b["loss"]) - float(ref_m["loss"])),
    "params": max_diff(jax.device_get(new_b["params"]), ref_state["params"]),
  }


def main() -> int:
  which = sys.argv[1:] or ["steps", "selection", "pallas_rows", "checkpoint"]
  out: dict = {"devices": jax.device_count()}
  for name in which:
    start = time.perf_counter()
    checks = {
      "steps": check_steps,
      "selection": check_selection,
      "pallas_rows": check_pallas_rows,
      "checkpoint": check_checkpoint,
    }
    checks[name](out)
    out[f"seconds/{name}"] = round(time.perf_counter() - start, 1)
  print("RESULT " + json.dumps(out), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
