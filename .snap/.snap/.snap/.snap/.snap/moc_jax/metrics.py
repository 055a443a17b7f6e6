"""What a training run tells a person: a progress line, metrics.jsonl, TensorBoard events
(through tensorboardX, no TensorFlow) and a PNG of the loss curves at the end."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def format_duration(seconds: float) -> str:
  seconds = max(int(seconds), 0)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Reporter:
  """Writes metrics for step-stamped records to stdout, JSONL and TensorBoard."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True):
    self.workdir = workdir
    self.total_steps = total_steps
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")  # noqa: SIM115
      try:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        print("note: tensorboardX is not installed; no TensorBoard events are written")

  def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"kind": kind, "step": step, "time": time.time(), **values}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in values.items():
        if isinstance(value, int | float) and math.isfinite(value):
          self._tb.add_scalar(f"{kind}/{name}", value, step)

  def say(self, line: str) -> None:
    """Print on the process that reports (process 0), not once per host."""
    if self.enabled:
      print(line, flush=True)

  def progress(self, step: int, m: dict[str, Any], steps_per_sec: float) -> None:
    if not self.enabled:
      return
    eta = (self.total_steps - step) / steps_per_sec if steps_per_sec > 0 else float("nan")
    parts = [
      f"step {step:>6d}/{self.total_steps}",
      f"loss {m['loss']:.4f}",
      f"ppl {m['perplexity']:.2f}",
      f"lr {m['lr']:.2e}",
      f"{m['tokens_per_sec']:,.0f} tok/s",
    ]
    if m.get("mfu") is not None:
      parts.append(f"MFU {m['mfu']:.1%}")
    if m.get("peak_memory_gb") is not None:
      parts.append(f"peak {m['peak_memory_gb']:.1f} GB")
    parts.append(f"ETA {format_duration(eta) if math.isfinite(eta) else '?'}")
    print(" | ".join(parts), flush=True)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of metrics.jsonl; a line cut short (a run killed mid-write) is skipped."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def plot_losses(workdir: str) -> str | None:
  """Train and validation loss against step, from metrics.jsonl; returns the PNG path."""
  records = read_metrics(workdir)
  train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
  val = [(r["step"], r["loss"]) for r in records if r["kind"] == "eval"]
  if not train and not val:
    return None
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
  for points, label, style in ((train, "train", "-"), (val, "validation", "o-")):
    if points:
      steps, losses = zip(*sorted(dict(points).items()), strict=True)
      ax.plot(steps, losses, style, label=label, markersize=4)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(os.path.basename(os.path.abspath(workdir)))
  ax.grid(alpha=0.3)
  ax.legend()
  path = os.path.join(workdir, PLOT_FILE)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path
