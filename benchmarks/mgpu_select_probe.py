"""Probe: MoC's selection as a Mosaic GPU radix select (`pallas_kernels/mgpu_select.py`, and
for rows of at most 2048 channels `mgpu_select_warp.py`, one warp a row).

Checks the kernel's words (the Triton selection pass's format) and its whole top-K against the
reference on Gaussian and tie-heavy rows, then times them beside the Triton selection pass
(`triton_mask`), `topk.select`'s default (`default_topk`), its Triton form (`triton_topk`) and
one XLA read of G (the floor of any pass over G). A variant that fails to compile or is
inexact is recorded and not timed; `*_sync` rows load each row at its start (not
`async_rows`, the default). `emulate_words` / `emulate_slots` are the kernel's
algorithm in jnp, for the CPU tests.

  python3 benchmarks/mgpu_select_probe.py [--t=16384 --f=5632 --k=1024 --ctas=1024] [--out=F]
  python3 benchmarks/mgpu_select_probe.py --f=5504 --num_valid=5461   # the 1B layer's words
  python3 benchmarks/mgpu_select_probe.py --lower_only   # CPU: lower for CUDA, nothing runs
  python3 benchmarks/mgpu_select_probe.py --t=1 --f=5504 --ctas=1 --device_time   # decode, T = 1
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import common
from pallas_kernels import mgpu_select, mgpu_select_warp
from pallas_kernels._mgpu_ops import keep_lowest
from pallas_kernels._mgpu_ptx import BINS, I32


def emulate_words(g: jax.Array, k: int, num_valid: int | None = None) -> jax.Array:
  """The kernel's algorithm in jnp, row by row, with the kernel's own bit helpers: the CPU
  check of its digits, thresholds and tie cut (the kernel itself runs only on a GPU)."""
  t, f = g.shape
  bits = lax.bitcast_convert_type(g, jnp.int16).astype(I32)
  key = jnp.where(bits < 0, bits ^ 0x7FFF, bits) + 32768
  hi, lo = key >> 8, key & 0xFF
  valid = jnp.arange(f) < (f if num_valid is None else num_valid)
  suffix = lambda h: jnp.cumsum(h[:, ::-1], axis=1)[:, ::-1]
  bin_iota = jnp.arange(BINS)
  pad = lambda s: jnp.concatenate([s, jnp.zeros((t, 1), I32)], axis=1)
  count = jax.vmap(lambda r, ok: jnp.zeros(BINS, I32).at[r].add(ok.astype(I32)))
  s1 = pad(suffix(count(hi, jnp.broadcast_to(valid, hi.shape))))
  b1 = jnp.max(jnp.where(s1[:, :BINS] >= k, bin_iota, -1), axis=1)
  above = jnp.take_along_axis(s1, b1[:, None] + 1, axis=1)
  s2 = pad(suffix(count(lo, valid & (hi == b1[:, None]))))
  b2 = jnp.max(jnp.where(above + s2[:, :BINS] >= k, bin_iota, -1), axis=1)
  gt = above[:, 0] + jnp.take_along_axis(s2, b2[:, None] + 1, axis=1)[:, 0]
  v, need = (b1 * BINS + b2)[:, None], (k - gt)[:, None]
  weights = lax.shift_left(jnp.ones((32,), I32), jnp.arange(32, dtype=I32))
  words = lambda m: jnp.sum(m.reshape(t, f // 32, 32).astype(I32) * weights, axis=2, dtype=I32)
  eq = words(valid & (key == v))
  before = jnp.cumsum(lax.population_count(eq), axis=1) - lax.population_count(eq)
  return words(valid & (key > v)) | keep_lowest(eq, jnp.clip(need - before, 0, 32))


def emulate_slots(words: jax.Array, f: int) -> jax.Array:
  """Each channel's output slot as the kernel computes it from the final words (-1 where the
  channel is not selected): the popcounts of the row's earlier words plus its word's lower
  set bits."""
  t = words.shape[0]
  chan = jnp.arange(f, dtype=I32)
  w = words[:, chan >> 5]
  first = jnp.cumsum(lax.population_count(words), axis=1) - lax.population_count(words)
  lower = lax.shift_left(jnp.ones_like(chan), chan & 31) - 1
  slot = first[:, chan >> 5] + lax.population_count(w & lower)
  sel = lax.shift_right_logical(w, jnp.broadcast_to(chan & 31, (t, f))) & 1
  return jnp.where(sel == 1, slot, -1)


def emulate_balanced(words: np.ndarray, k: int, threads: int = 128) -> np.ndarray:
  """`_mgpu_compact.balanced_loop` step by step for one row's 256 words (uint32, zero past the
  row): each thread's search for the word holding its first slot, the set bits it drops
  there, its walk; the channel of every slot (the CPU check of the PTX's arithmetic)."""
  popc = np.array([bin(int(w)).count("1") for w in words])
  first = np.concatenate([[0], np.cumsum(popc)[:-1]])  # words past the row: first slot K
  per = -(-k // threads)
  out = np.full(k, -1)
  for t in range(threads):
    s0, n = t * per, max(0, min(per, k - t * per))
    w = 0
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
      w = w + step if first[w + step] <= s0 else w
    m, j = int(words[w]), s0 - int(first[w])
    if j and n:  # fns: the position of the j-th set bit; bits up to it cleared
      b = [i for i in range(32) if m >> i & 1][j - 1]
      m &= ~((2 << b) - 1) & 0xFFFFFFFF
    for s in range(s0, s0 + n):
      while m == 0:
        w += 1
        m = int(words[w])
      b = (m & -m).bit_length() - 1
      out[s] = 32 * w + b
      m &= m - 1
  return out


def reference_words(g: jax.Array, k: int, num_valid: int | None = None) -> np.ndarray:
  """The selection of the first num_valid channels as words, from `reference.select`."""
  from pallas_kernels import reference

  t, f = g.shape
  idx, _ = reference.select(g[:, : f if num_valid is None else num_valid], k, "moc")
  mask = np.zeros((t, f), bool)
  np.put_along_axis(mask, np.asarray(idx), True, axis=1)
  bits = mask.reshape(t, f // 32, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
  return bits.sum(axis=2).astype(np.uint32).view(np.int32)


def _variants(a) -> dict:
  """The Mosaic GPU rows: words on each of `--ctas` CTA counts ('mgpu_select' the first,
  'mgpu_select_c<N>' the rest) and (without padding, K % 8 == 0) the whole top-K on each
  ('mgpu_topk', 'mgpu_topk_c<N>')."""
  counts = [int(c) for c in a.ctas.split(",")]
  for c in counts:  # shape errors before any tracing
    mgpu_select.kernel(a.t, a.f, a.k, c, a.num_valid)
  fns = {}
  for n, c in enumerate(counts):
    kw = dict(ctas=c, interpret=False, num_valid=a.num_valid)
    name = "mgpu_select" if n == 0 else f"mgpu_select_c{c}"
    fns[name] = jax.jit(lambda g, kw=kw: mgpu_select.words(g, a.k, **kw))
  # rows loaded by each CTA's threads at the row's start (before async_rows, the default)
  kw = dict(ctas=counts[0], interpret=False, num_valid=a.num_valid, async_rows=False)
  fns["mgpu_select_sync"] = jax.jit(lambda g, kw=kw: mgpu_select.words(g, a.k, **kw))
  if a.num_valid is None and a.k % 8 == 0:  # `topk.select` has no num_valid
    for n, c in enumerate(counts):  # the whole top-K's footprint differs from the words'
      kw = dict(ctas=c, interpret=False)
      name = "mgpu_topk" if n == 0 else f"mgpu_topk_c{c}"
      fns[name] = jax.jit(lambda g, kw=kw: mgpu_select.select(g, a.k, **kw))
    kw = dict(ctas=counts[0], interpret=False)
    fns["mgpu_topk_sync"] = jax.jit(
      lambda g, kw=kw: mgpu_select.select(g, a.k, async_rows=False, **kw)
    )
  # the ballots' words stored once per lane (`ballot_lanes`), on counts[0] and on --form_ctas
  # (80 registers, not 108, at 5632: more CTAs an SM resident); the whole top-K's default on
  # rows wider than `mgpu_select.LANES_MIN_F`, where `mgpu_topk_nolanes` is the old form
  for n, c in enumerate([counts[0], *(int(c) for c in a.form_ctas.split(",") if c)]):
    tag = "" if n == 0 else f"_c{c}"
    kw = dict(ctas=c, interpret=False, num_valid=a.num_valid, ballot_lanes=True)
    fns[f"mgpu_select_lanes{tag}"] = jax.jit(lambda g, kw=kw: mgpu_select.words(g, a.k, **kw))
  if a.num_valid is None and a.k % 8 == 0:
    kw = dict(ctas=counts[0], interpret=False, ballot_lanes=False)
    fns["mgpu_topk_nolanes"] = jax.jit(lambda g, kw=kw: mgpu_select.select(g, a.k, **kw))
    # every thread compacting as many keys (`kernel(balanced_walk=True)`), default CTAs
    kw = dict(interpret=False, balanced_walk=True)
    fns["mgpu_topk_balanced"] = jax.jit(lambda g, kw=kw: mgpu_select.select(g, a.k, **kw))
  if a.f <= mgpu_select_warp.MAX_F:  # narrow rows: one warp a row (the train forward's words)
    nv = a.num_valid
    fns["mgpu_select_warp"] = jax.jit(lambda g: mgpu_select_warp.words(g, a.k, num_valid=nv))
  return fns


def _ablated(a, ops: list[str]):
  """The words kernel with `SelectOps` methods `ops` (count_high, count_low, ballot_words)
  doing nothing while it traces: what those passes cost (its words are then wrong)."""
  import contextlib

  from pallas_kernels import _mgpu_ops

  def fn(g):
    with contextlib.ExitStack() as stack:
      for op in ops:
        original = getattr(_mgpu_ops.SelectOps, op)
        setattr(_mgpu_ops.SelectOps, op, lambda *args, **kw: None)
        stack.callback(setattr, _mgpu_ops.SelectOps, op, original)
      return mgpu_select.words(g, a.k, num_valid=a.num_valid, interpret=False)

  return jax.jit(fn)


def _same(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))


def _admit(fns: dict, rows: dict, name: str, fn, want: list, inputs: list, label: str) -> None:
  """fns[name] = fn if fn's outputs on each input equal `want`'s, bit for bit: a row that
  fails or differs is reported under rows[name] and never timed."""
  row = rows.setdefault(name, {})
  try:
    row[label] = all(_same(fn(x), w) for x, w in zip(inputs, want, strict=True))
  except Exception as e:
    row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
  if row.get(label):
    fns[name] = fn
  print(name, row, flush=True)


def _time_rows(fns: dict, rows: dict, sets: list, device_time: bool, trials: int = 9) -> None:
  """Each fn's time on `sets` into its row: kernel time from a profile, or interleaved
  wall-clock samples and their median."""
  if device_time:
    for name, fn in fns.items():
      rows.setdefault(name, {})["device_us"] = device_us(fn, sets[0])
      print(f"{name:14s} {rows[name]['device_us']:8.2f} us of kernels per call", flush=True)
    return
  for name, us in common.time_interleaved(fns, sets, inner=10, trials=trials).items():
    rows.setdefault(name, {}).update(median_us=sorted(us)[len(us) // 2], samples_us=us)
    print(f"{name:14s} {rows[name]['median_us']:8.1f} us", flush=True)


def _exact(fn, name: str, g, a) -> bool:
  from pallas_kernels import reference

  if name.startswith("mgpu_select"):
    return bool(np.array_equal(fn(g), reference_words(g, a.k, a.num_valid)))
  (idx, val), (ref_idx, ref_val) = fn(g), reference.select(g, a.k, "moc")
  return bool(np.array_equal(idx, ref_idx) and np.array_equal(val, ref_val))


def device_us(fn, args, calls: int = 50) -> float:
  """Kernel time per call from a jax.profiler trace of `calls` calls (wall-clock timing of a
  call this short would be mostly its dispatch)."""
  import tempfile

  from benchmarks import step_profile

  common.block(fn(*args))
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      common.block([fn(*args) for _ in range(calls)])
    summary = step_profile.summarize(step_profile.read_trace(log_dir), calls)
  return round(summary["device_ms_per_step"] * 1e3, 2)


def _decode_partials(a, g: jax.Array) -> dict:
  """Decode's real input, G as 2 fp32 split partials of a power-of-two width (the gate GEMV's):
  the Triton top-K summing them as it loads (the list pipeline's default) vs the Mosaic one
  (`select_partials`), checked equal, then timed like the other rows."""
  from pallas_kernels import _decode_select, mgpu_select, moc_decode

  dcfg = moc_decode.moc_config(a.t, 2048, a.f).topk
  if dcfg is None or a.k % 8:
    return {}
  width = 1 << (a.f - 1).bit_length()
  half = jnp.pad(g.astype(jnp.float32) * 0.5, ((0, 0), (0, width - a.f)))
  partials = jnp.stack([half, half])
  triton = jax.jit(
    lambda p: _decode_select.topk_from_partials(p, a.k, a.f, jnp.bfloat16, dcfg, False)
  )
  try:
    want = [triton(partials)]
  except Exception as e:  # the reference itself failed: nothing to check the others against
    return {"decode_topk_partials": {"error": f"{type(e).__name__}: {str(e)[:2000]}"}}
  fns, rows = {"decode_topk_partials": triton}, {"decode_topk_partials": {}}
  fn = jax.jit(
    lambda p: mgpu_select.select_partials(p, a.k, a.f, jnp.bfloat16, interpret=False)
  )  # reported; timed only if exact
  _admit(fns, rows, "mgpu_topk_partials", fn, want, [partials], "exact_vs_triton")
  _time_rows(fns, rows, [(partials,)], a.device_time, a.trials)
  return rows


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--t", type=int, default=16384)
  p.add_argument("--f", type=int, default=5632, help="a multiple of 128, at most 8192")
  p.add_argument("--k", type=int, default=1024, help="a multiple of 8 for the top-K rows")
  p.add_argument("--num_valid", type=int, default=None, help="channels that may be selected")
  p.add_argument("--ctas", default="1024", help="CTA counts, comma-separated (at most T)")
  p.add_argument("--form_ctas", default="", help="more CTA counts for the lanes rows")
  p.add_argument("--lower_only", action="store_true", help="lower for CUDA and stop (CPU)")
  p.add_argument(
    "--ablate",
    default="",
    help="diagnostic rows, comma-separated: the words kernel without these SelectOps methods "
    "('+'-joined, e.g. count_high+count_low); timed, never exact",
  )
  p.add_argument(
    "--device_time", action="store_true", help="kernel time per call from a profile (e.g. T = 1)"
  )
  p.add_argument("--trials", type=int, default=9, help="interleaved trials (medians of these)")
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  try:
    fns = _variants(a)
  except ValueError as e:
    p.error(str(e))
  g_spec = jax.ShapeDtypeStruct((a.t, a.f), jnp.bfloat16)
  if a.lower_only:
    for name, fn in fns.items():
      text = fn.trace(g_spec).lower(lowering_platforms=("cuda",)).as_text()
      print(f"{name}: lowered for CUDA ({len(text)} characters)")
    return
  normal = lambda seed: jax.random.normal(jax.random.PRNGKey(seed), (a.t, a.f))
  sets = [(normal(seed).astype(jnp.bfloat16),) for seed in (0, 1)]
  ties = jax.random.randint(jax.random.PRNGKey(2), (a.t, a.f), -3, 4).astype(jnp.bfloat16)
  rows: dict = {name: {} for name in fns}
  for name in list(fns):  # a variant that fails or is inexact is reported, never timed
    try:
      for label, g in (("gaussian", sets[0][0]), ("ties", ties)):
        rows[name][f"exact_{label}"] = _exact(fns[name], name, g, a)
    except Exception as e:
      rows[name]["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    if rows[name].get("error") or not all(rows[name].values()):
      del fns[name]
    print(name, rows[name], flush=True)
  from pallas_kernels import moc_train, topk, topk_compact

  cfg = dataclasses.replace(moc_train.forward_config(a.f), selection="triton")
  fns["triton_mask"] = jax.jit(
    lambda g: topk_compact.mask_call(g, a.k, "moc", cfg, False, num_valid=a.num_valid)
  )
  fns["xla_read_max"] = jax.jit(lambda g: jnp.max(g, axis=1))
  if a.ablate:
    for ops in a.ablate.split(","):
      fns[f"ablate_{ops}"] = _ablated(a, ops.split("+"))
      rows[f"ablate_{ops}"] = {"diagnostic": "words wrong by design: timing only"}
  if a.num_valid is None:  # `select`'s default (Mosaic words + gathered compaction), and Triton's
    fns["default_topk"] = jax.jit(lambda g: topk.select(g, a.k, "moc"))
    triton = dataclasses.replace(topk.default_config(a.f), selection="triton")
    fns["triton_topk"] = jax.jit(lambda g: topk.select(g, a.k, "moc", config=triton))
  if a.t <= 16:  # the decode list pipeline's own selection (T <= 4), on G already in bf16
    from pallas_kernels import _decode_select, moc_decode

    dcfg = moc_decode.moc_config(a.t, 2048, a.f).topk
    if dcfg is not None:
      fns["decode_topk"] = jax.jit(lambda g: _decode_select.topk_rows(g, a.k, dcfg, False))
  if a.t <= 16:
    rows |= _decode_partials(a, sets[0][0])
  _time_rows(fns, rows, sets, a.device_time, a.trials)
  if a.out:
    shape = {"t": a.t, "f": a.f, "k": a.k, "num_valid": a.num_valid, "ctas": a.ctas}
    common.write_json(a.out, {"info": common.run_info(), "shape": shape, "rows": rows})


if __name__ == "__main__":
  main()
