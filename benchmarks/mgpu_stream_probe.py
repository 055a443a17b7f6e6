"""Probe: the train epilogues' streaming passes as Mosaic GPU kernels (`mgpu_apply`, the forward;
`mgpu_backward`, the backward) against the Triton passes (`triton` rows: the defaults before
2026-12-05o; 'auto' now takes the Mosaic kernels on Hopper), at the layer shapes.

Per shape (16384 rows of a preset's padded F, its K), each group's Mosaic rows are first
checked bit for bit against the Triton form on Gaussian and tie-heavy rows (an inexact or
failing row is recorded, not timed), then all rows are timed interleaved
(`common.time_interleaved`) beside XLA's silu(G)·U and a copy as floors; `vs_triton` is each
row's time over the Triton row's:
  select_fwd  the whole forward epilogue from the fused [G | U] buffer (selection and pass):
              the select and the Triton gather, the Mosaic pass, and one kernel (`in_select`,
              the default; `in_select_warp`, one warp a row, for F <= 2048: untimed yet);
  fwd         the forward pass alone, from the selection's words;
  bwd_moc / bwd_gcp   the backward, fused ([dG | dU]), with Z_sel and without.
`--ctas` adds Mosaic pass rows on that many CTAs an SM (0: the kernels' own pick, as many as
shared memory holds).

  python3 benchmarks/mgpu_stream_probe.py --shapes=1b,60m [--ctas=0,2] [--out=F]
  python3 benchmarks/mgpu_stream_probe.py --lower_only   # CPU: lower every row for CUDA
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from pallas_kernels import _triton_utils as tu
from pallas_kernels import mgpu_apply, mgpu_backward, mgpu_select_warp, moc_train, topk_compact
from pallas_kernels import moc_train_mask as mm

BASE = "triton"  # the row each group is checked and timed against
SHAPES = {  # T, padded F, num_valid, K
  "1b": (16384, 5504, 5461, 1024),
  "350m": (16384, 2816, 2736, 512),
  "130m": (16384, 2048, 2048, 384),
  "60m": (16384, 1408, 1376, 256),
  "tiny": (8, 1408, 1376, 256),  # --lower_only's and --dry_run's
}


def _ctas(c: int, t: int, interpret: bool) -> int | None:
  """c CTAs an SM, at most T; None (the kernel's pick) for 0 and in interpret mode."""
  return None if interpret or not c else min(c * tu.sm_count(), t)


def _triton_config(f: int):
  """The forward's config with the Triton gather as its pass (the default before 2026-12-05o)."""
  return dataclasses.replace(moc_train.forward_config(f), apply_mode="gather")


def _forward_rows(k: int, nv: int | None, ctas: list[int], interpret: bool = False) -> dict:
  """(words, gu) -> (g_sel, u_sel, z, z_sel) for each forward row (MoC's: Z_sel kept);
  the Triton row first."""
  kw = dict(num_valid=nv, interpret=interpret, z_sel=True)
  rows = {
    BASE: lambda w, gu: mm.apply_call(w, gu, None, k, cfg=_triton_config(gu.shape[1] // 2), **kw)
  }
  for c in ctas:
    rows[f"mgpu_c{c}"] = lambda w, gu, c=c: mgpu_apply.apply(
      w, gu, None, k, ctas=_ctas(c, len(w), interpret), **kw
    )
  return rows


def _backward_rows(ctas: list[int], interpret: bool = False) -> dict:
  """(dz, words, g_sel, u_sel, z_sel or None) -> ([dG | dU], Z) for each backward row."""
  rows = {
    BASE: lambda *a: mm.train_backward_bitmask(
      *a, fused=True, interpret=interpret, config=mm._triton_walk(a[0].shape[1])
    )
  }
  for c in ctas:
    rows[f"mgpu_c{c}"] = lambda *a, c=c: mgpu_backward.backward(
      *a, fused=True, interpret=interpret, ctas=_ctas(c, len(a[0]), interpret)
    )
  return rows


def _select_forward_rows(k: int, nv: int | None, f: int, interpret: bool = False) -> dict:
  """gu -> (words, g_sel, u_sel, z, z_sel): the whole train forward epilogue (selection and
  pass) with the Triton gather, with the Mosaic pass, and as one kernel (`in_select`; for
  F <= 2048 compiled, also one warp a row: `in_select_warp`)."""
  modes = {BASE: "gather", "mgpu_pass": "mgpu", "in_select": "in_select"}
  if f <= mgpu_select_warp.MAX_F and not interpret:
    modes["in_select_warp"] = "in_select_warp"
  rows = {}
  for name, mode in modes.items():

    def row(gu, mode=mode):
      cfg = dataclasses.replace(moc_train.forward_config(gu.shape[1] // 2), apply_mode=mode)
      kw = dict(num_valid=nv, config=cfg, interpret=interpret, z_sel=True)  # MoC's: Z_sel kept
      return mm.train_forward_bitmask(gu, None, k, **kw)

    rows[name] = row
  if "in_select_warp" in modes:  # its g turned back from the keys (167 registers, not 64)
    rows["in_select_warp_keys"] = lambda gu: mgpu_select_warp.in_select(
      gu, k, num_valid=nv, z_sel=True, reload_g=False
    )
  return rows


def _inputs(t: int, f: int, seed: int, ties: bool):
  keys = jax.random.split(jax.random.key(seed), 3)
  g = (
    jax.random.randint(keys[0], (t, f), -3, 4).astype(jnp.bfloat16)
    if ties
    else jax.random.normal(keys[0], (t, f)).astype(jnp.bfloat16)
  )
  u, dz = (jax.random.normal(key, (t, f)).astype(jnp.bfloat16) for key in keys[1:])
  return jnp.concatenate([g, u], axis=1), dz


def _same(a, b) -> bool:
  return all(
    np.array_equal(
      np.asarray(x).view(np.uint16 if x.dtype.itemsize == 2 else np.uint32),
      np.asarray(y).view(np.uint16 if y.dtype.itemsize == 2 else np.uint32),
    )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def shape_rows(label: str, a) -> dict:
  t, f, nv, k = SHAPES[label]
  nv = None if nv == f else nv
  ctas, interpret = [int(c) for c in a.ctas.split(",")], a.dry_run
  cfg = moc_train.forward_config(f)
  words_of = jax.jit(
    lambda gu: topk_compact.mask_call(gu, k, "moc", cfg, interpret, num_valid=nv, width=f)
  )
  fwd = {name: jax.jit(fn) for name, fn in _forward_rows(k, nv, ctas, interpret).items()}
  bwd = {name: jax.jit(fn) for name, fn in _backward_rows(ctas, interpret).items()}
  res: dict = {"shape": dict(T=t, F=f, num_valid=nv, K=k), "exact": {}, "errors": {}}
  sets = []
  for seed, ties in ((0, False), (1, True)):
    gu, dz = _inputs(t, f, seed, ties)
    w = words_of(gu)
    kw = dict(num_valid=nv, cfg=cfg, interpret=interpret, z_sel=True)
    gs, us, _, zs = mm.apply_call(w, gu, None, k, **kw)  # the residuals, Z_sel too
    sets.append(dict(gu=gu, dz=dz, w=w, gs=gs, us=us, zs=zs))
  whole = {name: jax.jit(fn) for name, fn in _select_forward_rows(k, nv, f, interpret).items()}
  for group, fns, args_of in (
    ("select_fwd", whole, lambda s: (s["gu"],)),
    ("fwd", fwd, lambda s: (s["w"], s["gu"])),
    ("bwd_moc", bwd, lambda s: (s["dz"], s["w"], s["gs"], s["us"], s["zs"])),
    ("bwd_gcp", bwd, lambda s: (s["dz"], s["w"], s["gs"], s["us"], None)),
  ):
    live = {}
    for name, fn in fns.items():
      try:
        exact = [_same(fn(*args_of(s)), fns[BASE](*args_of(s))) for s in sets]
      except Exception as e:  # recorded, not timed
        res["errors"][f"{group}_{name}"] = f"{type(e).__name__}: {str(e)[:1500]}"
        continue
      res["exact"][f"{group}_{name}"] = exact
      if all(exact):
        live[name] = lambda *x, fn=fn, args_of=args_of: fn(
          *args_of(dict(zip(KEYS, x, strict=True)))
        )
    live["xla_silu_mul"] = lambda *x: mm.silu_mul(x[0][:, :f], x[0][:, f:], jnp.bfloat16)
    live["xla_copy"] = lambda *x: x[0] + jnp.bfloat16(1)
    arg_sets = [tuple(s[key] for key in KEYS) for s in sets]
    timing = dict(inner=1, trials=1, warmup=1) if a.dry_run else dict(trials=a.trials)
    samples = common.time_interleaved(
      {n: jax.jit(fn) for n, fn in live.items()}, arg_sets, **timing
    )
    res[group] = {
      n: dict(median_us=statistics.median(v), vs_triton=common.paired_ratio(v, samples.get(BASE)))
      for n, v in samples.items()
    }
    for n, row in res[group].items():
      print(f"{label} {group:8s} {n:14s} {row['median_us']:8.1f} us  x{row['vs_triton'] or 0:.3f}")
  return res


KEYS = ("gu", "dz", "w", "gs", "us", "zs")


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default="1b,60m", help=f"of {', '.join(SHAPES)}")
  p.add_argument("--ctas", default="0", help="CTAs an SM for the Mosaic rows (0: their pick)")
  p.add_argument("--trials", type=int, default=15)
  p.add_argument("--lower_only", action="store_true", help="lower for CUDA and stop (CPU)")
  p.add_argument("--dry_run", action="store_true", help="interpret mode (CPU; use --shapes=tiny)")
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  unknown = set(a.shapes.split(",")) - set(SHAPES)
  if unknown:
    p.error(f"unknown shapes {sorted(unknown)}; choose from {sorted(SHAPES)}")
  if a.lower_only:
    return lower_only(a)
  payload = {"info": common.run_info(), "shapes": {}}
  for label in a.shapes.split(","):
    payload["shapes"][label] = shape_rows(label, a)
    if a.out:
      common.write_json(a.out, payload)


def lower_only(a) -> None:
  """Each Mosaic row lowered for CUDA (no GPU needed): what the CPU tests run."""
  ctas = [int(c) for c in a.ctas.split(",")]
  for label in a.shapes.split(","):
    t, f, nv, k = SHAPES[label]
    nv = None if nv == f else nv
    bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    words = jax.ShapeDtypeStruct((t, f // 32), jnp.int32)
    groups = (
      (_forward_rows(k, nv, ctas), (words, bf16(t, 2 * f))),
      (_backward_rows(ctas), (bf16(t, f), words, bf16(t, k), bf16(t, k), bf16(t, k))),
    )
    groups += ((_select_forward_rows(k, nv, f), (bf16(t, 2 * f),)),)
    for n, (rows, specs) in enumerate(groups):
      for name, fn in rows.items():
        if name not in (BASE, "mgpu_pass"):  # (those two need a GPU for the selection)
          jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",))
          print(f"{label} {('fwd', 'bwd', 'select_fwd')[n]} {name}: lowered for CUDA")


if __name__ == "__main__":
  main()
