"""One short GPU session (<= 4.5 min on one H200) for the top-K kernel variants.

Why one script: device time comes in single short slots. In order of value, each section
skipped when the time budget is spent (results are written after every section, a
watchdog writes them and exits at budget + grace, and a failing section or diagnostic is
recorded in the JSON, never fatal):

1. sweep at 16384 x 5632, K=1024: every `topk_variants.SWEEP` config, exact vs the
   reference (random rows, and 512 heavy-tie rows), median time; baselines: an XLA copy
   (read + write G), an XLA one-read row max, lax.top_k;
2. `topk.default_config(F)` and the fastest exact variant at 16384 x {1376, 2048, 2736, 5461, 5632,
   11008} (exactness incl. ties and all-equal rows) with lax.top_k and the read floor;
3. the 2:8 kernel and the train forward epilogue (1B shape) with the fastest variant;
4. FFN layer fwd and fwd+bwd, dense vs MoC pallas (with the fastest forward epilogue of 3).

Registers, occupancy and stall reasons come from Nsight Compute instead
(benchmarks/kernel_profile.sh): on jax 0.11 XLA compiles the Triton IR itself and its dumps
held no PTX for these kernels (2026-12-01).

  python3 benchmarks/topk_gpu_session.py OUT_DIR [--budget=230] [--only=REGEX]
  python3 benchmarks/topk_gpu_session.py OUT_DIR --dry_run   # CPU: tiny sizes, interpret

OUT_DIR gets topk_gpu_session.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, topk_variants
from moc_jax import compile_options
from pallas_kernels import moc_train, reference, topk

T = 16384
SWEEP_FK = (5632, 1024)
SHAPES = ((1376, 256), (2048, 384), (2736, 512), (5461, 1024), (5632, 1024), (11008, 2048))
GROUP_F = 5632  # 2:8 rows
EPILOGUE = (5504, 1024, 5461)  # F (padded), K, num_valid: the 1B shape
FFN_SHAPES = ((2048, 5461, 1024), (512, 1376, 256))  # (d, F, K)
TIMING = {"inner": 5, "trials": 5}
# --dry_run: every code path on CPU (interpret mode) in a few minutes.
DRY = {
  "T": 16,
  "SWEEP_FK": (304, 40),
  "SHAPES": ((304, 40), (520, 96)),
  "GROUP_F": 304,
  "EPILOGUE": (320, 40, 300),
  "FFN_SHAPES": ((64, 304, 40),),
  "TIMING": {"inner": 1, "trials": 1, "warmup": 1},
}
# Seconds that must be left to start a section (the sweep stops at SWEEP_RESERVE).
SWEEP_RESERVE, SHAPES_NEED, EPI_NEED, FFN_NEED, FFN_STOP = 110, 70, 50, 45, 20

T0 = time.time()
RES: dict = {"errors": [], "sections": []}
OUT_JSON = ""
SAVE_LOCK = threading.Lock()


def elapsed() -> float:
  return round(time.time() - T0, 1)


def left() -> float:
  return ARGS.budget - (time.time() - T0)


def save() -> None:
  """Write RES; never raises (the watchdog thread also calls it)."""
  with SAVE_LOCK:
    for _ in range(3):  # the main thread may be changing RES meanwhile
      try:
        common.write_json(OUT_JSON, {**RES, "elapsed_s": elapsed()})
        return
      except Exception as e:  # a failed write must not end the run
        err = e
    print(f"  [save] failed: {type(err).__name__}: {err}", flush=True)


def error(step: str, e: BaseException) -> str:
  msg = f"{type(e).__name__}: {str(e)[:400]}"
  RES["errors"].append({"step": step, "error": msg, "at_s": elapsed()})
  print(f"  [{step}] failed: {msg}", flush=True)
  return msg


def guarded(step: str, fn, *args, default=None, **kw):
  """An optional step: a failure is recorded in RES['errors'] and gives `default`."""
  try:
    return fn(*args, **kw)
  except Exception as e:  # diagnostics must never block the timings
    error(step, e)
    return default


def section(name: str, need: float, fn, *args):
  """Run one section if `need` seconds are left; record its status and time; save."""
  rec: dict = {"name": name, "start_s": elapsed()}
  RES["sections"].append(rec)
  if left() < need:
    rec["status"] = f"skipped: {left():.0f} s left < {need} s"
    print(f"== {name}: {rec['status']}", flush=True)
    save()
    return None
  print(f"== {name} (at {rec['start_s']} s, {left():.0f} s left)", flush=True)
  out = None
  try:
    out = fn(*args)
    rec["status"] = "done"
  except Exception as e:  # a later section may still run
    rec["status"] = "failed: " + error(name, e)
    traceback.print_exc(limit=6)
  rec["s"] = round(elapsed() - rec["start_s"], 1)
  save()
  return out


def _watchdog() -> None:
  RES["watchdog"] = f"hard stop at {elapsed()} s (budget {ARGS.budget} + grace {ARGS.grace})"
  print(f"\n!! {RES['watchdog']}: results so far are in {OUT_JSON}", flush=True)
  save()
  guarded("summary", summary, RES)
  os._exit(0)


# ---------------------------------------------------------------- measurements


def _same(a, b) -> bool:
  return bool(np.array_equal(np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32)))


def exact(fn, k: int, f: int) -> bool:
  """Random rows, 512 heavy-tie rows, all-equal rows: indices and values as the reference."""
  g = jax.random.normal(jax.random.PRNGKey(f + 1), (T, f), jnp.float32).astype(jnp.bfloat16)
  gt = jax.random.randint(jax.random.PRNGKey(f + 2), (min(T, 512), f), -3, 4)
  gt = gt.astype(jnp.bfloat16)
  gt = gt.at[:8].set(0.5).at[8:16].set(-0.0)
  for x in (g, gt):
    idx, val = fn(x)
    ri, rv = reference.select(x, k, "moc")
    if not (_same(idx, ri) and _same(val, rv)):
      return False
  return True


def timed(fn, sets) -> float | None:
  try:
    return common.time_fn(fn, arg_sets=sets, **TIMING)["median_us"]
  except Exception as e:  # a variant that fails is reported, not fatal
    print(f"  failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    return None


def inputs(f: int) -> list[tuple[jax.Array]]:
  keys = jax.random.split(jax.random.PRNGKey(1000 + f), 2)
  return [(jax.random.normal(k_, (T, f), jnp.float32).astype(jnp.bfloat16),) for k_ in keys]


def run_variant(name, cfg, f, k, sets, check=True) -> dict:
  row: dict = {"name": name, "F": f, "config": str(cfg)}
  try:
    fn = jax.jit(lambda g: topk.select(g, k, "moc", config=cfg))
    t_c = time.time()
    jax.block_until_ready(fn(sets[0][0]))
    row["compile_s"] = round(time.time() - t_c, 1)
    row["exact"] = exact(fn, k, f) if check and not cfg.ablate else None
  except Exception as e:  # the next variant still runs
    row["error"] = error(name, e)
    return row
  row["us"] = timed(fn, sets)
  print(f"{name:28s} exact={row['exact']} us={common.fmt(row['us'])}", flush=True)
  return row


def sweep() -> None:
  f, k = SWEEP_FK
  sets = inputs(f)
  base = {
    "xla_copy": jax.jit(lambda g: g + jnp.bfloat16(1)),
    "xla_read_max": jax.jit(lambda g: jnp.max(g, axis=-1)),
    "lax_top_k": jax.jit(lambda g: jax.lax.top_k(g, k)),
  }
  RES["baselines"] = {n: timed(fn, sets) for n, fn in base.items()}
  print("baselines", {n: common.fmt(v) for n, v in RES["baselines"].items()}, flush=True)
  save()
  RES["sweep"] = []
  for name, cfg in topk_variants.SWEEP.items():
    if not re.search(ARGS.only, name):
      continue
    if left() < SWEEP_RESERVE:
      RES["sweep_stopped_before"] = name
      print(f"budget: sweep stopped before {name}", flush=True)
      break
    RES["sweep"].append(run_variant(name, cfg, f, k, sets))
    save()


def pick_best() -> topk.TopKConfig:
  ok = [r for r in RES.get("sweep", []) if r.get("exact") and r.get("us")]
  best = min(ok, key=lambda r: r["us"]) if ok else None
  RES["best"] = best and best["name"]
  print("best:", RES["best"], best and common.fmt(best["us"]), flush=True)
  return topk_variants.SWEEP[best["name"]] if best else topk.ONE_BLOCK


def shapes(best_cfg) -> None:
  RES["shapes"] = []
  for f_, k_ in SHAPES[: ARGS.shapes]:
    if left() < SHAPES_NEED:
      break
    sets_ = inputs(f_)
    row = {"F": f_, "K": k_}
    default = topk.default_config(f_)
    for label, cfg in (("default", default), ("best", best_cfg)):
      if label == "best" and best_cfg == default:
        continue
      r = run_variant(f"{label}@{f_}", cfg, f_, k_, sets_)
      row[f"{label}_us"], row[f"{label}_exact"] = r.get("us"), r.get("exact")
    row["lax_top_k_us"] = timed(jax.jit(lambda g, k_=k_: jax.lax.top_k(g, k_)), sets_)
    row["read_max_us"] = timed(jax.jit(lambda g: jnp.max(g, axis=-1)), sets_)
    RES["shapes"].append(row)
    print(row, flush=True)
    save()


def grouped() -> dict:
  sets = inputs(GROUP_F)
  out = RES["2of8"] = {}
  for rows in (1, 2, 4):
    cfg = topk.TopKConfig(rows=rows)
    fn = jax.jit(lambda g, cfg=cfg: topk.select(g, 0, "moc_2of8", config=cfg))
    try:
      i1, v1 = fn(sets[0][0])
      i2, v2 = reference.select(sets[0][0], 0, "moc_2of8")
      out[f"rows{rows}"] = {"exact": _same(i1, i2) and _same(v1, v2), "us": timed(fn, sets)}
    except Exception as e:
      out[f"rows{rows}"] = {"error": error(f"2of8 rows{rows}", e)}
  print("2of8", out, flush=True)
  return out


def forward_epilogue() -> topk.TopKConfig:
  """Every `topk_variants.EPILOGUE` config; returns the fastest exact one.

  Split configs also time their first kernel (the selection bitmask) alone."""
  from pallas_kernels import topk_compact

  f, k, nv = EPILOGUE
  sets = []
  for s in range(2):
    ka, kb = jax.random.split(jax.random.PRNGKey(77 + s))
    g = jax.random.normal(ka, (T, f), jnp.float32).astype(jnp.bfloat16)
    sets.append((g, jax.random.normal(kb, (T, f), jnp.float32).astype(jnp.bfloat16)))
  ref = reference.train_forward_epilogue(*sets[0], k, "moc", num_valid=nv)
  out = RES["fwd_epilogue"] = {}
  configs = topk_variants.EPILOGUE
  for label, cfg in configs.items():
    if left() < FFN_NEED:
      break
    fn = jax.jit(
      lambda g, u, cfg=cfg: moc_train.train_forward_epilogue(
        g, u, k, "moc", num_valid=nv, config=cfg
      )
    )
    try:
      o = fn(*sets[0])
      ok = all(_same(a, b) for a, b in zip(o[:3], ref[:3], strict=True))
      err = float(jnp.max(jnp.abs(o[3].astype(jnp.float32) - ref[3].astype(jnp.float32))))
      out[label] = {"exact_sel": ok, "z_max_err": err, "us": timed(fn, sets)}
      if cfg.compact:
        inner = dataclasses.replace(cfg, compact=False)
        mask = jax.jit(
          lambda g, u, c=inner: topk_compact.mask_call(g, k, "moc", c, ARGS.dry_run, nv)
        )
        out[label]["mask_us"] = timed(mask, sets)
    except Exception as e:
      out[label] = {"error": error(f"fwd_epilogue {label}", e)}
    print("fwd epilogue", label, out[label], flush=True)
    save()
  ok = {n: r for n, r in out.items() if r.get("exact_sel") and r.get("us")}
  best = min(ok, key=lambda n: ok[n]["us"]) if ok else "default"
  RES["fwd_epilogue_best"] = best
  return configs[best]


def ffn_layer(epilogue_cfg) -> list[dict]:
  from benchmarks import ffn_layer as fl

  fl.TOKENS = T  # 64 x 256 = 16384 on the GPU; tiny in --dry_run
  moc_train.FORWARD_DEFAULT = epilogue_cfg  # the forward epilogue reads it
  guarded("clear_caches", jax.clear_caches)  # no trace with the old default reused
  rows = RES["ffn_layer"] = []
  for d, f, k in FFN_SHAPES:
    sets = [fl._params(d, f, s) for s in range(2)]
    for name in ("dense", "moc_pallas"):
      if left() < FFN_STOP:
        return rows
      fwd, fwd_bwd = fl._fns(k, fl.METHODS[name], compile_options.parse("auto"))
      row = {"d": d, "F": f, "K": k, "method": name}
      row["fwd_us"], row["fwd_bwd_us"] = timed(fwd, sets), timed(fwd_bwd, sets)
      rows.append(row)
      print(row, flush=True)
      save()
  return rows


def summary(res: dict) -> None:
  f, k = SWEEP_FK
  print(f"\n== top-K {T} x {f} K={k} bf16 (us); baselines {res.get('baselines')}")
  cols = ["name", "exact", "us", "compile_s"]
  rows = [{**r, "us": common.fmt(r.get("us")), "exact": r.get("exact")} for r in res["sweep"]]
  if rows:  # print_table needs at least one row
    common.print_table(rows, cols)
  print("\n== shapes (us)")
  cols = ["F", "K", "default_us", "default_exact", "best_us", "best_exact"]
  fmt = lambda r: {c: common.fmt(v) if isinstance(v, float) else v for c, v in r.items()}
  if res.get("shapes"):
    common.print_table([fmt(r) for r in res["shapes"]], [*cols, "lax_top_k_us", "read_max_us"])
  for key in ("2of8", "fwd_epilogue", "ffn_layer"):
    print(f"\n== {key}: {res.get(key)}")
  print("\n== sections:", [(s["name"], s.get("status"), s.get("s")) for s in res["sections"]])
  print(f"errors: {len(res['errors'])}  best: {res.get('best')}  elapsed {elapsed()} s")


def main() -> None:
  global OUT_JSON
  os.makedirs(ARGS.out_dir, exist_ok=True)
  OUT_JSON = os.path.join(ARGS.out_dir, "topk_gpu_session.json")
  timer = threading.Timer(max(1.0, left() + ARGS.grace), _watchdog)
  timer.daemon = True
  timer.start()
  RES.update(T=T, budget_s=ARGS.budget, dry_run=ARGS.dry_run, sweep_fk=SWEEP_FK)
  RES["info"] = guarded("run_info", common.run_info, default={})
  print(RES["info"], flush=True)
  save()

  section("sweep", 0, sweep)
  best_cfg = guarded("best", pick_best, default=topk.ONE_BLOCK)
  section("shapes", SHAPES_NEED, shapes, best_cfg)
  section("2of8", EPI_NEED, grouped)
  epilogue_cfg = section("fwd_epilogue", EPI_NEED, forward_epilogue)
  section("ffn_layer", FFN_NEED, ffn_layer, epilogue_cfg or moc_train.FORWARD_DEFAULT)
  timer.cancel()
  RES["done"] = True
  save()
  guarded("summary", summary, RES)


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("out_dir")
  ap.add_argument("--budget", type=float, default=None, help="seconds (230; dry run 900)")
  ap.add_argument("--grace", type=float, default=15.0, help="watchdog: exit at budget+grace")
  ap.add_argument("--only", default="", help="regex on sweep names (smoke tests)")
  ap.add_argument("--shapes", type=int, default=len(SHAPES), help="how many of SHAPES")
  ap.add_argument("--t", type=int, default=None, help="rows (default 16384; 16 dry)")
  ap.add_argument("--dry_run", action="store_true", help="tiny sizes (CPU: interpret mode)")
  ARGS = ap.parse_args()
  if ARGS.dry_run:
    globals().update(DRY)
  T = ARGS.t or T
  ARGS.budget = ARGS.budget or (900.0 if ARGS.dry_run else 230.0)
  main()
