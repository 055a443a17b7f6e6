"""The Mosaic GPU radix select as decode's selection (`mgpu_select.select_partials`, opt-in
through `TopKConfig(selection='mgpu')` in a list-pipeline `DecodeConfig`): it sums the gate
GEMV's split partials as each row loads and selects exactly what the reference selects.
Interpret mode on the CPU (one CTA, its inline PTX replaced by jnp); lowered for CUDA on the
CPU; compiled on a Hopper GPU (marked `gpu`), where y must equal the Triton select's bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mgpu_select, moc_decode, reference, topk
from pallas_kernels._decode_config import LIST_TOPK

# The list pipeline with small blocks (several programs per token) selecting with Mosaic.
MOSAIC_LIST = moc_decode.DecodeConfig(
  gemv_block_f=32,
  gemv_block_d=16,
  gemv_splits=2,
  pipeline="list",
  list_rows=4,
  list_programs=8,
  list_block_d=32,
  t1_dot=True,
  topk=dataclasses.replace(topk.CHUNKED, selection="mgpu"),
)


def _seed() -> int:
  return time.time_ns() % (2**31)


def _integer_gate_ffn(seed: int, num_tokens: int, d_model: int, d_ff: int):
  """bf16 x, Wg (D × F), Wu^T, Wd (F × D) with integer x and Wg: G exact, with many ties."""
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.randint(ks[0], (num_tokens, d_model), -2, 3).astype(jnp.bfloat16)
  wg = jax.random.randint(ks[1], (d_model, d_ff), -2, 3).astype(jnp.bfloat16)
  wu = (jax.random.normal(ks[2], (d_ff, d_model)) * d_model**-0.5).astype(jnp.bfloat16)
  wd = (jax.random.normal(ks[3], (d_ff, d_model)) * d_ff**-0.5).astype(jnp.bfloat16)
  return x, wg, wu, wd


def _assert_close(y, want, seed: int) -> None:
  """Same dtype, every element written, within bf16 rounding of the reference."""
  a, b = np.asarray(y, np.float64), np.asarray(want, np.float64)
  assert y.dtype == want.dtype and np.isfinite(a).all()
  assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2, f"{seed=}"


@pytest.mark.parametrize(
  ("splits", "t", "d_ff", "k", "ties"),
  [(2, 1, 1000, 64, False), (1, 3, 1024, 128, True), (3, 2, 700, 8, True), (2, 4, 203, 56, True)],
)
def test_select_partials_matches_reference(splits, t, d_ff, k, ties):
  """Indices and rounded values equal the reference's top-K of Σ partials (in split order)
  rounded to bf16; the partials' padding columns hold NaN and are never selected."""
  seed = _seed()
  width = 1 << (d_ff - 1).bit_length()  # the gate GEMV pads its partial rows to a power of two
  key = jax.random.key(seed)
  if ties:  # sums exact in any order: many equal values at the threshold
    p = jax.random.randint(key, (splits, t, width), -3, 4).astype(jnp.float32) * 0.25
  else:
    p = jax.random.normal(key, (splits, t, width), jnp.float32)
  p = p.at[:, :, d_ff:].set(jnp.nan)
  g = functools.reduce(jnp.add, list(p[:, :, :d_ff])).astype(jnp.bfloat16)
  want_idx, want_val = reference.select(g, k, "moc")
  idx, val = mgpu_select.select_partials(p, k, d_ff, jnp.bfloat16, interpret=True)
  np.testing.assert_array_equal(idx, want_idx, err_msg=f"{seed=}")
  np.testing.assert_array_equal(
    np.asarray(val, np.float32), np.asarray(want_val, np.float32), err_msg=f"{seed=}"
  )


def test_select_partials_refuses_what_it_cannot_do():
  p = jnp.ones((2, 1, 256), jnp.float32)
  with pytest.raises(ValueError, match="fp32 partials"):
    mgpu_select.select_partials(p.astype(jnp.bfloat16), 16, 200, jnp.bfloat16, interpret=True)
  with pytest.raises(ValueError, match="at least 384 wide"):
    mgpu_select.select_partials(p, 16, 300, jnp.bfloat16, interpret=True)
  with pytest.raises(ValueError, match="bf16 or f16"):
    mgpu_select.select_partials(p, 16, 200, jnp.float32, interpret=True)
  with pytest.raises(ValueError, match="K % 8 == 0"):
    mgpu_select.select_partials(p, 12, 200, jnp.bfloat16, interpret=True)


@pytest.mark.parametrize(("num_tokens", "d_ff", "k"), [(1, 203, 40), (3, 171, 24), (4, 256, 128)])
def test_decode_ffn_through_mosaic_select_matches_reference(num_tokens, d_ff, k):
  """The whole decode FFN (gate GEMV partials -> Mosaic select -> rows kernel), bf16 with
  integer gates (exact G, many ties): the reference's y."""
  seed = _seed()
  x, wg, wu, wd = _integer_gate_ffn(seed, num_tokens, 48, d_ff)
  y = moc_decode.decode_ffn(x, wg, wu, wd, k, "moc", config=MOSAIC_LIST, interpret=True)
  _assert_close(y, reference.decode_ffn(x, wg, wu, wd, k, "moc"), seed)


@pytest.mark.parametrize(
  ("num_tokens", "d_ff", "k", "warm_from"), [(1, 203, 40, "rows"), (3, 171, 24, "select")]
)
def test_output_major_decode_through_mosaic_select(num_tokens, d_ff, k, warm_from):
  """The model's GPU path with the Mosaic select: the rowdot gate GEMV (norm inside) writes
  G in fp32 as the select's one partial, padded with zeros to whole warpgroups; the residual
  is added after the rows. With warm_from='rows' the rows kernel's programs run on one axis
  (here alone: interpret mode does not warm), with 'select' the select's (interpret mode has
  no warming CTAs): y is the same."""
  seed, d_model = _seed(), 48
  x, wg, wu, wd = _integer_gate_ffn(seed, num_tokens, d_model, d_ff)
  kr, kn = jax.random.split(jax.random.key(seed + 1))
  scale = jnp.ones((d_model,), jnp.float32)  # keeps the integer gates exact
  r = jax.random.normal(kr, x.shape, jnp.bfloat16)
  nxt = jax.random.normal(kn, (d_model, 96), jnp.bfloat16)
  cfg = dataclasses.replace(MOSAIC_LIST, warm_bytes=4096, warm_from=warm_from)
  kw = dict(interpret=True, output_major=True, norm=(scale, 1e-6), residual=r)
  y = moc_decode.decode_ffn(x, wg.T, wu, wd, k, "moc", config=cfg, warm=nxt, **kw)
  want = r + reference.decode_ffn(reference.rms_norm(x, scale, 1e-6), wg, wu, wd, k, "moc")
  _assert_close(y, want, seed)
  plain = dataclasses.replace(MOSAIC_LIST, warm_bytes=0)
  y0 = moc_decode.decode_ffn(x, wg.T, wu, wd, k, "moc", config=plain, **kw)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y0, np.float32))


def test_output_major_mosaic_with_rows_warming_lowers_for_cuda():
  """At the 1B shape: the Mosaic select without its bulk prefetch, and the rows kernel's
  launch with warming programs (`decode_rows_warm`), lowered for CUDA here."""
  cfg = dataclasses.replace(
    moc_decode.moc_config(1, 2048, 5464),
    topk=dataclasses.replace(LIST_TOPK, selection="mgpu"),
    warm_from="rows",
  )
  shapes = ((1, 2048), (5464, 2048), (5464, 2048), (6144, 2048))
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
  fn = lambda x, wg, wu, warm: moc_decode.decode_ffn(
    x, wg, wu, wu, 1024, "moc", config=cfg, interpret=False, warm=warm, output_major=True
  )
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and "decode_rows_warm" in text
  assert "cp.async.bulk.prefetch" not in text  # the select warms nothing now


def test_mosaic_select_is_opt_in_for_decode():
  """Decode's shipped top-K config stays Triton (faster end to end); 'mgpu' always takes
  Mosaic, 'auto' only where it can run (never in interpret mode or for K % 8 != 0)."""
  pick = functools.partial(moc_decode._mosaic_select, jnp.bfloat16, 5464, 1024, "moc")
  assert LIST_TOPK.selection == "triton" and not pick(LIST_TOPK, False)
  assert moc_decode.moc_config(1, 2048, 5464).topk == LIST_TOPK
  assert pick(dataclasses.replace(LIST_TOPK, selection="mgpu"), True)
  auto = dataclasses.replace(LIST_TOPK, selection="auto")
  assert not pick(auto, True)
  assert not moc_decode._mosaic_select(jnp.bfloat16, 5464, 1020, "moc", auto, False)
  assert not moc_decode._mosaic_select(jnp.bfloat16, 5464, 1024, "moc_2of8", auto, False)


def test_decode_ffn_through_mosaic_lowers_for_cuda():
  """The 1B decode shape at T = 1, split-K gate: the Mosaic select's custom call beside the
  Triton GEMV and rows kernels, lowered for CUDA here; with warm_from='select' the select
  takes the next weight (flat) for its warming CTAs, and the rows kernel warms nothing."""
  cfg = dataclasses.replace(
    moc_decode.moc_config(1, 2048, 5464), topk=dataclasses.replace(LIST_TOPK, selection="mgpu")
  )
  shapes = ((1, 2048), (2048, 5464), (5464, 2048), (2048, 6144))
  args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
  fn = lambda x, wg, wu, warm: moc_decode.decode_ffn(
    x, wg, wu, wu, 1024, "moc", config=cfg, interpret=False, warm=warm
  )
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text and "__gpu$xla.gpu.triton" in text
  assert cfg.warm_from == "select" and cfg.warm_bytes and "decode_rows_warm" not in text
  assert f"tensor<{2048 * 6144}xbf16>" in text  # the next weight, flat, into the select


@pytest.mark.gpu
@pytest.mark.parametrize(("num_tokens", "warm"), [(1, False), (1, True), (4, True)])
def test_decode_ffn_mosaic_select_gpu_equals_triton(num_tokens, warm):
  """Compiled at the 1B decode shape: the Mosaic select (with or without its own CTAs
  prefetching a next weight into L2) picks the channels and values the Triton select picks:
  y is the same bit for bit."""
  d_model, d_ff, k = 2048, 5464, 1024
  cfg = moc_decode.moc_config(num_tokens, d_model, d_ff)
  mosaic = dataclasses.replace(cfg, topk=dataclasses.replace(cfg.topk, selection="mgpu"))
  seed = _seed()
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (num_tokens, d_model), jnp.bfloat16)
  wg = (jax.random.normal(ks[1], (d_model, d_ff)) * d_model**-0.5).astype(jnp.bfloat16)
  wu = (jax.random.normal(ks[2], (d_ff, d_model)) * d_model**-0.5).astype(jnp.bfloat16)
  wd = (jax.random.normal(ks[3], (d_ff, d_model)) * d_ff**-0.5).astype(jnp.bfloat16)
  nxt = jax.random.normal(ks[0], (d_model, 3 * d_model), jnp.bfloat16) if warm else None
  y = moc_decode.decode_ffn(x, wg, wu, wd, k, "moc", config=mosaic, warm=nxt)  # nxt: L2 only
  y_triton = moc_decode.decode_ffn(x, wg, wu, wd, k, "moc", config=cfg)
  np.testing.assert_array_equal(
    np.asarray(y, np.float32), np.asarray(y_triton, np.float32), err_msg=f"{seed=}"
  )


@pytest.mark.gpu
def test_output_major_mosaic_select_with_rows_warming_gpu():
  """Compiled at the 1B decode shape, T = 1, on the model's GPU path (rowdot gate with the
  norm, residual): the Mosaic select with the rows kernel warming the next weight gives the
  Triton select's y bit for bit."""
  d_model, d_ff, k = 2048, 5464, 1024
  cfg = moc_decode.moc_config(1, d_model, d_ff)
  mosaic = dataclasses.replace(
    cfg, topk=dataclasses.replace(cfg.topk, selection="mgpu"), warm_from="rows"
  )
  seed = _seed()
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (1, d_model), jnp.bfloat16)
  wg_t = (jax.random.normal(ks[1], (d_ff, d_model)) * d_model**-0.5).astype(jnp.bfloat16)
  wu = (jax.random.normal(ks[2], (d_ff, d_model)) * d_model**-0.5).astype(jnp.bfloat16)
  wd = (jax.random.normal(ks[3], (d_ff, d_model)) * d_ff**-0.5).astype(jnp.bfloat16)
  nxt = jax.random.normal(ks[4], (3 * d_model, d_model), jnp.bfloat16)
  kw = dict(output_major=True, norm=(jnp.ones((d_model,), jnp.float32), 1e-6), residual=x)
  y = moc_decode.decode_ffn(x, wg_t, wu, wd, k, "moc", config=mosaic, warm=nxt, **kw)
  y_triton = moc_decode.decode_ffn(x, wg_t, wu, wd, k, "moc", config=cfg, warm=nxt, **kw)
  np.testing.assert_array_equal(
    np.asarray(y, np.float32), np.asarray(y_triton, np.float32), err_msg=f"{seed=}"
  )


def test_probe_decode_rows_check_the_mosaic_select_against_triton(monkeypatch):
  """`mgpu_select_probe`'s decode rows on this CPU (both selects in interpret mode, timing
  stubbed): each Mosaic form is checked against the Triton select before it is timed."""
  import types

  from benchmarks import mgpu_select_probe
  from pallas_kernels import _decode_select

  select, from_partials = mgpu_select.select_partials, _decode_select.topk_from_partials
  monkeypatch.setattr(
    mgpu_select, "select_partials", lambda *a, **k: select(*a, **{**k, "interpret": True})
  )
  monkeypatch.setattr(
    _decode_select,
    "topk_from_partials",
    lambda p, k, f, dtype, cfg, interpret, *rest: from_partials(p, k, f, dtype, cfg, True, *rest),
  )
  monkeypatch.setattr(
    mgpu_select_probe.common, "time_interleaved", lambda fns, sets, **kw: {n: [1.0] for n in fns}
  )
  args = types.SimpleNamespace(t=2, f=640, k=64, device_time=False, trials=1)
  g = jax.random.normal(jax.random.key(_seed()), (2, 640)).astype(jnp.bfloat16)
  rows = mgpu_select_probe._decode_partials(args, g)
  assert set(rows) == {"decode_topk_partials", "mgpu_topk_partials"}
  assert all(rows[n]["exact_vs_triton"] and "median_us" in rows[n] for n in rows if "mgpu" in n)


@pytest.mark.parametrize("usable", [True, False])
def test_decode_ffn_mgpu_phase_times_the_mosaic_select_beside_the_default(monkeypatch, usable):
  """`decode_ffn.py --phases mgpu1`: where the Mosaic select can run, a `moc_kernel[mgpu]` row
  selects with it beside the default (Triton) row; elsewhere the phase has no Mosaic row."""
  from benchmarks import decode_ffn

  monkeypatch.setattr(mgpu_select, "usable", lambda *a: usable)
  rows = decode_ffn.methods_for(2048, 5464, 1024, 1, "moc", False, frozenset({"mgpu"}))
  assert rows["moc_kernel[default]"][1].topk.selection == "triton"
  assert ("moc_kernel[mgpu]" in rows) == usable
  if usable:
    assert rows["moc_kernel[mgpu]"][1].topk.selection == "mgpu"
