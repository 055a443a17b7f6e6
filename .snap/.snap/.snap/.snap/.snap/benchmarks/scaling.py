"""Multi-GPU weak scaling of the train step: tokens/s per GPU, step time, MFU and peak memory
per GPU for presets × FFN variants on 1, 2 and 4 GPUs, with a fixed batch per GPU.

  python benchmarks/scaling.py --out=benchmarks/results/scaling.json   # 4 GPUs: 1b, 350m
  python benchmarks/scaling.py --dry_run                                # CPU: whole schedule

Each configuration runs in its own process, so its peak memory is its own, on its own GPU
subset (CUDA_VISIBLE_DEVICES), through train.py's path: the plain single-device step on one
GPU; sharding.mesh_from_config, init_sharded, put_global_batch, use_mesh and
train_lib.make_train_step on a mesh (random tokens, no document mask, like model_step.py).
Meshes (--meshes): data=n and fsdp=n on n GPUs (fsdp gives the memory figure); the faster is the
"best mesh". Scaling efficiency = tokens/s per GPU at n GPUs / tokens/s at 1 GPU.

The parent keeps the GPUs busy in waves: 1-GPU configurations side by side on GPUs 0..3,
2-GPU ones on (0,1) and (2,3), then 4-GPU ones one at a time. It stops launching after
--max_seconds (recording what did not run), kills a child after --child_timeout, and rewrites
--out after every child, so a cut-short run still leaves its JSON. The parent never touches a
device itself: jax would preallocate memory on every GPU. --xla_flags goes to every child, so
two runs in one call compare XLA settings side by side (the latency-hiding scheduler, say).

--dry_run runs the same schedule on CPU with the tiny preset and a small batch; a "GPU
subset" of n becomes n virtual CPU devices (XLA_FLAGS) in the child, so the child takes the
same mesh_from_config path with jax.device_count() == n as on GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from importlib import metadata
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from benchmarks.scaling_child import VARIANTS, say  # noqa: E402

CHILD = os.path.join(ROOT, "benchmarks", "scaling_child.py")

DRY_RUN = dict(presets="tiny", batch_per_gpu=2, seq=32, vocab=256, steps=3, warmup=1)
GPU_RUN = dict(presets="1b,350m", batch_per_gpu=64, seq=256, vocab=32000, steps=10, warmup=3)
SPEC_ARGS = ("batch_per_gpu", "seq", "vocab", "steps", "warmup", "backend", "attention")
# Cheap XLA:CPU compiles for the dry run (as tests/_multidevice_steps.py).
FAST_CPU_FLAGS = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"


MESHES = {"data": lambda n: (n, 1, 1), "fsdp": lambda n: (1, n, 1)}


def meshes_for(n: int, names: list[str]) -> list[tuple[str, tuple[int, int, int]]]:
  """1 GPU: the plain path; n GPUs: each named mesh (data=n, fsdp=n) in that order."""
  if n == 1:
    return [("single", (1, 1, 1))]
  return [(name, MESHES[name](n)) for name in names]


def make_configs(args) -> list[dict[str, Any]]:
  """Ordered by GPU count, then mesh, then --presets order: a run cut short by --max_seconds
  loses the last ones (4-GPU fsdp of the last preset) first."""
  shared = {k: getattr(args, k) for k in SPEC_ARGS}
  out = []
  for n in args.gpu_counts:
    for order, (mesh_name, mesh) in enumerate(meshes_for(n, args.meshes)):
      for preset in args.presets:
        for variant in args.variants:
          tag = f"{preset}_{variant}_{n}gpu_{mesh_name}"
          c = dict(tag=tag, preset=preset, variant=variant, n_gpus=n, mesh_name=mesh_name)
          out.append({**c, "mesh": list(mesh), "order": order, **shared})
  return sorted(out, key=lambda c: (c["n_gpus"], c["order"]))


def slots_for(n: int, num_gpus: int) -> list[tuple[int, ...]]:
  """Disjoint GPU subsets of size n: (0,), (1,), ... or (0, 1), (2, 3), or (0, 1, 2, 3)."""
  return [tuple(range(i, i + n)) for i in range(0, num_gpus - n + 1, n)]


def child_env(slot: tuple[int, ...], dry_run: bool, extra_flags: str = "") -> dict[str, str]:
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
  ids = [visible[i] if i < len(visible) else str(i) for i in slot]  # respect an outer mask
  env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
  if extra_flags:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {extra_flags}".strip()
  if dry_run:
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    flags += [f"--xla_force_host_platform_device_count={len(slot)}", FAST_CPU_FLAGS]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
  return env


def _tail(path: str, chars: int = 3000) -> str:
  try:
    with open(path, errors="replace") as fh:
      return fh.read()[-chars:]
  except OSError:
    return ""


def run_waves(configs: list[dict], args, on_record) -> list[dict]:
  """Launch each configuration on a free GPU subset of its size, one wave per size."""
  t_begin = time.monotonic()
  records: list[dict] = []

  def finish(rec: dict) -> None:
    records.append(rec)
    on_record(records)

  for n in sorted({c["n_gpus"] for c in configs}):
    queue = [c for c in configs if c["n_gpus"] == n]
    free = slots_for(n, args.num_gpus)
    if not free:
      for c in queue:
        finish({**c, "status": "not_run", "error": f"needs {n} GPUs, have {args.num_gpus}"})
      continue
    running: list[tuple[subprocess.Popen, dict, float, str]] = []
    try:
      while queue or running:
        out_of_time = time.monotonic() - t_begin >= args.max_seconds
        while queue and free and not out_of_time:
          c = {**queue.pop(0), "gpus": list(free.pop(0))}
          spec_path = os.path.join(args.log_dir, c["tag"] + ".json")
          log_path = os.path.join(args.log_dir, c["tag"] + ".log")
          cmd = [sys.executable, CHILD, json.dumps(c), spec_path]
          with open(log_path, "w") as log:
            proc = subprocess.Popen(
              cmd,
              stdout=log,
              stderr=subprocess.STDOUT,
              env=child_env(tuple(c["gpus"]), args.dry_run, args.xla_flags),
              cwd=ROOT,
              start_new_session=True,  # its own process group: a timeout kills it whole
            )
          say(f"launch {c['tag']} on GPUs {c['gpus']} (log {log_path})")
          running.append((proc, c, time.monotonic(), spec_path))
        if out_of_time and queue:
          for c in queue:
            finish({**c, "status": "not_run", "error": "wall budget --max_seconds spent"})
          say(f"budget spent: {len(queue)} configurations of {n} GPU(s) not launched")
          queue = []
        for item in list(running):
          proc, c, t_launch, spec_path = item
          timed_out = time.monotonic() - t_launch > args.child_timeout
          if proc.poll() is None and not timed_out:
            continue
          if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
          running.remove(item)
          free.append(tuple(c["gpus"]))
          free.sort()
          finish(_collect(c, proc.returncode, timed_out, spec_path, time.monotonic() - t_launch))
        time.sleep(0.2)
    finally:
      for proc, *_ in running:  # an exception or Ctrl-C in the parent: leave no orphans
        if proc.poll() is None:
          os.killpg(proc.pid, signal.SIGKILL)
  return records


def _collect(c: dict, rc: int, timed_out: bool, spec_path: str, wall: float) -> dict:
  log_path = spec_path[: -len(".json")] + ".log"
  rec = None
  if rc == 0 and os.path.exists(spec_path):
    with open(spec_path) as fh:
      rec = json.load(fh)
  if rec is None:
    why = f"timed out after {wall:.0f} s" if timed_out else f"exit code {rc}"
    rec = {**c, "status": "timeout" if timed_out else "failed", "error": why}
    rec["log_tail"] = _tail(log_path)
    say(f"FAILED {c['tag']}: {why}\n{rec['log_tail'][-1500:]}")
  else:
    say(
      f"done {c['tag']}: {rec['step_ms_median']:.1f} ms/step, "
      f"{rec['tokens_per_s_per_gpu']:,.0f} tok/s/GPU, peak {_fmt(rec['peak_gb_per_gpu'])} GB"
      f"/GPU, compile {rec['compile_s']:.1f} s"
    )
  rec["wall_s"] = wall
  rec.pop("order", None)
  return rec


def efficiency(records: list[dict]) -> list[dict]:
  """Per (preset, variant, GPUs): tokens/s per GPU and efficiency on each mesh, the best mesh."""
  ok = [r for r in records if r.get("status") == "ok"]
  base = {(r["preset"], r["variant"]): r["tokens_per_s_per_gpu"] for r in ok if r["n_gpus"] == 1}
  groups: dict[tuple, list[dict]] = {}
  for r in ok:
    groups.setdefault((r["preset"], r["variant"], r["n_gpus"]), []).append(r)
  rows = []
  for (preset, variant, n), rs in groups.items():
    one = base.get((preset, variant))
    eff = lambda r, one=one: r["tokens_per_s_per_gpu"] / one if one else None
    best = max(rs, key=lambda r: r["tokens_per_s_per_gpu"])
    rows.append(
      {
        "preset": preset,
        "variant": variant,
        "n_gpus": n,
        "best_mesh": best["mesh_name"],
        "tokens_per_s_per_gpu": best["tokens_per_s_per_gpu"],
        "efficiency": eff(best),
        "efficiency_by_mesh": {r["mesh_name"]: eff(r) for r in rs},
        "peak_gb_per_gpu_by_mesh": {r["mesh_name"]: r["peak_gb_per_gpu"] for r in rs},
      }
    )
  return rows


def _fmt(x: float | None, spec: str = ".1f") -> str:
  return "-" if x is None else format(x, spec)


def markdown(records: list[dict], eff_rows: list[dict]) -> str:
  effs = {(e["preset"], e["variant"], e["n_gpus"]): e for e in eff_rows}
  lines = [
    "| preset | variant | GPUs | mesh | step ms | tokens/s/GPU | efficiency | MFU "
    "| peak GB/GPU | compile s |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in records:
    head = f"| {r['preset']} | {r['variant']} | {r['n_gpus']} | {r['mesh_name']} |"
    if r.get("status") != "ok":
      lines.append(f"{head} {r.get('status')}: {r.get('error', '')} | | | | | |")
      continue
    e = effs[(r["preset"], r["variant"], r["n_gpus"])]["efficiency_by_mesh"][r["mesh_name"]]
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    lines.append(
      f"{head} {r['step_ms_median']:.1f} | {r['tokens_per_s_per_gpu']:,.0f} | {_fmt(e, '.3f')} "
      f"| {mfu} | {_fmt(r['peak_gb_per_gpu'])} | {r['compile_s']:.1f} |"
    )
  lines += ["", "| preset | variant | GPUs | best mesh | tokens/s/GPU | efficiency |"]
  lines.append("|---|---|---|---|---|---|")
  for e in sorted(eff_rows, key=lambda e: (e["preset"], e["variant"], e["n_gpus"])):
    lines.append(
      f"| {e['preset']} | {e['variant']} | {e['n_gpus']} | {e['best_mesh']} "
      f"| {e['tokens_per_s_per_gpu']:,.0f} | {_fmt(e['efficiency'], '.3f')} |"
    )
  return "\n".join(lines)


def run_info(records: list[dict], args, started: str) -> dict:
  """The first successful child's run_info (the parent never touches a device)."""
  info = next((dict(r["info"]) for r in records if r.get("status") == "ok"), None)
  if info is None:
    info = {"device": "unknown", "jax": metadata.version("jax"), "python": sys.version.split()[0]}
  info.update(date=started, num_devices=args.num_gpus, dry_run=args.dry_run)
  info.update(xla_flags=f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip())
  return info


def default_out(info: dict, started: str) -> str:
  device = "cpu" if info.get("platform") == "cpu" else str(info["device"]).split()[-1].lower()
  day = started[:10].replace("-", "")
  return os.path.join(ROOT, "benchmarks", "results", f"scaling_{device}_{day}.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--presets", help=f"in priority order (default {GPU_RUN['presets']})")
  p.add_argument("--variants", default="dense,moc", help=f"of {', '.join(VARIANTS)}")
  p.add_argument("--gpu_counts", default="1,2,4")
  p.add_argument("--meshes", default="data,fsdp", help=f"for n > 1 GPUs, of {', '.join(MESHES)}")
  p.add_argument("--xla_flags", default="", help="appended to the children's XLA_FLAGS")
  p.add_argument("--num_gpus", type=int, default=4, help="GPUs on the machine (0..n-1)")
  p.add_argument("--batch_per_gpu", type=int, help="sequences per GPU (default 64)")
  p.add_argument("--seq", type=int, help="tokens per sequence (default 256)")
  p.add_argument("--vocab", type=int, help="vocabulary (default 32000)")
  p.add_argument("--steps", type=int, help="timed steps (default 10)")
  p.add_argument("--warmup", type=int, help="untimed steps after compile (default 3)")
  p.add_argument("--backend", default="auto", help="MoC kernel backend: auto | xla | pallas")
  p.add_argument("--attention", default="auto", help="auto | xla | cudnn")
  p.add_argument("--max_seconds", type=float, default=420, help="stop launching after this")
  p.add_argument("--child_timeout", type=float, help="kill a child after (default 120 s)")
  p.add_argument("--out", help="JSON (default benchmarks/results/scaling_<device>_<date>.json)")
  p.add_argument("--log_dir", help="child logs and records (default: next to --out)")
  p.add_argument("--dry_run", action="store_true", help="CPU: tiny preset, virtual devices")
  p.add_argument(
    "--previous",
    default="",
    help="comma-separated JSONs of earlier runs (same settings) whose ok records join the tables",
  )
  args = p.parse_args(argv)
  defaults = DRY_RUN if args.dry_run else GPU_RUN
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if args.child_timeout is None:
    args.child_timeout = 600 if args.dry_run else 120
  args.presets = args.presets.split(",")
  args.variants = args.variants.split(",")
  unknown = set(args.variants) - set(VARIANTS)
  if unknown:
    p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
  args.gpu_counts = [int(x) for x in args.gpu_counts.split(",")]
  args.meshes = args.meshes.split(",")
  if set(args.meshes) - set(MESHES):
    p.error(f"unknown meshes {args.meshes}; choose from {', '.join(MESHES)}")
  return args


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
  stamp = started[:19].replace(":", "").replace("-", "")
  if args.log_dir is None:
    base = args.out[: -len(".json")] if args.out and args.out.endswith(".json") else args.out
    args.log_dir = f"{base}_logs" if base else os.path.join("/tmp", f"moc_scaling_{stamp}")
  os.makedirs(args.log_dir, exist_ok=True)
  configs = make_configs(args)
  say(f"{len(configs)} configurations on {args.num_gpus} GPUs; logs in {args.log_dir}")

  def payload(records: list[dict]) -> tuple[str, dict]:
    info = run_info(records, args, started)
    out = args.out or default_out(info, started)
    eff = efficiency(records)
    return out, {"info": info, "args": vars(args), "records": records, "efficiency": eff}

  def on_record(records: list[dict]) -> None:
    if args.out or any(r.get("status") == "ok" for r in records):
      _write(*payload(records))

  earlier = previous_records(args.previous)
  records = earlier + run_waves(configs, args, lambda rs: on_record(earlier + rs))
  out, result = payload(records)
  _write(out, result)
  say("\n" + markdown(records, result["efficiency"]) + f"\n\nwritten: {out}")
  return result


def previous_records(paths: str) -> list[dict]:
  """The ok records of earlier runs, e.g. the 1-GPU baseline when only 2 and 4 GPUs run now."""
  records = []
  for path in filter(None, paths.split(",")):
    with open(path) as fh:
      records += [
        dict(r, previous=path) for r in json.load(fh)["records"] if r.get("status") == "ok"
      ]
  return records


def _write(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as fh:
    json.dump(payload, fh, indent=1, default=str)
  os.replace(tmp, path)  # a reader (or a kill) never sees half a file


if __name__ == "__main__":
  main()
