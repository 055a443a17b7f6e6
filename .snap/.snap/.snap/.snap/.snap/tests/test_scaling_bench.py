"""benchmarks/scaling.py: the wave schedule, the budget cut-off, the efficiency table, and one
real dry-run child (a 2-device data mesh of virtual CPU devices) end to end."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import scaling  # noqa: E402


def test_waves_use_disjoint_gpu_subsets():
  assert scaling.slots_for(1, 4) == [(0,), (1,), (2,), (3,)]
  assert scaling.slots_for(2, 4) == [(0, 1), (2, 3)]
  assert scaling.slots_for(4, 4) == [(0, 1, 2, 3)]
  assert scaling.slots_for(4, 2) == []
  args = scaling.parse_args([])
  configs = scaling.make_configs(args)
  assert [c["n_gpus"] for c in configs] == [1] * 4 + [2] * 8 + [4] * 8
  four = [(c["preset"], c["variant"], c["mesh_name"]) for c in configs if c["n_gpus"] == 4]
  assert [m for *_, m in four] == ["data"] * 4 + ["fsdp"] * 4  # data first: a cut loses fsdp first
  assert {c["mesh_name"]: c["mesh"] for c in configs if c["n_gpus"] == 4} == {
    "data": [4, 1, 1],
    "fsdp": [1, 4, 1],
  }
  assert (args.batch_per_gpu, args.seq, args.vocab) == (64, 256, 32000)


def test_child_env_maps_subsets(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  env = scaling.child_env((2, 3), dry_run=True)
  assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and env["JAX_PLATFORMS"] == "cpu"
  assert "device_count=2" in env["XLA_FLAGS"] and "device_count=8" not in env["XLA_FLAGS"]
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # an outer mask is respected
  assert scaling.child_env((2, 3), dry_run=False)["CUDA_VISIBLE_DEVICES"] == "6,7"
  env = scaling.child_env((0,), dry_run=False, extra_flags="--xla_gpu_foo=true")
  assert env["XLA_FLAGS"].endswith("--xla_gpu_foo=true") and "device_count=8" in env["XLA_FLAGS"]
  only_data = scaling.make_configs(scaling.parse_args(["--meshes=data", "--gpu_counts=1,2"]))
  assert [c["mesh_name"] for c in only_data] == ["single"] * 4 + ["data"] * 4


def test_spent_budget_launches_nothing(tmp_path):
  out = tmp_path / "s.json"
  result = scaling.main(["--dry_run", "--max_seconds=0", f"--out={out}"])
  assert {r["status"] for r in result["records"]} == {"not_run"}
  assert len(json.loads(out.read_text())["records"]) == 10  # tiny × 2 variants × (1 + 2 + 2) meshes


@pytest.mark.slow  # ~10 s: two child processes import jax and fail
def test_failing_and_hanging_children_are_recorded_and_the_rest_go_on(tmp_path):
  # "nope" fails in the child (unknown preset) on 1 and then on 2 devices: both are recorded.
  argv = ["--dry_run", "--presets=nope", "--variants=dense", "--gpu_counts=1,2", "--meshes=data"]
  result = scaling.main([*argv, f"--out={tmp_path / 'f.json'}"])
  assert [r["status"] for r in result["records"]] == ["failed", "failed"]
  assert all("nope" in r["log_tail"] for r in result["records"])
  argv = ["--dry_run", "--variants=dense", "--gpu_counts=1", "--child_timeout=0.5"]
  result = scaling.main([*argv, f"--out={tmp_path / 't.json'}"])
  assert [r["status"] for r in result["records"]] == ["timeout"]


def test_efficiency_picks_the_faster_mesh():
  rec = lambda n, mesh, tps: dict(
    status="ok",
    preset="1b",
    variant="moc",
    n_gpus=n,
    mesh_name=mesh,
    tokens_per_s_per_gpu=tps,
    peak_gb_per_gpu=1.0,
  )
  rows = scaling.efficiency([rec(1, "single", 100.0), rec(4, "data", 90.0), rec(4, "fsdp", 80.0)])
  four = next(r for r in rows if r["n_gpus"] == 4)
  assert four["best_mesh"] == "data" and four["efficiency"] == pytest.approx(0.9)
  assert four["efficiency_by_mesh"]["fsdp"] == pytest.approx(0.8)


@pytest.mark.slow  # ~30 s on 2 idle cores: one child imports jax and compiles the tiny model
def test_dry_run_two_device_child(tmp_path):
  out = tmp_path / "scaling.json"
  argv = ["--dry_run", "--variants=moc", "--gpu_counts=2", "--meshes=fsdp", f"--out={out}"]
  result = scaling.main([*argv, "--child_timeout=240"])
  (r,) = json.loads(out.read_text())["records"]
  assert r["status"] == "ok", r.get("log_tail")
  assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1} and r["gpus"] == [0, 1]
  assert math.isfinite(r["tokens_per_s_per_gpu"]) and r["tokens_per_s_per_gpu"] > 0
  assert r["tokens_per_s"] == pytest.approx(2 * r["tokens_per_s_per_gpu"])
  assert r["global_batch"] == 2 * r["batch_per_gpu"] and math.isfinite(r["loss"])
  assert r["compile_s"] > 0 and len(r["step_ms_all"]) == 3
  assert result["info"]["platform"] == "cpu"
  assert os.path.exists(out.parent / "scaling_logs" / "tiny_moc_2gpu_fsdp.log")
