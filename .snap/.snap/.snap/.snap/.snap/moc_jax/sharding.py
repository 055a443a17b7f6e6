"""Device mesh (data, fsdp, tensor) and the logical-axis rules that place the model on it.

Parameters carry logical axis names (`embed`, `mlp`, `heads`, ...; see model.py). `RULES` maps
each name to mesh axes: parameters and optimizer state are split FSDP-style over `fsdp` along
`embed`, attention heads, the FFN's F (`mlp`) and the vocabulary over `tensor`, and the batch
over (data, fsdp). Everything else is left to XLA's sharding propagation (Auto axes): one
`jax.jit` program over the whole mesh, no hand-written collectives outside the MoC op.

A dimension that the mesh axes do not divide is replicated along them instead (with a note at
start), so any preset runs on any mesh; only the batch must divide by data × fsdp.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moc_jax import moc
from moc_jax.model_config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = moc.BATCH_AXES  # ("data", "fsdp"); the MoC op shards its kernels over them

# logical axis name -> mesh axes (None: replicated).
RULES: dict[str, tuple[str, ...] | None] = {
  "activation_batch": BATCH_AXES,
  "activation_length": None,
  "activation_embed": None,
  "activation_mlp": ("tensor",),
  "activation_heads": ("tensor",),
  "embed": ("fsdp",),
  "mlp": ("tensor",),
  "heads": ("tensor",),
  "head_dim": None,
  "kv": None,
  "vocab": ("tensor",),
}


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with one -1 resolved to the remaining devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  named = lambda: ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ConfigError(f"mesh ({named()}): use positive sizes and at most one -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(f"mesh ({named()}) does not divide {num_devices} devices")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(
      f"mesh ({named()}) has {math.prod(sizes)} devices, "
      f"but {num_devices} are available; set one axis to -1 to take the rest"
    )
  return tuple(sizes)


def make_mesh(shape: tuple[int, int, int], devices=None) -> jax.sharding.Mesh:
  """A (data, fsdp, tensor) mesh with Auto axes: XLA propagates shardings we do not pin."""
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def mesh_from_config(mesh_cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  return make_mesh(mesh_shape(mesh_cfg, jax.device_count()))


def use_mesh(mesh: jax.sharding.Mesh):
  """Context manager making `mesh` the ambient mesh (jax.set_mesh, or use_mesh on older jax)."""
  if hasattr(jax, "set_mesh"):
    return jax.set_mesh(mesh)
  return jax.sharding.use_mesh(mesh)


def _mesh_axes_for(logical: tuple, shape: tuple[int, ...], mesh, notes: list[str], name: str) -> P:
  """Logical names -> PartitionSpec; size-1 axes dropped, non-dividing axes replicated."""
  out = []
  for dim, axis in zip(shape, logical, strict=True):
    axes = RULES.get(axis) if isinstance(axis, str) else None
    if isinstance(axis, str) and axis not in RULES:
      raise ConfigError(f"logical axis {axis!r} of {name} has no sharding rule in sharding.RULES")
    axes = tuple(a for a in (axes or ()) if mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if axes and dim % size:
      notes.append(f"{name}: {axis}={dim} not divisible by {'×'.join(axes)}={size}; replicated")
      axes = ()
    out.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*out)


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, notes: list | None = None):
  """NamedShardings for a train state (params, opt_state, step, rng) from its annotations."""
  notes = [] if notes is None else notes
  specs = nnx.get_partition_spec(abstract_state)
  is_spec = lambda x: isinstance(x, P)
  paths_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
  leaves, treedef = jax.tree.flatten(abstract_state)
  if len(paths_specs) != len(leaves):
    raise ValueError("partition specs and state do not line up")
  out = []
  seen: set[str] = set()
  for (path, spec), leaf in zip(paths_specs, leaves, strict=True):
    name = jax.tree_util.keystr(path)
    logical = tuple(spec) if is_spec(spec) else ()
    logical = logical + (None,) * (len(leaf.shape) - len(logical))
    local_notes: list[str] = []
    mesh_spec = _mesh_axes_for(logical, leaf.shape, mesh, local_notes, name)
    for n in local_notes:  # one note per parameter, not per optimizer copy of it
      key = n.split(": ", 1)[1] + str(leaf.shape)
      if key not in seen:
        seen.add(key)
        notes.append(n)
    out.append(NamedSharding(mesh, mesh_spec))
  return jax.tree.unflatten(treedef, out)


def init_sharded(init_fn: Callable[[], Any], mesh: jax.sharding.Mesh):
  """Run `init_fn` (-> train state) into its shardings; returns (state, shardings, notes).

  Each process initialises the whole state eagerly on its first local device (same seed, same
  values everywhere) and hands every local device its shard. Eager ops compile once per shape
  and are shared by all layers; one jitted init program holds hundreds of RNG fusions, and
  XLA:GPU took over 100 s to compile it for the 350m preset. The cost: one device per process
  briefly holds the whole state (16 GB for the 1b preset with AdamW).
  """
  abstract = jax.eval_shape(init_fn)
  notes: list[str] = []
  shardings = state_shardings(abstract, mesh, notes)
  with jax.default_device(jax.local_devices()[0]):
    full = init_fn()

  def place(x, sharding):
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  state = jax.tree.map(place, full, shardings)
  del full
  return state, shardings, notes


def constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
  """Pin an activation's layout by logical names under the ambient mesh (no-op without one).

  Without it XLA may carry, e.g., the embedding table's `embed`-over-fsdp split into the
  residual stream, and every layer would reshuffle activations.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return x
  spec = _mesh_axes_for(logical, x.shape, mesh, [], "activation")
  return jax.lax.with_sharding_constraint(x, spec)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Rows over (data, fsdp); the sequence stays whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def put_local_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """This process's rows -> global arrays (rows of all processes, in process order)."""
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
  }


def put_global_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """A batch every process holds in full (evaluation) -> global arrays over (data, fsdp)."""
  sharding = batch_sharding(mesh)

  def put(v):
    v = np.asarray(v)
    return jax.make_array_from_callback(v.shape, sharding, lambda idx: v[idx])

  return {k: put(v) for k, v in batch.items()}


def check_batch(
  batch_size: int, mesh: jax.sharding.Mesh, what: str = "train.batch_size", per_process=True
) -> None:
  """Rows must split evenly over data × fsdp (and, for the global batch, over processes)."""
  rows = math.prod(mesh.shape[a] for a in BATCH_AXES)
  procs = jax.process_count() if per_process else 1
  if batch_size % rows or batch_size % procs:
    raise ConfigError(
      f"{what}={batch_size} must be divisible by mesh data×fsdp={rows} "
      f"and by the number of processes={jax.process_count()}"
    )


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of `tree` (the largest shard per array, summed)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shard) * leaf.dtype.itemsize
  return total


def describe(mesh: jax.sharding.Mesh, state: Any, notes: list[str]) -> str:
  """Mesh, devices and per-device bytes of parameters and optimizer state, for the log."""
  axes = ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
  params = per_device_bytes(state["params"])
  opt = per_device_bytes(state["opt_state"])
  total_params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["params"]))
  lines = [
    f"mesh: {axes} over {mesh.size} devices ({jax.process_count()} processes, "
    f"{jax.local_device_count()} local, {mesh.devices.flat[0].device_kind})",
    f"per device: parameters {params / 2**20:.2f} MiB of {total_params / 2**20:.2f} MiB, "
    f"optimizer state {opt / 2**20:.2f} MiB",
  ]
  lines += [f"  note: {n}" for n in notes]
  return "\n".join(lines)


class PlacedIterator:
  """Wraps the data iterator: each process's rows become one global batch on the mesh.

  With several processes, get_state gathers every process's data position (Orbax writes the
  JSON once, from process 0) and set_state picks this process's own, so resume stays exact.
  Both are collectives: every process must call them at the same step (checkpoint saves are).
  """

  def __init__(self, it, mesh: jax.sharding.Mesh):
    self._it, self._mesh = it, mesh

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return put_local_batch(next(self._it), self._mesh)

  def get_state(self):
    state = self._it.get_state()
    if jax.process_count() == 1:
      return state
    from jax.experimental import multihost_utils

    blob_N = np.frombuffer(json.dumps(state).encode(), np.uint8)
    sizes_Px1 = multihost_utils.process_allgather(np.array([blob_N.size], np.int32))
    padded_N = np.zeros(int(sizes_Px1.max()), np.uint8)
    padded_N[: blob_N.size] = blob_N
    blobs_PxN = np.asarray(multihost_utils.process_allgather(padded_N))
    return {
      "per_process": [
        json.loads(bytes(blobs_PxN[p, : int(sizes_Px1[p, 0])]).decode())
        for p in range(blobs_PxN.shape[0])
      ]
    }

  def set_state(self, state) -> None:
    if isinstance(state, dict) and "per_process" in state:
      states = state["per_process"]
      if len(states) != jax.process_count():
        from moc_jax.data import DataError

        raise DataError(
          f"the checkpoint's data position is for {len(states)} processes, this run has "
          f"{jax.process_count()}: each process reads its own shard, so the stream cannot "
          "resume exactly; resume with the same number of processes"
        )
      state = states[jax.process_index()]
    self._it.set_state(state)

  def close(self) -> None:
    self._it.close()
