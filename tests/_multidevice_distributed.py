# ruff: noqa: E402  (XLA_FLAGS must be set before jax is imported)
"""Helper run by tests/test_distributed.py: one process of a localhost jax.distributed job.

    python tests/_multidevice_distributed.py MODE PROCESS_ID NUM_PROCESSES PORT [WORKDIR]

Each process has 2 virtual CPU devices. MODE `train`: two train steps of a tiny MoC model on
a (data=2, fsdp=1, tensor=2) mesh, each process feeding only its own rows of the global
batch, then an Orbax save + restore; prints RESULT {losses}. MODE `hang`: prints READY, then
train steps forever, for the kill-one-process test (heartbeat timeout 5 s).
"""

from __future__ import annotations

import os
import sys

from _fast_compile import with_flags  # this script's folder, tests/, is on sys.path

os.environ["XLA_FLAGS"] = with_flags(
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2", cpu_only=True
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # the steps helper and the repo's configs/

import json

import jax

from configs.base import base_config
from moc_jax import checkpoint, distributed, sharding


class _FakeData:
  """Stands in for the data iterator: a position that differs per process."""

  def __init__(self, pid: int):
    self.state, self.restored = {"pos": 10 * pid + 1, "process": pid}, None

  def get_state(self):
    return self.state

  def set_state(self, state):
    self.restored = state


def _check_data_state(mesh, pid: int) -> bool:
  """Every process's data position is saved, and each gets its own back."""
  fake = _FakeData(pid)
  placed = sharding.PlacedIterator(fake, mesh)
  saved = placed.get_state()
  placed.set_state(json.loads(json.dumps(saved)))  # as through Orbax's JsonSave
  want = [{"pos": 10 * p + 1, "process": p} for p in range(jax.process_count())]
  if jax.process_count() == 1:
    return saved == want[0] and fake.restored == fake.state
  return saved == {"per_process": want} and fake.restored == fake.state


def main() -> int:
  mode, pid, nproc, port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
  dist = base_config("tiny").distributed
  if nproc > 1:
    dist.coordinator_address = f"localhost:{port}"
    dist.num_processes, dist.process_id = nproc, pid
    dist.heartbeat_timeout = 5 if mode == "hang" else 60
    dist.initialization_timeout = 60
    dist.shutdown_timeout = 30
  distributed.maybe_initialize(dist)
  import _multidevice_steps as steps  # after initialize: it imports jax users

  setup = steps.Setup("moc")
  mesh = sharding.make_mesh((jax.device_count() // 2, 1, 2))
  state, shardings = setup.on_mesh(mesh)
  step_fn = setup.step_fn(shardings)
  if mode == "hang":
    print("READY", flush=True)
  rows = steps.B // jax.process_count()
  losses = []
  with sharding.use_mesh(mesh):
    i = 0
    while mode == "hang" or i < 2:
      batch = steps.make_batch(1 + i % 2)
      local = {k: v[pid * rows : (pid + 1) * rows] for k, v in batch.items()}
      state, metrics = step_fn(state, sharding.put_local_batch(local, mesh))
      losses.append(float(metrics["loss"]))
      i += 1
    if len(sys.argv) > 5:
      manager = checkpoint.make_manager(sys.argv[5], every=1, keep=1)
      checkpoint.save(manager, 2, state, {"rows": rows}, force=True)
      manager.wait_until_finished()
      step, restored, data_state = checkpoint.restore_latest(
        manager, checkpoint.abstract_like(state)
      )
      manager.close()
      same = jax.tree.map(lambda a, b: bool((a == b).all()), restored, state)
      ok = all(jax.tree.leaves(same)) and step == 2 and data_state == {"rows": rows}
      losses.append(ok)
  result_extra = {"data_state_ok": _check_data_state(mesh, pid)}
  ref = []  # the same steps on one local device, no mesh
  if mode == "train":
    ref_state = setup.host_state
    for i in range(2):
      ref_state, ref_metrics = steps.single_step(setup, ref_state, steps.make_batch(1 + i))
      ref.append(float(ref_metrics["loss"]))
  result = {"process": jax.process_index(), "losses": losses, "single_device": ref, **result_extra}
  print("RESULT " + json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
