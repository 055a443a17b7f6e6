"""Shared command-line behaviour: bad input becomes one clear line and a non-zero exit."""

from __future__ import annotations

import contextlib
import os
import sys

EXIT_USER_ERROR = 2


def fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr, flush=True)
  return EXIT_USER_ERROR


def bad_invocation(argv: list[str], workdir: str | None, why: str = "") -> int | None:
  """The exit code for stray positional arguments or a missing --workdir, else None."""
  if len(argv) > 1:
    return fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if not workdir:
    return fail("--workdir is required" + (f" ({why})" if why else ""))
  return None


@contextlib.contextmanager
def user_errors():
  """Turn the project's own error types into `error: ...` + exit 2, not a traceback."""
  from moc_jax.checkpoint import CheckpointError
  from moc_jax.data import DataError
  from moc_jax.model_config import ConfigError
  from moc_jax.trainer import TrainingDiverged

  try:
    yield
  except (ConfigError, DataError, CheckpointError, TrainingDiverged) as e:
    sys.exit(fail(str(e)))


def check_config_overrides(argv: list[str], default_config: str | None) -> None:
  """Reject `--config.a.b=v` naming a key the config lacks, listing that section's keys.

  ml_collections would raise a bare AttributeError (a traceback) from inside flag parsing.
  """
  import importlib.util

  path = default_config
  overrides = []
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg.startswith("--config."):
      overrides.append(arg[len("--config.") :].split("=", 1)[0])
  if not overrides or not path:
    return
  if not os.path.exists(path):
    sys.exit(fail(f"config file {path!r} does not exist"))
  spec = importlib.util.spec_from_file_location("_user_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for dotted in overrides:
    node, walked = config, []
    for key in dotted.split("."):
      if not hasattr(node, "keys") or key not in node:
        where = "config" + "".join(f".{w}" for w in walked)
        valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a section)"
        sys.exit(
          fail(
            f"unknown config key --config.{dotted}: {where} has no {key!r}; "
            f"valid keys there: {valid}"
          )
        )
      node, walked = node[key], [*walked, key]


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def request_deterministic_kernels() -> None:
  """Ask XLA for deterministic GPU kernels; must run before JAX starts its backends."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_gpu_deterministic_ops" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()
