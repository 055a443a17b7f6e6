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
  """Reject a config file that does not exist, does not load or has no working get_config(),
  and `--config.a.b=v` naming a key the config lacks (listing that section's keys): one error
  line and exit 2 each, where ml_collections would raise from inside flag parsing (a
  traceback). `--config=file.py:arg` passes arg to get_config, as ml_collections does."""
  path = default_config
  overrides = []
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith("--config."):
      overrides.append(arg[len("--config.") :].split("=", 1)[0])
  if not path:
    return
  path, *config_arg = path.split(":", 1) if not os.path.isfile(path) else (path,)  # file.py:arg
  if not os.path.isfile(path):
    what = "is a directory, not a config file" if os.path.isdir(path) else "does not exist"
    sys.exit(fail(f"config file {path!r} {what}"))
  config = _load_config(path, config_arg)
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


def _load_config(path: str, arg: list[str]):
  """The file's get_config(*arg), as ml_collections calls it; a file that does not load, has
  no get_config or fails in it is one error line."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("_user_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    sys.exit(fail(f"config file {path!r}, line {e.lineno}: {e.msg}"))
  except Exception as e:
    sys.exit(fail(f"config file {path!r} failed to load: {type(e).__name__}: {e}"))
  if not callable(getattr(module, "get_config", None)):
    sys.exit(fail(f"config file {path!r} defines no get_config()"))
  try:
    return module.get_config(*arg)
  except Exception as e:
    sys.exit(fail(f"config file {path!r}: get_config() raised {type(e).__name__}: {e}"))


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def request_deterministic_kernels() -> None:
  """Ask XLA for deterministic GPU kernels; must run before JAX starts its backends."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_gpu_deterministic_ops" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_FLAG}".strip()
