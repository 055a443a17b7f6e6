"""The trainer end to end on the embedded corpus: loss falls, exact resume, SIGTERM, NaN stop,
half-written checkpoints, evaluation, and every bad input gets one clear error."""

import json
import logging
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from configs.default import get_config
from moc_jax import checkpoint, evaluate, metrics, trainer
from moc_jax.data import DataError
from moc_jax.model_config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**train):
  c = get_config()
  c.eval.batch_size = 4
  c.train.update({"steps": 12, "batch_size": 4, "seq_len": 32, "log_every": 1, "lr": 3e-3, **train})
  c.eval.update(every=6, batches=2)
  c.checkpoint.update(every=6, async_save=False)
  return c


def train_losses(workdir):
  return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if r["kind"] == "train"}


class _SignalAfter:
  """Wraps the data iterator: raises a real SIGTERM at this process after n batches."""

  def __init__(self, n):
    self.n, self.real = n, trainer.data.make_train_iterator

  def __call__(self, *a, **kw):
    it = self.real(*a, **kw)
    real_next, count = it.__next__, [0]

    class Wrapped(type(it)):
      def __next__(self_inner):
        count[0] += 1
        if count[0] == self.n + 1:
          signal.raise_signal(signal.SIGTERM)
        return real_next()

    it.__class__ = Wrapped
    return it


def test_training_lowers_the_loss_and_writes_every_output(tmp_path):
  cfg = small_config(steps=30, lr=1e-2, batch_size=16, seq_len=64)
  result = trainer.train(cfg, str(tmp_path))
  losses = train_losses(str(tmp_path))
  assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 2.0
  assert result["perplexity"] < 100  # byte-uniform would be 256
  for name in ("metrics.jsonl", "loss.png", "config.json", "tensorboard"):
    assert os.path.exists(tmp_path / name), name
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["18", "24", "30"]  # keep 3
  evals = [r for r in metrics.read_metrics(str(tmp_path)) if r["kind"] == "eval"]
  assert [r["step"] for r in evals] == [6, 12, 18, 24, 30]
  # evaluate.py on the saved checkpoint reproduces the trainer's final validation figure
  again = evaluate.evaluate_workdir(str(tmp_path), cfg)
  assert again["step"] == 30 and abs(again["loss"] - result["loss"]) < 1e-6


def test_sigterm_saves_and_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch):
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  trainer.train(small_config(), straight)
  monkeypatch.setattr(trainer.data, "make_train_iterator", _SignalAfter(4))
  result = trainer.train(small_config(), stopped)
  assert result["stopped_by"] == "SIGTERM" and result["step"] == 5
  assert checkpoint.make_manager(stopped, every=1, keep=3).latest_step() == 5
  monkeypatch.undo()
  trainer.train(small_config(), stopped)
  a, b = train_losses(straight), train_losses(stopped)
  assert sorted(b) == list(range(1, 13))
  assert [a[s] for s in range(1, 13)] == [b[s] for s in range(1, 13)]  # bitwise


def test_sigterm_on_a_checkpoint_step_does_not_save_twice(tmp_path, monkeypatch):
  monkeypatch.setattr(trainer.data, "make_train_iterator", _SignalAfter(5))
  result = trainer.train(small_config(), str(tmp_path))  # checkpoint.every = 6
  assert result["stopped_by"] == "SIGTERM" and result["step"] == 6
  assert checkpoint.make_manager(str(tmp_path), every=1, keep=3).all_steps() == [6]


def test_a_half_written_newest_checkpoint_is_skipped(tmp_path):
  workdir = str(tmp_path)
  trainer.train(small_config(), workdir)
  ckpt = tmp_path / "checkpoints" / "12" / "state"
  for root, _, files in os.walk(ckpt):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  cfg = small_config(steps=14)
  result = trainer.train(cfg, workdir)  # resumes from step 6, not the broken 12
  assert result["step"] == 14
  assert os.listdir(tmp_path / "checkpoints_unreadable")[0].startswith("12-")  # kept aside
  steps = [r["step"] for r in metrics.read_metrics(workdir) if r["kind"] == "train"]
  assert steps.count(7) == 2  # steps 7.. were trained again after the fallback


def test_nan_loss_stops_without_saving(tmp_path):
  cfg = small_config(lr=1e30)
  cfg.checkpoint.every = 1000
  with pytest.raises(trainer.TrainingDiverged, match="loss became"):
    trainer.train(cfg, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == []


def test_grad_accumulation_matches_one_big_batch(tmp_path):
  a = trainer.train(small_config(steps=3), str(tmp_path / "a"))
  b = trainer.train(small_config(steps=3, grad_accum=2), str(tmp_path / "b"))
  la, lb = train_losses(str(tmp_path / "a")), train_losses(str(tmp_path / "b"))
  np.testing.assert_allclose([la[s] for s in (1, 2, 3)], [lb[s] for s in (1, 2, 3)], rtol=1e-4)
  assert abs(a["loss"] - b["loss"]) < 1e-3


@pytest.mark.parametrize(
  "section,key,value,error,message",
  [
    ("model", "preset", "2b", ConfigError, "model.preset='2b' is unknown"),
    ("model", "ffn", "topk", ConfigError, "model.ffn='topk' is not valid"),
    ("model", "k", 0, ConfigError, "0 < k <= d_ff"),
    ("model", "k", 10_000, ConfigError, "0 < k <= d_ff"),
    ("model", "decode_attention_warm_mb", -1, ConfigError, "decode_attention_warm_mb must be >= 0"),
    ("train", "batch_size", 3, ConfigError, "divisible by train.grad_accum"),
    ("train", "compiler_options", "xla_no_such_option=1", ConfigError, "XLA rejected"),
    ("train", "compiler_options", "triton_gemm", ConfigError, "is not name=value"),
    ("data", "source", "s3", DataError, "source"),
  ],
)
def test_bad_config_values_are_rejected_before_anything_is_written(
  tmp_path, section, key, value, error, message
):
  cfg = small_config(grad_accum=2) if key == "batch_size" else small_config()
  cfg[section][key] = value
  with pytest.raises(error, match=message):
    trainer.train(cfg, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_2of8_with_f_not_divisible_by_8_is_rejected():
  from moc_jax import model_config

  with pytest.raises(ConfigError, match="divisible by 8"):
    model_config.from_preset("60m", ffn="moc_2of8", d_ff=1370)


def test_missing_or_empty_text_data_is_a_clear_error(tmp_path):
  cfg = small_config()
  cfg.data.source = "text"
  cfg.data.path = str(tmp_path / "nothing-*.txt")
  with pytest.raises(DataError, match="nothing-"):
    trainer.train(cfg, str(tmp_path / "w"))
  (tmp_path / "empty.txt").write_text("")
  cfg.data.path = str(tmp_path / "empty.txt")
  with pytest.raises(DataError):
    trainer.train(cfg, str(tmp_path / "w"))


def test_a_workdir_of_another_model_is_refused_and_left_intact(tmp_path):
  workdir = str(tmp_path)
  trainer.train(small_config(steps=6), workdir)
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  saved = json.loads((tmp_path / "config.json").read_text())
  cfg = small_config(steps=8)
  cfg.model.ffn = "dense"
  with pytest.raises(checkpoint.CheckpointError, match=r"model\.ffn: saved 'moc' vs now 'dense'"):
    trainer.train(cfg, workdir)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  assert json.loads((tmp_path / "config.json").read_text()) == saved


def test_unwritable_workdir_is_a_clear_error(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(checkpoint.CheckpointError, match="cannot create workdir"):
    trainer.train(small_config(), str(blocker / "run"))


def _cli(*args, **popen):
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  return subprocess.Popen(
    [sys.executable, "train.py", *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **popen,
  )


def test_cli_bad_input_prints_one_error_line_and_exits_2(tmp_path):
  proc = _cli("--config=configs/default.py", "--config.model.ffn=topk", f"--workdir={tmp_path}")
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 2
  assert "error: model.ffn='topk' is not valid; choose one of: dense, moc, moc_2of8" in out
  assert "Traceback" not in out


def test_cli_unknown_config_key_lists_the_valid_ones(tmp_path):
  proc = _cli("--config.model.fnn=moc", f"--workdir={tmp_path}")
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 2
  assert "unknown config key --config.model.fnn: config.model has no 'fnn'" in out
  assert "ffn, ffn_keep_weights, gcp, k" in out and "Traceback" not in out
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_cli_sigterm_mid_run_then_resume(tmp_path):
  args = [
    "--config=configs/default.py",
    "--config.train.steps=400",
    "--config.train.seq_len=32",
    "--config.train.batch_size=4",
    "--config.train.log_every=1",
    "--config.checkpoint.every=1000",
    f"--workdir={tmp_path}",
  ]
  proc = _cli(*args)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step     20/"):
      proc.send_signal(signal.SIGTERM)
      break
  out = "".join(lines) + proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out
  assert "SIGTERM: saved a checkpoint at step" in out
  step = checkpoint.make_manager(str(tmp_path), every=1, keep=3).latest_step()
  assert step is not None and step >= 20
  proc = _cli(*args[:1], "--config.train.steps=" + str(step + 3), *args[2:])
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out
  assert f"resumed from the checkpoint at step {step}" in out
  assert "final validation perplexity" in out


def test_deterministic_request_adds_the_xla_flag_once(monkeypatch):
  from moc_jax import cli

  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  cli.request_deterministic_kernels()
  cli.request_deterministic_kernels()
  flags = os.environ["XLA_FLAGS"].split()
  assert flags == ["--xla_force_host_platform_device_count=2", cli.DETERMINISTIC_FLAG]
  assert get_config().train.deterministic is False  # opt-in: it costs speed on GPU


def test_gcp_trains_exactly_like_moc(tmp_path):
  """GCP only changes what the backward recomputes: every logged loss, gradient norm and
  validation loss equals plain MoC's, bit for bit (benchmarks/compare_traces.py's check)."""
  from benchmarks import compare_traces

  cfg = small_config(steps=4)
  cfg.eval.every = 4
  trainer.train(cfg, str(tmp_path / "moc"))
  cfg.model.gcp = True
  trainer.train(cfg, str(tmp_path / "gcp"))
  verdict = compare_traces.compare(str(tmp_path / "moc"), str(tmp_path / "gcp"))
  assert verdict["identical"] and verdict["values_compared"] == 9, verdict  # 4 × 2 + 1 eval


def test_reading_a_run_logs_no_orbax_warnings(tmp_path, caplog):
  """`evaluate` and `generate` open the checkpoints read-only; Orbax's notices about that
  (three absl WARNING lines on every call) are not the user's concern."""
  os.makedirs(checkpoint.checkpoint_dir(str(tmp_path)))
  with caplog.at_level(logging.WARNING):
    manager = checkpoint.make_manager(str(tmp_path), every=1, keep=1, read_only=True)
  assert manager.latest_step() is None
  assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
