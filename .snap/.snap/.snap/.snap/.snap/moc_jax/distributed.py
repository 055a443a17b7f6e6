"""Multi-process start-up: `jax.distributed.initialize()` when the config or environment asks.

One process per host (or per GPU); each sees its local devices and together they form one
global mesh. Decided by `config.distributed.initialize`:

  auto  initialize when the environment shows several processes (SLURM_NTASKS > 1,
        OMPI_COMM_WORLD_SIZE > 1, JAX_COORDINATOR_ADDRESS set) or the config names a
        coordinator address; otherwise stay single-process (the default single-GPU run).
  yes   always initialize (JAX's cluster detection fills in what the config leaves unset).
  no    never.

Failure handling comes from JAX's coordination service: every process sends heartbeats to the
coordinator (process 0). When one dies, the coordinator notices within `heartbeat_timeout`
seconds and the others are terminated with an error naming the missing task, instead of
waiting forever in a collective; if the coordinator itself dies, the others lose their
heartbeat and terminate the same way. `initialization_timeout` bounds the wait for all
processes to join; `shutdown_timeout` the barrier at exit.
"""

from __future__ import annotations

import inspect
import os

import jax
import ml_collections

from moc_jax.model_config import ConfigError

MODES = ("auto", "yes", "no")


def _env_process_count() -> int:
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
    if os.environ.get(var, "").isdigit():
      return int(os.environ[var])
  return 1


def wanted(dist_cfg: ml_collections.ConfigDict) -> bool:
  """Whether this run should call jax.distributed.initialize()."""
  mode = dist_cfg.initialize
  if mode not in MODES:
    raise ConfigError(f"distributed.initialize={mode!r} is not valid; choose one of: auto, yes, no")
  if mode != "auto":
    return mode == "yes"
  if dist_cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if (dist_cfg.num_processes or 1) > 1:
    return True
  return _env_process_count() > 1


def _slurm_gpus_for_one_task_per_node() -> list[int] | None:
  """All of the node's GPUs when SLURM runs one task per node.

  JAX's SLURM detection otherwise gives each process only GPU SLURM_LOCALID (one process per
  GPU), which would leave 7 of 8 GPUs idle in a one-process-per-node job.
  """
  tasks = os.environ.get("SLURM_TASKS_PER_NODE", os.environ.get("SLURM_NTASKS_PER_NODE", ""))
  gpus = os.environ.get("SLURM_GPUS_ON_NODE", "")
  if "SLURM_JOB_ID" in os.environ and tasks.split("(")[0] == "1" and gpus.isdigit():
    return list(range(int(gpus)))
  return None


def initialize_kwargs(dist_cfg: ml_collections.ConfigDict) -> dict:
  """Arguments for jax.distributed.initialize: explicit values plus the timeouts it accepts."""
  ids = dist_cfg.get("local_device_ids")
  local_ids = [int(i) for i in ids.split(",")] if ids else _slurm_gpus_for_one_task_per_node()
  kwargs = {
    "coordinator_address": dist_cfg.coordinator_address,
    "num_processes": dist_cfg.num_processes,
    "process_id": dist_cfg.process_id,
    "local_device_ids": local_ids,
    "initialization_timeout": int(dist_cfg.initialization_timeout),
    "heartbeat_timeout_seconds": int(dist_cfg.heartbeat_timeout),
    "shutdown_timeout_seconds": int(dist_cfg.shutdown_timeout),
  }
  accepted = inspect.signature(jax.distributed.initialize).parameters
  return {k: v for k, v in kwargs.items() if v is not None and k in accepted}


def maybe_initialize(dist_cfg: ml_collections.ConfigDict) -> bool:
  """Initialize the distributed runtime if wanted; returns whether it did. Call it first."""
  if not wanted(dist_cfg):
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = initialize_kwargs(dist_cfg)
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # a user-facing message instead of a gRPC trace
    shown = {k: v for k, v in kwargs.items() if "timeout" not in k}
    raise ConfigError(
      f"jax.distributed.initialize({shown}) failed: {type(e).__name__}: "
      f"{str(e).splitlines()[0][:300]}. Check the coordinator address/port, that every "
      "process started, and distributed.num_processes / process_id."
    ) from e
  print(
    f"distributed: process {jax.process_index()} of {jax.process_count()}, "
    f"{jax.local_device_count()} local / {jax.device_count()} global devices",
    flush=True,
  )
  return True


def is_main_process() -> bool:
  """Process 0 writes logs, plots and config; Orbax coordinates checkpoint writes itself."""
  return jax.process_index() == 0
