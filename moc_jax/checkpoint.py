"""Orbax checkpoints of everything a resumed run needs: parameters, optimizer state, step,
RNG and the data iterator's position, plus the config that made them.

Orbax writes each step to a temporary directory and renames it when complete, so a crash
mid-save never leaves a step that looks finished. A step that is finished but unreadable
(disk trouble, a truncated copy) is skipped in favour of the newest one that restores.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
  """A workdir or checkpoint that cannot be used; the message names the problem."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(
  workdir: str, *, every: int, keep: int, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(  # read-only: what Orbax would set, without its warnings
    save_interval_steps=0 if read_only else max(every, 1),
    max_to_keep=None if read_only else keep,
    enable_async_checkpointing=async_save,
    create=not read_only,
    read_only=read_only,
  )
  absl_log = logging.getLogger("absl")
  absl_log.addFilter(_not_read_only_notice)  # reading a run is what read_only is for
  try:
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)
  finally:
    absl_log.removeFilter(_not_read_only_notice)


def _not_read_only_notice(record: logging.LogRecord) -> bool:
  return not record.getMessage().startswith("Given directory is read only")


def save(
  manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict, *, force: bool = False
) -> bool:
  """Save (possibly asynchronously) if the interval policy says so or `force`."""
  args = ocp.args.Composite(
    state=ocp.args.StandardSave(state),
    data=ocp.args.JsonSave(data_state),
  )
  return manager.save(step, args=args, force=force)


def restore_latest(
  manager: ocp.CheckpointManager, abstract_state: Any
) -> tuple[int, Any, dict] | None:
  """(step, state, data_state) from the newest readable checkpoint, or None if there is none."""
  steps = sorted(manager.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore(),
        ),
      )
    except Exception as e:  # any unreadable step is set aside, and reported
      errors.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      moved = _set_aside(manager, step)
      print(
        f"warning: checkpoint at step {step} is unreadable ({type(e).__name__}); "
        f"moved it to {moved} and trying an older one"
      )
      continue
    return step, restored["state"], restored["data"]
  if errors:
    raise CheckpointError(
      "no checkpoint in this workdir could be restored:\n  " + "\n  ".join(errors)
    )
  return None


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Move an unreadable step out of the manager's way (kept, never deleted)."""
  src = os.path.join(str(manager.directory), str(step))
  dst_dir = os.path.join(os.path.dirname(str(manager.directory)), "checkpoints_unreadable")
  os.makedirs(dst_dir, exist_ok=True)
  dst = os.path.join(dst_dir, f"{step}-{int(time.time())}")
  os.replace(src, dst)
  manager.reload()
  return dst


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) for restoring into the same structure."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def read_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_config(workdir: str, config_dict: dict) -> None:
  """Write config.json atomically (a crash never leaves half a file)."""
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(config_dict, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def check_same_model(saved: dict | None, current: dict, workdir: str) -> None:
  """Refuse to resume a workdir whose checkpoints belong to a different model or tokenizer."""
  if saved is None:
    return
  diffs = [
    f"model.{k}: saved {saved['model'].get(k)!r} vs now {current['model'].get(k)!r}"
    for k in sorted(set(saved["model"]) | set(current["model"]))
    if saved["model"].get(k) != current["model"].get(k) and k in _SHAPE_KEYS
  ]
  for k in ("tokenizer",):
    if saved.get("data", {}).get(k) != current["data"].get(k):
      diffs.append(f"data.{k}: saved {saved['data'].get(k)!r} vs now {current['data'].get(k)!r}")
  if diffs:
    raise CheckpointError(
      f"workdir {workdir} holds a checkpoint of a different model:\n  "
      + "\n  ".join(diffs)
      + "\nUse a new --workdir, or the same model settings to resume."
    )


# Keys that change parameter shapes or what the parameters mean; others (dtype, backend,
# remat, gcp) may change between a save and a resume.
_SHAPE_KEYS = ("preset", "ffn", "k", "vocab_size", "d_model", "d_ff", "num_layers", "num_heads")


def check_workdir_writable(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise CheckpointError(f"cannot create workdir {workdir!r}: {e.strerror}") from e
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise CheckpointError(f"workdir {workdir!r} is not writable")
