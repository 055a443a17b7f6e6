"""Shared command-line behaviour: bad input becomes one clear line and a non-zero exit."""

from __future__ import annotations

import contextlib
import sys

EXIT_USER_ERROR = 2


def fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr, flush=True)
  return EXIT_USER_ERROR


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
