"""Multi-process runs on localhost (CPU, gloo): a real two-process jax.distributed training
job, and a killed process that must make the other one fail fast with a clear error."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import pytest

from moc_jax import distributed
from moc_jax.model_config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "_multidevice_distributed.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(mode: str, nproc: int, tmp_path, *extra: str) -> list[tuple[subprocess.Popen, str]]:
  port = str(_free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  procs = []
  for pid in range(nproc):
    log = str(tmp_path / f"{mode}{pid}.log")
    with open(log, "w") as f:
      cmd = [sys.executable, WORKER, mode, str(pid), str(nproc), port, *extra]
      procs.append(
        (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env), log)
      )
  return procs


def _read(log: str) -> str:
  with open(log) as f:
    return f.read()


def _stop(procs) -> None:
  for p, _ in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def test_two_process_training_matches_one_device(tmp_path):
  procs = _launch("train", 2, tmp_path, str(tmp_path / "ckpt"))
  try:
    for p, log in procs:
      assert p.wait(timeout=400) == 0, _read(log)[-4000:]
  finally:
    _stop(procs)
  results = []
  for _, log in procs:
    line = [x for x in _read(log).splitlines() if x.startswith("RESULT ")][-1]
    results.append(json.loads(line.removeprefix("RESULT ")))
  assert [r["process"] for r in results] == [0, 1]
  losses0, losses1 = results[0]["losses"], results[1]["losses"]
  assert losses0 == losses1  # one global program: both processes see the same metrics
  assert losses0[2] is True  # Orbax save + restore across both processes, bit-exact
  assert all(r["data_state_ok"] for r in results)  # per-process data positions round-trip
  for got, want in zip(losses0[:2], results[0]["single_device"], strict=True):
    assert abs(got - want) < 1e-5


@pytest.mark.parametrize("victim_id", [1, 0], ids=["worker_dies", "coordinator_dies"])
def test_killed_process_makes_the_survivor_fail_fast(tmp_path, victim_id):
  procs = _launch("hang", 2, tmp_path)
  (victim, log1), (survivor, log0) = procs[victim_id], procs[1 - victim_id]
  try:
    deadline = time.time() + 300
    while not all("READY" in _read(log) for _, log in procs):
      assert time.time() < deadline, _read(log0)[-2000:] + _read(log1)[-2000:]
      assert survivor.poll() is None and victim.poll() is None, _read(log0) + _read(log1)
      time.sleep(0.5)
    time.sleep(1.0)  # both are now compiling or inside a step's collectives
    victim.send_signal(signal.SIGKILL)
    killed_at = time.time()
    rc = survivor.wait(timeout=120)  # heartbeat timeout is 5 s in the worker
    waited = time.time() - killed_at
  finally:
    _stop(procs)
  out = _read(log0)
  assert rc != 0, out[-3000:]
  assert waited < 60, f"survivor took {waited:.0f} s to fail"
  # worker dies: "... unhealthy (stopped sending heartbeats)"; coordinator dies: RPC fails.
  assert "another task died" in out, out[-3000:]


def _dist(**kw) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(
    dict(
      initialize="auto",
      coordinator_address=None,
      num_processes=None,
      process_id=None,
      local_device_ids=None,
      initialization_timeout=300,
      heartbeat_timeout=100,
      shutdown_timeout=300,
    )
  )
  c.update(kw)
  return c


@pytest.mark.parametrize(
  ("env", "kw", "want"),
  [
    ({}, {}, False),
    ({"SLURM_NTASKS": "4"}, {}, True),
    ({"SLURM_NTASKS": "1"}, {}, False),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}, True),
    ({}, {"coordinator_address": "host:1234"}, True),
    ({"SLURM_NTASKS": "4"}, {"initialize": "no"}, False),
    ({}, {"initialize": "yes"}, True),
  ],
)
def test_when_to_initialize(monkeypatch, env, kw, want):
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert distributed.wanted(_dist(**kw)) is want


def test_bad_mode_and_kwargs():
  with pytest.raises(ConfigError, match=r"distributed\.initialize"):
    distributed.wanted(_dist(initialize="maybe"))
  kw = distributed.initialize_kwargs(_dist(num_processes=2, process_id=1, heartbeat_timeout=7))
  assert kw["num_processes"] == 2 and kw["process_id"] == 1 and "coordinator_address" not in kw
  assert kw.get("heartbeat_timeout_seconds", 7) == 7


def test_slurm_one_task_per_node_gets_all_gpus(monkeypatch):
  monkeypatch.setenv("SLURM_JOB_ID", "7")
  monkeypatch.setenv("SLURM_TASKS_PER_NODE", "1(x4)")
  monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")
  assert distributed.initialize_kwargs(_dist())["local_device_ids"] == list(range(8))
  monkeypatch.setenv("SLURM_TASKS_PER_NODE", "8(x4)")
  assert "local_device_ids" not in distributed.initialize_kwargs(_dist())
  kw = distributed.initialize_kwargs(_dist(local_device_ids="2,3"))
  assert kw["local_device_ids"] == [2, 3]
