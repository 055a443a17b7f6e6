"""The MoC train epilogues' streaming passes, side by side: how each way of walking the bitmask
compares with XLA's own elementwise passes over the same bytes.

  python benchmarks/stream_sweep.py --out benchmarks/results/stream_sweep_h200_DATE.json

Per shape (by default every preset's layer: 1B, 16384 x 5504 with 5461 real channels and
K=1024, 60M, 130M (no padding channel) and 350M), on
fresh random bf16 inputs: the selection bitmask (`topk_compact.mask_call`, the forward default,
then each of SELECTIONS, whose words must equal the first's bit for bit), the whole forward
epilogue as two kernels and as one (EPILOGUES, indices out, each equal to the first), then every
`StreamConfig` below for the forward pass (`apply_call`: G, U -> G_sel, U_sel, Z, Z_sel) and
the backward (`train_backward_bitmask`, with Z_sel (MoC) and without (GCP)). Each
variant's outputs must equal the default walk's bit for bit. Floors in the same run: an XLA
copy, dense SwiGLU's forward fusion silu(G)*U and its backward (dZ, G, U -> dG, dU). Bytes are
what each pass must move; GB/s is bytes / median time.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from benchmarks import common
from pallas_kernels import _triton_utils as tu
from pallas_kernels import moc_train, moc_train_mask, topk, topk_compact
from pallas_kernels._topk_config import TopKConfig

SC = moc_train_mask.StreamConfig
VARIANTS: dict[str, SC] = {
  "row_w32": SC(32, 4, "row"),  # the forward's default
  "block_w16": SC(16, 4, "block"),  # the backward's default
  "row_w16": SC(16, 4, "row"),
  "block_w32": SC(32, 4, "block"),
  "block_w16_a2": SC(16, 2, "block"),
  "block_w8_a2": SC(8, 2, "block"),
  # both passes as Mosaic GPU kernels (`mgpu_apply`, `mgpu_backward`: rows by bulk copy, only
  # the selected keys computed; the defaults' 'auto' on Hopper since 2026-12-05o, the forward's
  # on the fused buffer); F % 128 == 0 only. Here G and U are split
  "mgpu": SC(32, 4, "mgpu"),
  # Measured slower in every pass (stream_sweep_h200_20261202.json): every block's loads
  # first ('prefetch', removed), 8 warps per 1024- or 2048-channel block; 2 or 4 rows per
  # program, in either walk (stream_sweep_h200_20261203i.json, code at 9dc81ef); each word's
  # slot base by XLA beforehand, in a flat layout ('prefix', blocks of 8-64 words: forward
  # 438-511 us vs 313 at 1B, backward 370 vs 353; stream_sweep_h200_20261203l.json, code at
  # 2f85434) or in the walks' own (within the spread: forward 319 vs 310 at 1B, 166 vs 179 at
  # 350M, backward 342 vs 347 at 1B; stream_sweep_h200_20261203o.json, code at 1feb56e).
}
# The forward pass with its slots filled in order by a search and gathered (`_apply_gather`)
# instead of scattered: (words per Z block, warps). 32 words on 16 warps took 518 us at the 1B
# shape vs 294 on 8 (stream_sweep_h200_20261203q.json; dropped).
GATHERS: dict[str, TopKConfig] = {
  f"gather_w{w}_{a}w": TopKConfig(apply_mode="gather", apply_words=w, apply_warps=a)
  for w, a in ((32, 4), (16, 4), (32, 8), (16, 8), (64, 8))
}
# 512 or 1024 slots searched per step (`gather_slots`) lost to 256 at every preset
# (stream_sweep_slots_h200_20261204.json; rows removed).
_FWD = dataclasses.replace(moc_train.FORWARD_DEFAULT, selection="triton")  # these rows' kernel
# The selection bitmask kernel's final pass and search, each as a change to the forward's
# default; each must give the first one's words. With the words addressed by offset none beat
# the default (4 warps: mask_cut) at the 1B shape: w2 273, ternary 285, c1024 293, c256 299,
# vectorized 408 vs 278 us; below 4096 channels only c256 came near the 2-warp default
# (stream_sweep_h200_20261203p.json). 8 warps and 1024-wide chunks lost everywhere
# in stream_sweep_h200_20261203c.json (dropped).
SELECTIONS: dict[str, TopKConfig] = {
  "mask_cut": _FWD,  # the default (the final passes that lost to its tie cut are gone)
  # with the words addressed by offset, re-check layouts and chunk widths that lost before it
  "mask_cut_vectorized": dataclasses.replace(_FWD, strided=False),
  "mask_cut_c1024": dataclasses.replace(_FWD, chunk=1024),
  "mask_cut_c256": dataclasses.replace(_FWD, chunk=256),
  "mask_cut_all_keys": dataclasses.replace(_FWD, gauss_margin=0.0),
  "mask_cut_t": dataclasses.replace(_FWD, fan=2),
  "mask_cut_g05": dataclasses.replace(_FWD, gauss_margin=0.05),
  "mask_cut_g25": dataclasses.replace(_FWD, gauss_margin=0.25),
  # 2 warps: 4-14% faster below 4096 channels, 2% slower at the 1B shape (`forward_config`);
  # 1 warp, 2-4 rows per program, 8 warps lost (stream_sweep_h200_20261203{i,j}.json).
  "mask_cut_w2": dataclasses.replace(_FWD, num_warps=2),
  # the Mosaic GPU radix select's words: its first version 428.0 vs 271.2 us (mask_cut) at the
  # 1B shape, with warp-aggregated atomics 1292.6 (dropped): stream_sweep_h200_20261204b.json
  "mask_mgpu": dataclasses.replace(_FWD, selection="mgpu"),
}
# The whole forward epilogue with indices (`moc_train.train_forward_epilogue`): the two-kernel
# default (selection bitmask, then the streaming pass) vs the one-kernel form (selection,
# U loads and every store in one pass), which lost at every preset's width: 60M 189-225 vs
# 174 us, 1B 1041-1131 vs 584 (stream_sweep_h200_20261203k.json).
EPILOGUES: dict[str, Callable[[int], TopKConfig]] = {
  "epi_two_kernels": moc_train.forward_config,
  "epi_one_kernel": lambda f: dataclasses.replace(moc_train.forward_config(f), compact=False),
  "epi_one_kernel_w4": lambda f: dataclasses.replace(
    moc_train.forward_config(f), compact=False, num_warps=4
  ),
  "epi_one_kernel_all_keys": lambda f: dataclasses.replace(
    moc_train.forward_config(f), compact=False, gauss_margin=0.0
  ),
}


def _one_of_three_scatters():
  """A stand-in for `tu.scatter_store` that stores only every third call: the forward walk
  with Z_sel makes three per block (G_sel, U_sel, Z_sel), so one of them stays."""
  calls = iter(range(1 << 30))
  real = tu.scatter_store
  return lambda *a, **kw: real(*a, **kw) if next(calls) % 3 == 0 else None


def _count_instead_of_words(m_ref, rows_b, cols_b, sel, *, t, f, ballot=False, off=None):
  """A stand-in for `topk_compact._store_words`: each chunk stores its selected count at the
  row's word 0 instead of packing words (the tie masks stay live, the packing goes)."""
  del ballot, off
  row = jnp.min(rows_b, axis=1)
  cnt = jnp.sum(sel.astype(jnp.int32), axis=1)
  topk_compact.pltriton.store(m_ref.at[row, jnp.zeros_like(row)], cnt, mask=row < t)


def _ties_all(ckeys, v, need):
  """A stand-in for `topk.tie_masks`: keep every key equal to v (no counts, no cut)."""
  del need
  for ckey in ckeys:
    yield ckey == v


def _slots_without_scan():
  """A stand-in for `topk_compact._expand_words` whose slots are channel // 8 (in [0, K) at
  every preset, K >= F/8): the scan and carry behind the real slots go dead, the stores stay."""
  real = topk_compact._expand_words

  def expand(*a, **kw):
    (rows_b, cols_b, ok, sel, _), carry = real(*a, **kw)
    return (rows_b, cols_b, ok, sel, lax.shift_right_logical(cols_b, 3)), carry

  return expand


# Timing-only ablations (outputs not exact): (what is patched while the variant is traced,
# the pass it changes). Where the selection's and the forward walk's time goes: the search
# loop skipped (load, stats, guess check, final pass and stores only) or cut to one pass; the
# forward row walk without its slot scatters (Z and the word expansion only) or with one.
# The 'sel' ones patch the Triton selection, so they run it whatever the default picks (on
# Hopper the Mosaic select, which none of them would touch).
ABLATIONS: dict[str, tuple[Callable, str]] = {
  "abl_sel_no_search": (
    lambda: mock.patch.object(topk.lax, "while_loop", lambda c, b, s: s),
    "sel",
  ),
  "abl_sel_one_pass": (
    lambda: mock.patch.object(topk.lax, "while_loop", lambda c, b, s: b(s)),
    "sel",
  ),
  "abl_sel_no_packing": (
    lambda: mock.patch.object(topk_compact, "_store_words", _count_instead_of_words),
    "sel",
  ),
  "abl_sel_no_ties": (lambda: mock.patch.object(topk, "tie_masks", _ties_all), "sel"),
  "abl_fwd_no_scatter": (
    lambda: mock.patch.object(tu, "scatter_store", lambda *a, **kw: None),
    "fwd",
  ),
  "abl_fwd_no_scan": (
    lambda: mock.patch.object(topk_compact, "_expand_words", _slots_without_scan()),
    "fwd",
  ),
  "abl_fwd_one_scatter": (
    lambda: mock.patch.object(tu, "scatter_store", _one_of_three_scatters()),
    "fwd",
  ),
}
# label: ((T, F, num_valid, K) on the GPU, the same for --dry_run): the 1B, 60M, 130M (no
# padding channel) and 350M layers; 130m_pad has one padding channel, to tell a cost of F = 2048
# from a cost of a row without padding; f5632 and 60m_nopad are more rows without padding.
SHAPES = {
  "1b": ((16384, 5504, 5461, 1024), (64, 320, 300, 40)),
  "60m": ((16384, 1408, 1376, 256), (32, 128, 125, 16)),
  "130m": ((16384, 2048, 2048, 384), (32, 256, 256, 48)),
  "130m_pad": ((16384, 2048, 2047, 384), (32, 256, 255, 48)),
  "350m": ((16384, 2816, 2736, 512), (32, 384, 370, 64)),
  "f5632": ((16384, 5632, 5632, 1024), (32, 384, 384, 64)),
  "60m_nopad": ((16384, 1408, 1408, 256), (32, 128, 128, 16)),
}


def _inputs(t: int, f: int, seed: int):
  ks = jax.random.split(jax.random.key(seed), 3)
  return [jax.random.normal(k, (t, f), jnp.float32).astype(jnp.bfloat16) for k in ks]


def _swiglu(g, u):
  return jax.nn.silu(g) * u


def _pallas_silu_mul(g, u, *, rows: int, warps: int, interpret: bool):
  """silu(G) * U as the plainest Pallas-Triton kernel: the flat tensors as (N/1024, 1024), one
  (rows, 1024) block per program. A floor for what Pallas streams at, beside XLA's fusion."""
  from jax.experimental import pallas as pl

  n = g.size
  if n % (rows * 1024):
    raise ValueError(f"{g.shape}: not a multiple of {rows} x 1024 elements")
  g2, u2 = g.reshape(n // 1024, 1024), u.reshape(n // 1024, 1024)

  def kernel(g_ref, u_ref, z_ref):
    z_ref[...] = moc_train_mask.silu_mul(g_ref[...], u_ref[...], z_ref.dtype)

  spec = pl.BlockSpec((rows, 1024), lambda i: (i, 0))
  z = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct(g2.shape, g.dtype),
    grid=(n // 1024 // rows,),
    in_specs=[spec, spec],
    out_specs=spec,
    compiler_params=tu.compiler_params(warps),
    interpret=interpret,
  )(g2, u2)
  return z.reshape(g.shape)


def _same(a, b) -> bool:
  return all(
    np.array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def _row(name, fn, sets, nbytes, ref=None, **timing) -> dict:
  try:
    out = jax.block_until_ready(fn(*sets[0]))
    row = {"name": name, "exact": None if ref is None else _same(out, ref)}
    row["us"] = common.time_fn(fn, arg_sets=sets, **timing)["median_us"]
  except Exception as e:  # one failing variant is reported; the rest still run
    print(f"{name}: {type(e).__name__}: {str(e)[:400]}", flush=True)
    return {"name": name, "error": f"{type(e).__name__}: {str(e)[:400]}"}
  row["gb_s"] = nbytes / row["us"] / 1e3
  print(f"{name:28s} {row['us']:9.1f} us {row['gb_s']:7.0f} GB/s exact={row['exact']}", flush=True)
  return row, out


def shape_rows(label: str, t: int, f: int, nv: int, k: int, interpret: bool, timing) -> dict:
  e = 2  # bf16 bytes
  dense, compact, words = t * f * e, t * k * e, t * -(-f // 32) * 4
  sets = [tuple(_inputs(t, f, s)) for s in (0, 1)]
  cfg = moc_train.forward_config(f)
  mask = jax.jit(lambda g: topk_compact.mask_call(g, k, "moc", cfg, interpret, num_valid=nv))
  res: dict = {"shape": dict(T=t, F=f, num_valid=nv, K=k), "floors": [], "forward": [], "bwd": []}

  def keep(bucket, got):
    res[bucket].append(got[0] if isinstance(got, tuple) else got)
    return got[1] if isinstance(got, tuple) else None

  floors = {
    "xla_copy": (lambda g, u, dz: g + jnp.bfloat16(1), 2 * dense),
    "xla_silu_mul": (lambda g, u, dz: moc_train_mask.silu_mul(g, u, g.dtype), 3 * dense),
    "xla_dense_bwd": (lambda g, u, dz: jax.vjp(_swiglu, g, u)[1](dz), 5 * dense),
  }
  for rows, warps in ((4, 4), (8, 4), (16, 8)):
    fn = functools.partial(_pallas_silu_mul, rows=rows, warps=warps, interpret=interpret)
    floors[f"pallas_silu_mul_r{rows}w{warps}"] = (lambda g, u, dz, fn=fn: fn(g, u), 3 * dense)
  for name, (fn, nbytes) in floors.items():
    keep("floors", _row(name, jax.jit(fn), sets, nbytes, **timing))
  keep("floors", _row("mask_default", lambda g, u, dz: mask(g), sets, dense + words, **timing))

  def compare(bucket: str, fns: dict, nbytes: int) -> None:
    """Time each (g, u, dz) function; the first one's outputs are what the others must equal."""
    res[bucket], ref = [], None
    for name, fn in fns.items():
      got = _row(name, jax.jit(fn), sets, nbytes, ref, **timing)
      ref = got[1] if ref is None and isinstance(got, tuple) else ref
      keep(bucket, got)

  select = lambda c: (
    lambda g, u, dz: topk_compact.mask_call(g, k, "moc", c, interpret, num_valid=nv)
  )
  compare("selection", {name: select(c) for name, c in SELECTIONS.items()}, dense + words)
  msets = [(mask(g), g, u, dz) for g, u, dz in sets]
  fwd_bytes = 3 * dense + words + 3 * compact
  forward = lambda c: (
    lambda m, g, u, dz: moc_train_mask.apply_call(
      m, g, u, k, num_valid=nv, cfg=c, interpret=interpret, z_sel=True
    )
  )
  res["ablations"] = []
  triton = dataclasses.replace(cfg, selection="triton")  # what the 'sel' ablations patch
  for name, (patch, target) in ABLATIONS.items():
    fn, args, nbytes = (
      (select(triton), sets, dense + words) if target == "sel" else (forward(cfg), msets, fwd_bytes)
    )
    with patch():
      keep("ablations", _row(name, jax.jit(fn), args, nbytes, **timing))
  epilogue = lambda c: (
    lambda g, u, dz: moc_train.train_forward_epilogue(
      g, u, k, num_valid=nv, config=c, interpret=interpret
    )
  )
  epilogues = {name: epilogue(cfg_of(f)) for name, cfg_of in EPILOGUES.items()}
  compare("epilogue", epilogues, 3 * dense + 4 * t * k + 2 * compact)
  bwd_bytes = {True: 4 * dense + words + 3 * compact, False: 4 * dense + words + 2 * compact}
  ref_f, ref_b = None, {}
  for name, sc in VARIANTS.items():
    fwd = jax.jit(
      forward(TopKConfig(apply_words=sc.words, apply_warps=sc.warps, apply_mode=sc.mode))
    )
    out = keep("forward", _row(f"fwd_{name}", fwd, msets, fwd_bytes, ref_f, **timing))
    ref_f = out if ref_f is None else ref_f
    if out is None:
      continue
    for keep_z in (True, False):
      bsets = []
      for m, g, u, dz in msets:
        gs, us, _, zs = fwd(m, g, u, dz)
        bsets.append((dz, m, gs, us, zs if keep_z else None))
      bwd = jax.jit(
        lambda dz, m, gs, us, zs, c=sc: moc_train_mask.train_backward_bitmask(
          dz, m, gs, us, zs, config=c, interpret=interpret
        )
      )
      tag = "moc" if keep_z else "gcp"
      got = _row(f"bwd_{tag}_{name}", bwd, bsets, bwd_bytes[keep_z], ref_b.get(keep_z), **timing)
      out_b = keep("bwd", got)
      ref_b.setdefault(keep_z, out_b)
  for name, tcfg in GATHERS.items():  # forward only; must equal the first walk's outputs
    fwd = jax.jit(forward(tcfg))
    out = keep("forward", _row(f"fwd_{name}", fwd, msets, fwd_bytes, ref_f, **timing))
    ref_f = out if ref_f is None else ref_f
  res["copy_gb_s"] = res["floors"][0].get("gb_s")
  return res


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default="")
  p.add_argument("--shapes", default="1b,60m,130m,350m", help="of SHAPES: every preset by default")
  p.add_argument("--only", default="", help="VARIANTS names, comma-separated (first: reference)")
  p.add_argument("--no_walks", action="store_true", help="skip the streaming walks")
  p.add_argument("--no_gathers", action="store_true", help="skip the GATHERS forward rows")
  p.add_argument("--selections", default="", help="SELECTIONS names, comma-separated")
  p.add_argument("--no_epilogues", action="store_true", help="skip the EPILOGUES rows")
  p.add_argument("--no_ablations", action="store_true", help="skip the ABLATIONS rows")
  p.add_argument("--dry_run", action="store_true", help="tiny shapes in interpret mode (CPU)")
  args = p.parse_args(argv)
  if args.only:
    keep = args.only.split(",")
    for name in list(VARIANTS):
      if name not in keep:
        del VARIANTS[name]
  if args.no_walks:
    VARIANTS.clear()
    GATHERS.clear()
  if args.no_gathers:
    GATHERS.clear()
  if args.no_ablations:
    ABLATIONS.clear()
  if args.no_epilogues:
    EPILOGUES.clear()
  if args.selections:
    unknown = set(args.selections.split(",")) - set(SELECTIONS)
    if unknown:
      p.error(f"unknown selections {sorted(unknown)}; choose from {sorted(SELECTIONS)}")
    for name in list(SELECTIONS):
      if name not in args.selections.split(","):
        del SELECTIONS[name]
  interpret = tu.default_interpret(None) or args.dry_run
  timing = dict(inner=1, trials=1, warmup=1) if args.dry_run else dict(inner=10, trials=7)
  payload = {"info": common.run_info(), "variants": {n: str(v) for n, v in VARIANTS.items()}}
  payload["shapes"] = {}
  for label in args.shapes.split(","):
    t, f, nv, k = SHAPES[label][args.dry_run]
    print(f"== {label}: T={t} F={f} num_valid={nv} K={k}", flush=True)
    payload["shapes"][label] = shape_rows(label, t, f, nv, k, interpret, timing)
    if args.out:
      common.write_json(args.out, payload)


if __name__ == "__main__":
  main()
