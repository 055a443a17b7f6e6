"""The training CLI's config checks, run before absl parses the flags: every bad config file
or key is one `error:` line and exit 2 (ml_collections alone would print a traceback)."""

import os

import pytest

from moc_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(REPO, "configs", "default.py")


def _error(capsys, *args: str, default: str | None = DEFAULT) -> str:
  with pytest.raises(SystemExit) as exit_info:
    cli.check_config_overrides(["train.py", *args], default)
  assert exit_info.value.code == cli.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1
  return err


@pytest.mark.parametrize(
  ("body", "message"),
  [
    ("x = \n", "line 1: invalid syntax"),
    ("import os\n", "defines no get_config()"),
    ("def get_config():\n  raise ValueError('boom')\n", "get_config() raised ValueError: boom"),
    ("import not_a_module_anywhere\n", "failed to load: ModuleNotFoundError"),
  ],
)
def test_a_broken_config_file_is_one_error_line(tmp_path, capsys, body, message):
  path = tmp_path / "my_config.py"
  path.write_text(body)
  assert message in _error(capsys, f"--config={path}")


def test_a_missing_config_file_or_a_directory_is_named(tmp_path, capsys):
  assert "'nope.py' does not exist" in _error(capsys, "--config", "nope.py")
  assert "is a directory" in _error(capsys, f"--config={tmp_path}")
  assert "does not exist" in _error(capsys, "--config=nope.py:arg")


def test_good_configs_pass_and_get_their_argument(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(REPO)  # configs import configs.base
  cli.check_config_overrides(["train.py", "--config.train.steps=3"], DEFAULT)
  path = tmp_path / "with_arg.py"
  path.write_text("def get_config(size):\n  assert size == 'big'\n  return {'size': size}\n")
  cli.check_config_overrides(["train.py", f"--config={path}:big"], DEFAULT)
  cli.check_config_overrides(["evaluate.py"], None)  # no config at all: nothing to check


def test_an_unknown_key_lists_the_valid_ones(capsys, monkeypatch):
  monkeypatch.syspath_prepend(REPO)
  err = _error(capsys, "--config.train.stepz=3")
  assert "config.train has no 'stepz'" in err and "batch_size" in err
