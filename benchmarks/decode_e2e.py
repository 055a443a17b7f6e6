"""End-to-end decode, 1b preset with random weights: tokens/s of dense vs MoC in one run.

Batch 1, a 128-token prompt, 128 new tokens (no EOS), bf16 weights and compute, one compiled
generation call (prefill + `lax.while_loop`). Decode tokens/s = 128 / (time of the whole call
- time of the prefill alone); medians over trials. With `--interleave=R` every variant is
compiled first (an executable of its own), then each is timed once per round for R rounds, and
`over_<reference>_rounds` / `moc_over_dense_rounds` are medians of per-round ratios: drift of
the machine's speed over the run (±5% between rows run one after another) cancels within a
round. Dense runs on both of its paths and the
faster counts: `dense_kernel` (the model's decode with the kernel backend) and `dense_xla`
(XLA's dots). Both models decode with the attention's launch warming 16 MB of L2 and
`decode_prefetch` on (defaults since 2026-12-05f; `*_kernel_before` rows: neither). MoC runs
with the default decode config (since 2026-12-05f its partials summed with the residual add
in one kernel; `moc_kernel_before` sums them by XLA as before), as `moc_kernel_mask`
with the mask pipeline forced, `moc_kernel_mgpu` with the list pipeline's top-K as the Mosaic
GPU select (the rows kernel's launch warming the next layer's q, k, v; `moc_kernel_mgpusw`:
the select's own launch warming them, by bulk prefetches from CTAs of its own;
`moc_kernel_mgpu_cold` without any warming from the FFN) and `moc_kernel_xsum` with XLA's sum
and add.
`dense_kernel_nopf` / `moc_kernel_nopf`: the model's `decode_prefetch` off (attention K and V
a block ahead; q, k, v, the output projection and MoC's gate streamed on a resident grid).
`moc_kernel_warmN[pP]` (one per `--warm_mb` entry N[:P]) has each layer's top-K launch read N MB
of the next layer's q, k, v weight into L2 (`DecodeConfig.warm_bytes`; 0: off) on P programs
(`warm_programs`).
`dense_kernel_rowdot0` / `moc_kernel_rowdot0`: every rowdot GEMV with one config (8 rows,
512-wide D steps: `rowdot_config` before the sweep's picks of 2026-12-05).
`dense_kernel_rdpf` / `moc_kernel_rdpf`: the one-weight rowdot GEMVs at T = 1 load each D
step one step ahead (`RowdotConfig.prefetch`; the SwiGLU's two weights keep their config).
`dense_kernel_rds` / `moc_kernel_rds`: the rowdot GEMVs (and the SwiGLU) at T = 1 on a grid
that stays resident, each program streaming its row blocks (`RowdotConfig.programs`).
`dense_kernel_awarmN[pP]` / `moc_kernel_awarmN[pP]` (one pair per `--attn_warm_mb` entry) have
each layer's attention launch read N MB of the output projection, then of the FFN's first
weights, into L2 (`model.decode_attention_warm_mb`; the default is 16) on P
programs (`decode_attention.WARM_PROGRAMS`).
The defaults on GPU (since 2026-12-05b): output-major GEMVs with the norms and residual adds
inside (`model.decode_gemv='rowdot'`) and RoPE inside the attention kernel ('fused').
`*_splitk` rows are the path before (split-K GEMVs, XLA's norms, RoPE and adds, the plain
attention kernel), `*_splitk_fused` split-K with the fused attention, `*_attn` the plain
attention kernel (`model.decode_attention='pallas'`), `*_xattn` XLA's attention.
`no_ffn` returns zeros from every FFN: the non-FFN time per token, i.e. the ceiling of any FFN
speedup.

  python benchmarks/decode_e2e.py [--quick] [--d_ff=5464] [--interleave=R] [--only=a,b]
      [--out=benchmarks/results/decode_e2e.json]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
import jax
import jax.numpy as jnp
import numpy as np
import step_profile
from decode_timing import run_info, streaming_rowdot
from flax import nnx

from moc_jax import generate, model, model_config
from pallas_kernels import _decode_rowdot, decode_attention, moc_decode


def _no_ffn_decode(self, h, norm, warm=None):
  """FeedForward.decode adding zeros to the residual stream: the time of everything but the
  FFN (a floor, not a model)."""
  return h


class Runner:
  """One variant's generation and its prefill alone, each compiled once into an executable of
  its own (so kernel configs patched in while compiling stay in it), timed call by call."""

  def __init__(self, m, prompt_len: int, new: int, options=None):
    tokens = np.random.default_rng(0).integers(3, m.cfg.vocab_size, (1, prompt_len)).tolist()
    self.new = new
    self.run = generate.compile_generation(m, tokens, new, eos_id=-1, compiler_options=options)
    graphdef, state = nnx.split(m)

    def prefill(state, toks):
      mm = nnx.merge(graphdef, state)
      cache = mm.init_cache(1, prompt_len + new)
      pos = jnp.arange(prompt_len)[None]
      return mm.decode(toks, pos, cache)[0][:, -1]

    toks = jnp.asarray(tokens, jnp.int32)
    compiled = jax.jit(prefill, compiler_options=options).lower(state, toks).compile()
    self.prefill = lambda: compiled(state, toks)
    self.tokens = self.run()[0]
    assert len(self.tokens) == new
    jax.block_until_ready(self.prefill())
    self.total: list[float] = []
    self.pre: list[float] = []

  def time_once(self) -> float:
    """One generation and one prefill; returns this trial's decode tokens/s."""
    t0 = time.perf_counter()
    self.run()
    self.total.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    jax.block_until_ready(self.prefill())
    self.pre.append(time.perf_counter() - t0)
    return self.new / max(self.total[-1] - self.pre[-1], 1e-9)

  def row(self, profile: bool) -> dict:
    t_total, t_pre = statistics.median(self.total), statistics.median(self.pre)
    return {
      **({"profile_per_token": _profile(self.run, self.new)} if profile else {}),
      "total_s": t_total,
      "prefill_s": t_pre,
      "decode_tokens_per_s": self.new / max(t_total - t_pre, 1e-9),
      "tokens_per_s_incl_prefill": self.new / t_total,
      "tokens": self.tokens[:16],
    }


def _profile(run, new: int) -> dict:
  """Device time of one whole generation per new token, from a jax.profiler trace: kernel time
  (`device_ms_per_step`), the union of kernel intervals (`busy_ms_per_step`), and the wall time
  while tracing (tracing slows the host, so it is not the untraced speed)."""
  with tempfile.TemporaryDirectory() as log_dir:
    t0 = time.perf_counter()
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      run()
    wall_ms = (time.perf_counter() - t0) * 1e3 / new
    summary = step_profile.summarize(step_profile.read_trace(log_dir), new, top=40)
  return {"wall_ms_traced": round(wall_ms, 4), **summary}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny preset on CPU")
  p.add_argument("--d_ff", type=int, default=None, help="override the preset's F (e.g. 5464)")
  p.add_argument("--trials", type=int, default=5)
  p.add_argument("--out", default="benchmarks/results/decode_e2e.json")
  p.add_argument("--skip", default="", help="comma-separated variants to leave out")
  p.add_argument("--only", default="", help="comma-separated variants to run (default: all)")
  p.add_argument(
    "--interleave",
    type=int,
    default=0,
    help="R > 0: build every variant first, then time them in R rounds, one call each per "
    "round (ratios within a round); 0: one variant after another, --trials calls each",
  )
  p.add_argument(
    "--build_budget_s",
    type=float,
    default=float("inf"),
    help="--interleave: build no more variants (in the order listed) after this many seconds",
  )
  p.add_argument("--reference", default="dense_kernel", help="the row per-round ratios divide by")
  p.add_argument(
    "--warm_mb", default="", help="comma-separated MB[:PROGRAMS]: a moc_kernel_warm row each"
  )
  p.add_argument(
    "--attn_warm_mb",
    default="",
    help="comma-separated MB[:PROGRAMS]: a dense_kernel_awarm and a moc_kernel_awarm row each",
  )
  p.add_argument(
    "--profile", action="store_true", help="also trace one generation: device vs wall time"
  )
  a = p.parse_args()
  preset, prompt_len, new = ("tiny", 16, 8) if a.quick else ("1b", 128, 128)
  warm = [v.replace(":", "p") for v in a.warm_mb.split(",") if v]
  attn_warm = [v.replace(":", "p") for v in a.attn_warm_mb.split(",") if v]
  vocab = 512 if a.quick else 32000  # quick: CPU wiring checks, kernels in interpret mode
  base = dict(dtype="bfloat16", param_dtype="bfloat16", d_ff=a.d_ff, vocab_size=vocab)
  try:  # a bad --d_ff is one error line, before any variant is built
    model_config.from_preset(preset, **base)
  except model_config.ConfigError as e:
    p.error(str(e))
  variants = {  # fastest paths first: a timeout keeps them
    "dense_kernel": dict(ffn="dense", kernel_backend="pallas"),
    "moc_kernel": dict(ffn="moc", kernel_backend="pallas"),
    **{
      f"{v}_kernel_nopf": dict(ffn=v, kernel_backend="pallas", decode_prefetch=False)
      for v in ("dense", "moc")
    },
    "moc_kernel_mgpu": dict(ffn="moc", kernel_backend="pallas"),
    "moc_kernel_mgpusw": dict(ffn="moc", kernel_backend="pallas"),
    "moc_kernel_xsum": dict(ffn="moc", kernel_backend="pallas"),
    **{
      f"{v}_kernel_before": dict(
        ffn=v, kernel_backend="pallas", decode_prefetch=False, decode_attention_warm_mb=0
      )
      for v in ("dense", "moc")
    },
    "moc_kernel_mgpu_cold": dict(ffn="moc", kernel_backend="pallas"),
    # before 2026-12-05b: split-K GEMVs, XLA's norms / RoPE / adds, the plain attention kernel
    **{
      f"{v}_kernel_splitk": dict(
        ffn=v, kernel_backend="pallas", decode_gemv="splitk", decode_attention="pallas"
      )
      for v in ("dense", "moc")
    },
    # split-K GEMVs with the fused attention (RoPE and the q, k, v split inside it)
    "dense_kernel_splitk_fused": dict(ffn="dense", kernel_backend="pallas", decode_gemv="splitk"),
    "moc_kernel_splitk_fused": dict(ffn="moc", kernel_backend="pallas", decode_gemv="splitk"),
    # the attention kernel without RoPE inside (model.decode_attention='pallas'); XLA's
    "dense_kernel_attn": dict(ffn="dense", kernel_backend="pallas", decode_attention="pallas"),
    "moc_kernel_attn": dict(ffn="moc", kernel_backend="pallas", decode_attention="pallas"),
    "dense_kernel_xattn": dict(ffn="dense", kernel_backend="pallas", decode_attention="xla"),
    "moc_kernel_xattn": dict(ffn="moc", kernel_backend="pallas", decode_attention="xla"),
    "dense_xla": dict(ffn="dense", kernel_backend="xla"),
    **{f"moc_kernel_warm{w}": dict(ffn="moc", kernel_backend="pallas") for w in warm},
    **{
      f"{v}_kernel_awarm{w}": dict(
        ffn=v, kernel_backend="pallas", decode_attention_warm_mb=int(w.partition("p")[0])
      )
      for w in attn_warm
      for v in ("dense", "moc")
    },
    # rowdot knobs alone (`_patched`): the model as the defaults build it
    **{
      f"{v}_kernel_{knob}": dict(ffn=v, kernel_backend="pallas")
      for knob in ("rdpf", "rds", "rowdot0")
      for v in ("dense", "moc")
    },
    "moc_kernel_mask": dict(ffn="moc", kernel_backend="pallas"),
    "moc_xla": dict(ffn="moc", kernel_backend="xla"),
    "no_ffn": dict(ffn="dense", kernel_backend="pallas"),
  }
  skip = set(a.skip.split(","))
  only = set(a.only.split(",")) if a.only else set(variants)
  if only - set(variants):
    p.error(f"unknown variants {sorted(only - set(variants))}; known: {', '.join(variants)}")
  variants = {n: kw for n, kw in variants.items() if n in only and n not in skip}
  result = {
    **run_info(),
    "preset": preset,
    "prompt_len": prompt_len,
    "new_tokens": new,
    "batch": 1,
    "method": __doc__.split("\n\n")[1],
    "interleave": a.interleave,
    "rows": {},
  }
  models: dict[tuple, model.Transformer] = {}  # variants of one model config share it

  def build(name: str, kw: dict) -> Runner:
    key = tuple(sorted(kw.items()))
    if key not in models:
      models[key] = model.Transformer(model_config.from_preset(preset, **base, **kw), nnx.Rngs(0))
      models[key].prepare_for_decode()
    with _patched(name):
      return Runner(models[key], prompt_len, new)

  def record(name: str, row: dict) -> None:
    cfg = model_config.from_preset(preset, **base, **variants[name])  # also if build failed
    row.update(d_model=cfg.d_model, d_ff=cfg.d_ff, k=cfg.k, layers=cfg.num_layers)
    result["rows"][name] = row
    print(name, json.dumps(row), flush=True)
    _summarise(result, a.out, a.reference)

  if not a.interleave:  # one variant at a time: build, time, drop
    for name, kw in variants.items():
      try:
        runner = build(name, kw)
        for _ in range(a.trials):
          runner.time_once()
        row = runner.row(a.profile)
      except Exception as e:
        row = _error(e)
      record(name, row)
      models.clear()
    return
  runners, rounds = {}, []  # every variant built first, then timed in turns
  t0 = time.perf_counter()
  for name, kw in variants.items():
    if runners and time.perf_counter() - t0 > a.build_budget_s:  # keep time for the timing
      result["not_built"] = list(variants)[list(variants).index(name) :]
      print(f"build budget spent, not built: {', '.join(result['not_built'])}", flush=True)
      break
    try:
      runners[name] = build(name, kw)
    except Exception as e:
      record(name, _error(e))
  for _ in range(a.interleave):
    rounds.append({name: r.time_once() for name, r in runners.items()})
  for name, runner in runners.items():
    record(name, {**runner.row(a.profile), "rounds_tokens_per_s": [x[name] for x in rounds]})


def _error(e: Exception) -> dict:
  """The row of a variant that failed to build or run: the rest still run."""
  return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


@contextlib.contextmanager
def _patched(name: str):
  """The model and kernel configs variant `name` compiles with (see the module docstring)."""
  original, original_cfg = model.FeedForward.decode, moc_decode.moc_config
  original_programs = decode_attention.WARM_PROGRAMS
  original_rowdot = _decode_rowdot.rowdot_config
  knob = name.rpartition("_")[2]
  edits = []  # DecodeConfig -> DecodeConfig, applied in order to moc_config's pick
  if knob == "rowdot0":  # one rowdot config for every shape
    _decode_rowdot.rowdot_config = lambda *a, **kw: _decode_rowdot.RowdotConfig()
  if knob == "rdpf":  # one weight at T = 1: each D step's loads one step ahead
    _decode_rowdot.rowdot_config = lambda t, d, n, weights=1, itemsize=2, streaming=False: replace(
      original_rowdot(t, d, n, weights, itemsize, streaming), prefetch=t == 1 and weights == 1
    )
  if knob == "rds":  # T = 1: every GEMV on a resident grid streaming its blocks
    _decode_rowdot.rowdot_config = streaming_rowdot(original_rowdot)
  if name == "no_ffn":
    model.FeedForward.decode = _no_ffn_decode
  if name == "moc_kernel_mask":  # the mask pipeline selects with its own select
    edits.append(lambda c: replace(c, pipeline="mask", topk=None))
  if knob in ("xsum", "before"):  # XLA's reduce, then its add
    edits.append(lambda c: replace(c, list_sum="xla"))
  if knob in ("mgpu", "cold", "mgpusw"):  # the Mosaic select; the rows kernel warming, or
    # (mgpusw) the select's own CTAs by bulk prefetches, or (cold) nothing
    edits.append(lambda c: _with_mosaic_select(c, cold=knob == "cold", own=knob == "mgpusw"))
  if name.startswith("moc_kernel_warm"):
    mb, _, programs = name.removeprefix("moc_kernel_warm").partition("p")
    warm = {"warm_bytes": int(mb) << 20} | ({"warm_programs": int(programs)} if programs else {})
    edits.append(lambda c: replace(c, **warm))
  if edits:
    moc_decode.moc_config = lambda *a: functools.reduce(lambda c, e: e(c), edits, original_cfg(*a))
  if "_kernel_awarm" in name and "p" in name.partition("awarm")[2]:
    decode_attention.WARM_PROGRAMS = int(name.partition("awarm")[2].partition("p")[2])
  try:
    yield
  finally:
    model.FeedForward.decode, moc_decode.moc_config = original, original_cfg
    decode_attention.WARM_PROGRAMS = original_programs
    _decode_rowdot.rowdot_config = original_rowdot


def _with_mosaic_select(cfg, cold: bool = False, own: bool = False):
  """`cfg` selecting with the Mosaic GPU radix select where it has a top-K (the list pipeline,
  T <= 4); the rows kernel's launch warms L2 with the same bytes (`DecodeConfig.warm_from`),
  or (own) the select's launch by bulk prefetches from CTAs of its own, or (cold) none."""
  if cfg.topk is None:
    return cfg
  where = "select" if own else "rows"
  mosaic = replace(cfg, topk=replace(cfg.topk, selection="mgpu"), warm_from=where)
  return replace(mosaic, warm_bytes=0) if cold else mosaic


def _summarise(result: dict, out: str, reference: str) -> None:
  """The best MoC row over the best dense row by median tokens/s; with interleaved rounds also
  each row's median per-round ratio to `reference` and the median of the rounds' best-over-best
  (each round times every variant once, so slow drift of the machine cancels in a round)."""
  rows = result["rows"]
  ok = [n for n in rows if "decode_tokens_per_s" in rows[n]]
  best = lambda names: max((rows[n]["decode_tokens_per_s"] for n in names), default=0)
  dense = best([n for n in ok if n.startswith("dense_")])
  moc = best([n for n in ok if n.startswith("moc_")])
  result["moc_over_dense"] = moc / dense if dense and moc else None  # None until both ran
  rounds = {n: rows[n]["rounds_tokens_per_s"] for n in ok if "rounds_tokens_per_s" in rows[n]}
  for n, tps in rounds.items():
    rows[n][f"over_{reference}_rounds"] = common.paired_ratio(tps, rounds.get(reference))
  result["moc_over_dense_rounds"] = common.paired_ratio(
    _best_per_round(rounds, "moc_"), _best_per_round(rounds, "dense_")
  )
  common.write_json(out, result)
  print(
    f"\ndecode tokens/s: dense best {dense:.1f}, MoC best {moc:.1f}, "
    f"ratio {result['moc_over_dense']} (median of rounds: {result['moc_over_dense_rounds']})"
  )


def _best_per_round(rounds: dict[str, list[float]], prefix: str) -> list[float]:
  """Per round, the highest tokens/s among the rows named prefix*; [] if there are none."""
  mine = [tps for name, tps in rounds.items() if name.startswith(prefix)]
  return [max(r) for r in zip(*mine, strict=True)]


if __name__ == "__main__":
  main()
