"""Convergence study driver: dense vs MoC vs 2:8 vs MoC+GCP and a K ablation, one GPU per run.

  python benchmarks/convergence.py --gpus=0,1,2,3 --workroot=runs/study \
      --variants=dense,moc,moc_2of8,moc_gcp,moc_k128,moc_k512 --deadline_s=470

Every run is plain `train.py --config=configs/study_60m_code.py` (the same seed, data order,
tokenizer and token budget) with the variant's overrides, in its own workdir under --workroot,
so a run that was stopped resumes from its checkpoint when the driver is started again. Runs are
queued onto free GPUs; once the first runs have finished, a queued run starts only if the
slowest finished run's wall time still fits before --deadline_s. At the deadline the runs still
going get SIGTERM (the trainer saves and exits). Then `moc_jax.channel_usage` measures MoC
channel usage of every finished run, `run_summary.json` records throughput and memory, and
--bundle packs the small files (no checkpoints) for benchmarks/convergence_report.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import convergence_report  # noqa: E402

CONFIG = "configs/study_60m_code.py"
VARIANTS = {
  "dense": {"model.ffn": "dense"},
  "moc": {"model.ffn": "moc"},  # K = d/2 = 256
  "moc_2of8": {"model.ffn": "moc_2of8"},
  "moc_gcp": {"model.ffn": "moc", "model.gcp": "True"},
  "moc_k128": {"model.ffn": "moc", "model.k": "128"},  # K = d/4
  "moc_k512": {"model.ffn": "moc", "model.k": "512"},  # K = d
}
SMALL_FILES = ("metrics.jsonl", "config.json", "channel_usage.json", "run_summary.json", "log.txt")


class Run:
  """One variant's train.py process on one GPU."""

  def __init__(self, name: str, gpu: str, args):
    self.name, self.gpu = name, gpu
    self.workdir = os.path.join(args.workroot, name)
    os.makedirs(self.workdir, exist_ok=True)
    cmd = [sys.executable, "train.py", f"--config={args.config}", f"--workdir={self.workdir}"]
    cmd += [f"--config.{k}={v}" for k, v in VARIANTS[name].items()]
    cmd += [f"--config.{o}" for o in args.override]
    self.log = open(os.path.join(self.workdir, "log.txt"), "a")  # noqa: SIM115
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu, PYTHONUNBUFFERED="1")
    self.start = time.time()
    self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
    print(f"[{_now()}] start {name} on GPU {gpu}: {' '.join(cmd[1:])}", flush=True)

  def done(self) -> bool:
    return self.proc.poll() is not None


def _now() -> str:
  return time.strftime("%H:%M:%S")


def schedule(args) -> dict[str, dict]:
  """Runs the queue; returns {variant: {returncode, wall_s, gpu}}."""
  queue, free = list(args.variants), list(args.gpus)
  running: list[Run] = []
  results: dict[str, dict] = {}
  t0 = time.time()
  while queue or running:
    for run in [r for r in running if r.done()]:
      running.remove(run)
      free.append(run.gpu)
      wall = time.time() - run.start
      results[run.name] = dict(returncode=run.proc.returncode, wall_s=round(wall, 1), gpu=run.gpu)
      print(f"[{_now()}] {run.name} exited {run.proc.returncode} after {wall:.0f}s", flush=True)
    walls = [r["wall_s"] for r in results.values() if r["returncode"] == 0]
    while queue and free:
      remaining = args.deadline_s - (time.time() - t0)
      if results and (not walls or max(walls) > remaining):
        print(f"[{_now()}] not started (too little time left): {', '.join(queue)}", flush=True)
        for name in queue:
          results[name] = dict(returncode=None, not_started=True)
        queue = []
        break
      running.append(Run(queue.pop(0), free.pop(0), args))
    if running and time.time() - t0 > args.deadline_s:
      for run in running:
        print(f"[{_now()}] deadline: SIGTERM {run.name}", flush=True)
        run.proc.send_signal(signal.SIGTERM)
      for run in running:
        try:
          run.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
          run.proc.kill()
        results[run.name] = dict(
          returncode=run.proc.returncode, wall_s=round(time.time() - run.start, 1), stopped=True
        )
        results[run.name]["gpu"] = run.gpu
      running = []
    time.sleep(2)
  return results


def summarize(workdir: str, result: dict) -> dict:
  """The process facts plus what the report reads from the run's files (one reader for both)."""
  stale = os.path.join(workdir, "run_summary.json")  # from an earlier start of the driver
  if os.path.exists(stale):
    os.remove(stale)
  run = convergence_report.load_run(workdir)
  figures = dict(
    steps="steps",
    tokens="tokens",
    tokens_per_sec="tokens_per_sec",
    peak_memory_gb="peak_gb",
    final_eval_step="final_step",
    final_val_perplexity="final_ppl",
  )
  return dict(result, **{k: run[v] for k, v in figures.items() if run[v] is not None})


def channel_usage(workdirs_gpus: list[tuple[str, str]], batches: int) -> None:
  """Channel usage of finished MoC runs, in parallel on their GPUs (failures are only logged)."""
  procs = []
  for workdir, gpu in workdirs_gpus:
    cmd = [sys.executable, "-m", "moc_jax.channel_usage", f"--workdir={workdir}"]
    cmd += [f"--batches={batches}", f"--out={os.path.join(workdir, 'channel_usage.json')}"]
    log = open(os.path.join(workdir, "log.txt"), "a")  # noqa: SIM115
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu)
    procs.append((workdir, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), log))
  for workdir, proc, log in procs:
    rc = proc.wait()
    log.close()
    print(f"[{_now()}] channel usage of {os.path.basename(workdir)}: exit {rc}", flush=True)


def write_run_info(workroot: str) -> None:
  """Date, commit, GPUs, jax version and command line (jax is not imported here: it would take
  memory on every GPU)."""
  commit = (
    os.environ.get("GIT_COMMIT")
    or subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
  )
  try:
    gpus = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False)
  except FileNotFoundError:  # no NVIDIA driver here
    gpus = subprocess.CompletedProcess([], 1, "", "")
  info = dict(
    date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    commit=commit or "unknown",
    gpus=gpus.stdout.strip().splitlines() if gpus.returncode == 0 else [],
    command=" ".join(sys.argv),
    jax=metadata.version("jax"),  # the installed version, read without importing jax
  )
  with open(os.path.join(workroot, "run_info.json"), "w") as f:
    json.dump(info, f, indent=1)


def bundle(workroot: str, names: list[str], path: str) -> None:
  with tarfile.open(path, "w:gz") as tar:
    tar.add(os.path.join(workroot, "run_info.json"), arcname="run_info.json")
    for name in names:
      for f in SMALL_FILES:
        p = os.path.join(workroot, name, f)
        if os.path.exists(p):
          tar.add(p, arcname=os.path.join(name, f))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gpus", default="0", help="comma-separated GPU ids, one run per GPU")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--workroot", default="runs/convergence")
  p.add_argument("--config", default=CONFIG)
  p.add_argument("--override", action="append", default=[], help="extra a.b=v config override")
  p.add_argument("--deadline_s", type=float, default=3600.0)
  p.add_argument("--usage_batches", type=int, default=8)
  p.add_argument("--bundle", default="", help="write a .tar.gz of the small result files here")
  args = p.parse_args(argv)
  args.gpus, args.variants = args.gpus.split(","), args.variants.split(",")
  unknown = [v for v in args.variants if v not in VARIANTS]
  if unknown:
    sys.exit(f"error: unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
  os.makedirs(args.workroot, exist_ok=True)
  write_run_info(args.workroot)
  results = schedule(args)
  moc_runs = [
    (os.path.join(args.workroot, name), r["gpu"])
    for name, r in results.items()
    if r.get("returncode") == 0 and VARIANTS[name]["model.ffn"] != "dense"
  ]
  channel_usage(moc_runs, args.usage_batches)
  for name, result in results.items():
    workdir = os.path.join(args.workroot, name)
    if not result.get("not_started"):
      summary = summarize(workdir, dict(result, variant=name, overrides=VARIANTS[name]))
      with open(os.path.join(workdir, "run_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
      print(json.dumps(summary), flush=True)
  if args.bundle:
    bundle(args.workroot, list(results), args.bundle)
  return 0 if all(r.get("returncode") in (0, None) for r in results.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
