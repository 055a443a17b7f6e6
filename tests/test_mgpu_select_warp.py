"""The warp-per-row select for narrow rows (`pallas_kernels/mgpu_select_warp.py`): no interpret
form (one PTX block a row), so a CPU checks that its PTX assembles, that the kernel lowers and
that the train forward's selection routes rows of at most 2048 channels to it; a GPU that it
selects what the reference selects, alone and inside the train forward."""

import dataclasses
import itertools
import re
import time

import _ptxas
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _spies import record_calls

from benchmarks import mgpu_select_probe
from pallas_kernels import mgpu_select, mgpu_select_warp, moc_train, moc_train_mask, topk_compact


@pytest.mark.skipif(_ptxas.path() is None, reason="no ptxas on this machine")
@pytest.mark.parametrize(
  ("f", "k", "num_valid"), [(1408, 256, 1376), (2048, 384, 2048), (640, 64, 600)]
)
def test_warp_select_ptx_assembles_for_hopper(tmp_path, f, k, num_valid):
  """The row's PTX, its operands bound to registers, assembles for sm_90a without spilling."""
  text = mgpu_select_warp.row_ptx(16384, f, k, num_valid, f, 1056)
  done = _ptxas.assemble(_ptxas.bind(text, ["b64", "b64", "b32", "b32", "b32"], "a"), tmp_path)
  assert done.returncode == 0, done.stderr
  assert "0 bytes spill stores" in done.stderr, done.stderr


def test_warp_select_lowers_and_refuses_what_it_cannot_do(capsys):
  mgpu_select_probe.main(
    ["--lower_only", "--t=8", "--ctas=2", "--f=1408", "--k=256", "--num_valid=1376"]
  )
  assert "mgpu_select_warp: lowered for CUDA" in capsys.readouterr().out
  for f, k, nv in ((2080, 64, None), (1400, 64, None), (1408, 0, None), (1408, 300, 200)):
    with pytest.raises(ValueError, match="warp-per-row"):
      mgpu_select_warp.kernel(8, f, k, 2, nv)


@pytest.mark.gpu
@pytest.mark.parametrize(("f", "k", "num_valid"), [(1408, 256, 1376), (2048, 384, None)])
def test_warp_select_gpu_real_size(f, k, num_valid):
  """Compiled on the GPU: the 60m and 130m layers' words (Gaussian and tie-heavy rows, and
  padding channels), as the reference selects; T not a multiple of the rows in flight."""

  seed = time.time_ns() % (2**31)
  keys = jax.random.split(jax.random.key(seed), 2)
  g = jax.random.normal(keys[0], (16383, f)).astype(jnp.bfloat16)
  ties = jax.random.randint(keys[1], (16383, f), -3, 4).astype(jnp.bfloat16)
  for x in (g, ties):
    words = mgpu_select_warp.words(x, k, num_valid=num_valid)
    want = mgpu_select_probe.reference_words(x, k, num_valid)
    assert np.array_equal(np.asarray(words), want), f"{seed=}"


def _spy(monkeypatch, module, name: str) -> list:
  """Calls of module.name recorded (G's shape, width) and answered with zeros of the words'
  shape: which kernel the selection routes to, on a CPU that runs neither."""
  calls = []

  def fake(g2, k, *, num_valid=None, width=None, **kw):
    calls.append((g2.shape, width))
    return jnp.zeros((g2.shape[0], (width or g2.shape[1]) // 32), jnp.int32)

  monkeypatch.setattr(module, name, fake)
  return calls


def test_compiled_narrow_rows_route_to_the_warp_select(monkeypatch):
  """Where the Mosaic select is chosen and compiled (a stand-in Hopper GPU here), the words
  (`topk_compact.mask_call`, the train forward's selection) for rows of at most 2048 channels
  come from the warp-per-row select (the fused [G | U] buffer read in place), wider rows from
  the warpgroup select; with `warp_rows=False` every width takes the warpgroup select."""
  monkeypatch.setattr(mgpu_select, "usable", lambda dtype, f, interpret: True)
  warp = _spy(monkeypatch, mgpu_select_warp, "words")
  group = _spy(monkeypatch, mgpu_select, "words")
  cfg = moc_train.forward_config(1408)
  assert cfg.selection == "auto" and cfg.warp_rows
  for f in (1408, 2048, 2176):
    gu = jnp.ones((4, 2 * f), jnp.bfloat16)
    topk_compact.mask_call(gu, 64, "moc", cfg, False, num_valid=f - 32, width=f)
  assert warp == [((4, 2816), 1408), ((4, 4096), 2048)] and group == [((4, 4352), 2176)]
  cfg = dataclasses.replace(cfg, warp_rows=False)
  topk_compact.mask_call(jnp.ones((4, 1536), jnp.bfloat16), 64, "moc", cfg, False, width=768)
  assert len(warp) == 2 and group[-1] == ((4, 1536), 768)


@pytest.mark.gpu
def test_train_forward_at_60m_on_gpu_selects_as_the_reference(monkeypatch):
  """On a Hopper GPU the defaults' train forward at the 60m layer (fused [G | U], 1376 of 1408
  channels valid) runs `in_select` (the select writing the pass, since 2026-12-05o); with the
  Triton pass after the select ('gather') its words come from the warp-per-row select. Both
  words are the reference's."""
  from pallas_kernels import mgpu_apply

  calls = record_calls(monkeypatch, (mgpu_select_warp, "words"), (mgpu_apply, "in_select"))
  seed = time.time_ns() % (2**31)
  gu = jax.random.normal(jax.random.key(seed), (16384, 2 * 1408)).astype(jnp.bfloat16)
  want = mgpu_select_probe.reference_words(gu[:, :1408], 256, 1376)
  out = moc_train_mask.train_forward_bitmask(gu, None, 256, num_valid=1376)
  assert calls == ["in_select"]
  assert np.array_equal(np.asarray(out[0]), want), f"{seed=}"
  gather = dataclasses.replace(moc_train.forward_config(1408), apply_mode="gather")
  out = moc_train_mask.train_forward_bitmask(gu, None, 256, num_valid=1376, config=gather)
  assert calls == ["in_select", "words"]
  assert np.array_equal(np.asarray(out[0]), want), f"{seed=}"


@pytest.mark.skipif(_ptxas.path() is None, reason="no ptxas on this machine")
@pytest.mark.parametrize(
  ("f", "k", "num_valid", "z_sel"),
  [(1408, 256, 1376, True), (2048, 384, 2048, False), (640, 64, 600, True)],
)
def test_warp_in_select_ptx_assembles_for_hopper(tmp_path, f, k, num_valid, z_sel):
  """The row's PTX with the train forward after its words, operands bound, assembles for
  sm_90a without spilling (bf16 and f16, g reloaded or turned back from the key); reloading
  g takes fewer registers."""
  registers = {}
  for dtype, reload_g in itertools.product((jnp.bfloat16, jnp.float16), (True, False)):
    forward = mgpu_select_warp.forward_ptx(f, k, num_valid, dtype, z_sel, reload_g)
    text = mgpu_select_warp.row_ptx(16384, f, k, num_valid, 2 * f, 1056, forward)
    operands = ["b64", "b64", "b32", "b32", "b32"] + ["b64"] * (3 + z_sel)
    done = _ptxas.assemble(_ptxas.bind(text, operands, "a"), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "0 bytes spill stores" in done.stderr, done.stderr
    registers[dtype, reload_g] = int(re.search(r"Used (\d+) registers", done.stderr).group(1))
  for dtype in (jnp.bfloat16, jnp.float16):  # g reloaded: the keys die after the words
    assert registers[dtype, True] < registers[dtype, False], registers


def test_warp_in_select_lowers_and_refuses_what_it_cannot_do():
  """It lowers for CUDA under its own kernel name; it takes only the fused 16-bit [G | U]
  buffer and 'moc', and has no interpret mode."""
  gu = jax.ShapeDtypeStruct((8, 2 * 1408), jnp.bfloat16)
  for z_sel in (False, True):
    fn = lambda gu, z_sel=z_sel: mgpu_select_warp.in_select(
      gu, 256, num_valid=1376, z_sel=z_sel, ctas=2
    )
    text = jax.jit(fn).trace(gu).lower(lowering_platforms=("cuda",)).as_text()
    assert "moc_select_warp_forward" in text
  with pytest.raises(ValueError, match="bf16 or f16"):
    mgpu_select_warp.kernel(8, 1408, 256, 2, width=2816, forward_dtype=jnp.float32)
  with pytest.raises(ValueError, match="2F"):
    mgpu_select_warp.kernel(8, 1408, 256, 2, width=1408, forward_dtype=jnp.bfloat16)
  cfg = dataclasses.replace(moc_train.forward_config(1408), apply_mode="in_select_warp")
  g = jnp.ones((4, 1408), jnp.bfloat16)
  with pytest.raises(ValueError, match="interpret"):
    moc_train_mask.train_forward_bitmask(jnp.concatenate([g, g], 1), None, 64, config=cfg)
  with pytest.raises(ValueError, match="fused"):
    moc_train_mask.train_forward_bitmask(g, g, 64, config=cfg)


@pytest.mark.gpu
@pytest.mark.parametrize(("f", "k", "num_valid"), [(1408, 256, 1376), (2048, 384, None)])
def test_warp_in_select_gpu_equals_the_gathered_pass(f, k, num_valid):
  """Compiled on the GPU (16383 rows of the 60m and 130m layers, Gaussian and tie-heavy, with
  Z_sel and without; g reloaded, the default, and turned back from the keys): words and
  outputs bit for bit those of the select and the Triton gather."""
  seed = time.time_ns() % (2**31)
  keys = jax.random.split(jax.random.key(seed), 3)
  u = jax.random.normal(keys[2], (16383, f)).astype(jnp.bfloat16)
  gauss = jax.random.normal(keys[0], (16383, f)).astype(jnp.bfloat16)
  ties = jax.random.randint(keys[1], (16383, f), -3, 4).astype(jnp.bfloat16)
  cfg = moc_train.forward_config(f)
  gather, warp = (dataclasses.replace(cfg, apply_mode=m) for m in ("gather", "in_select_warp"))
  for g in (gauss, ties):
    gu = jnp.concatenate([g, u], axis=1)
    for z_sel in (True, False):
      kw = dict(num_valid=num_valid, z_sel=z_sel)
      want = moc_train_mask.train_forward_bitmask(gu, None, k, config=gather, **kw)
      got = moc_train_mask.train_forward_bitmask(gu, None, k, config=warp, **kw)
      keys = mgpu_select_warp.in_select(gu, k, reload_g=False, **kw)  # g from the keys
      for a, b, c in zip(want, got, keys, strict=True):
        assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)), f"{seed=}"
        assert np.array_equal(np.asarray(a, np.float32), np.asarray(c, np.float32)), f"{seed=}"
