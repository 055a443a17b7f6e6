"""The train forward's streaming pass as Mosaic GPU kernels (`_mgpu_stream`, `mgpu_apply`: the
pass after the select, and `in_select`, the select writing it), the 'auto' modes that take
them and the probe that times them (the backward's kernel: test_mgpu_backward.py). In
interpret mode (one CTA, the PTX ops as jnp) each gives the Triton pass's outputs bit for bit;
each lowers for CUDA here and its inline PTX assembles for sm_90a; on a GPU each equals the
Triton pass at the 1B and 60m layer shapes."""

import dataclasses
import time

import _ptx_arith
import _ptxas
import jax
import jax.numpy as jnp
import pytest
from _spies import record_calls
from _stream_checks import assert_near, assert_same, bf16_bits, gate_values, inputs, residuals

from pallas_kernels import (
  _mgpu_compact,
  _mgpu_stream,
  mgpu_apply,
  mgpu_backward,
  moc_train,
  topk_compact,
)
from pallas_kernels import moc_train_mask as mm
from pallas_kernels._topk_config import TopKConfig

_CFG = TopKConfig(compact=True)


def _passes(g, u, k, variant, num_valid, interpret, fused=False, **kw):
  """(the gathered pass's outputs, this kernel's) from the same words."""
  words = topk_compact.mask_call(g, k, variant, _CFG, interpret, num_valid=num_valid)
  g2, u2 = (jnp.concatenate([g, u], axis=1), None) if fused else (g, u)
  run = lambda mode: mm.apply_call(
    words,
    g2,
    u2,
    k,
    num_valid=num_valid,
    cfg=dataclasses.replace(_CFG, apply_mode=mode),
    interpret=interpret,
    **kw,
  )
  return run("gather"), run("mgpu")


@pytest.mark.parametrize(
  ("f", "k", "variant", "num_valid", "fused", "extras"),
  [
    (512, 40, "moc", None, False, dict(z_sel=True)),
    (640, 320, "moc", None, True, dict(idx_dtype=jnp.int32)),  # K = F/2
    (1408, 256, "moc", 1376, True, dict(z_sel=True, idx_dtype=jnp.int16)),  # the 60m layer
    (1408, 352, "moc_2of8", 1376, False, {}),  # 2:8 may select whole padding groups
    (256, 8, "moc", None, False, dict(z_sel=True)),
  ],
)
def test_interpret_equals_the_gathered_pass(f, k, variant, num_valid, fused, extras):
  """Random and tie-heavy rows: Z, G_sel, U_sel (Z_sel, the channels) as the gathered pass
  writes them."""
  seed = time.time_ns() % (2**31)
  for ties in (False, True):
    g, u = inputs(5, f, seed, ties)
    want, got = _passes(g, u, k, variant, num_valid, True, fused=fused, **extras)
    assert_same(want, got, seed)


@pytest.mark.parametrize(("f", "k", "num_valid"), [(512, 64, 500), (1408, 256, 1376)])
def test_in_select_interpret_equals_the_two_kernels(f, k, num_valid):
  """`apply_mode='in_select'` (the Mosaic select writing the forward pass's outputs, in
  interpret mode) gives the words and outputs of the shipped select and gathered pass,
  random and tie-heavy rows, with Z_sel and without."""
  seed = time.time_ns() % (2**31)
  in_select = dataclasses.replace(_CFG, apply_mode="in_select")
  for ties in (False, True):
    gu = jnp.concatenate(inputs(4, f, seed, ties), axis=1)
    for z_sel in (False, True):
      kw = dict(num_valid=num_valid, interpret=True, z_sel=z_sel)
      want = mm.train_forward_bitmask(gu, None, k, **kw)
      got = mm.train_forward_bitmask(gu, None, k, config=in_select, **kw)
      assert_same(want, got, seed)
  with pytest.raises(ValueError, match="fused"):
    g, u = inputs(4, f, seed)
    mm.train_forward_bitmask(g, u, k, config=in_select, interpret=True)


def test_bad_shapes_are_refused_with_the_reason():
  with pytest.raises(ValueError, match="F % 128"):
    mgpu_apply.check(1376, 256, jnp.bfloat16)
  with pytest.raises(ValueError, match="K % 8"):
    mgpu_apply.check(1408, 250, jnp.bfloat16)
  with pytest.raises(ValueError, match="bf16 or f16"):
    mgpu_apply.check(1408, 256, jnp.float32)
  with pytest.raises(ValueError, match="int16 or int32"):
    mgpu_apply.check(1408, 256, jnp.bfloat16, jnp.uint8)


def test_ctas_fill_each_sm_by_its_shared_memory():
  """The 1B row (~67 KB a CTA) fits 3 an SM, the 60m row 8 (the cap): one resident round."""
  one_b = mgpu_apply.smem_bytes(5504, 1024, True, 0)
  assert _mgpu_stream.ctas_for(16384, one_b, False, None) == 3 * 132
  small = mgpu_apply.smem_bytes(1408, 256, True, 0)
  assert _mgpu_stream.ctas_for(16384, small, False, None) == 8 * 132
  assert (
    _mgpu_stream.ctas_for(100, small, False, None) == 100
    and _mgpu_stream.ctas_for(9, 1, True, 4) == 1
  )


@pytest.mark.skipif(_ptxas.path() is None, reason="no ptxas on this machine")
def test_lowers_for_cuda_and_its_ptx_assembles(monkeypatch, tmp_path):
  """Every form lowers for CUDA on this CPU machine, and each inline PTX block it emits (the
  walk with silu, the zero fill, the words' loads, pairs, scans) assembles for sm_90a."""
  snippets = _ptxas.record_asm(monkeypatch)
  t, f, k = 16, 1408, 256
  words = jax.ShapeDtypeStruct((t, f // 32), jnp.int32)
  for fused, extras in (
    (True, dict(z_sel=True, num_valid=1376)),
    (False, dict(idx_dtype=jnp.int16)),
  ):
    for dtype in (jnp.bfloat16, jnp.float16):
      g = jax.ShapeDtypeStruct((t, 2 * f if fused else f), dtype)
      fn = lambda w, g, *u, kw=extras: mgpu_apply.apply(
        w, g, u[0] if u else None, k, interpret=False, ctas=3, **kw
      )
      args = (words, g) if fused else (words, g, g)
      text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
      assert "moc_forward_pass" in text
  for z_sel in (False, True):  # the select writing the pass's outputs (`in_select`)
    fn = lambda gu, z_sel=z_sel: mgpu_apply.in_select(
      gu, k, num_valid=1376, z_sel=z_sel, interpret=False, ctas=3
    )
    gu = jax.ShapeDtypeStruct((t, 2 * f), jnp.bfloat16)
    text = jax.jit(fn).trace(gu).lower(lowering_platforms=("cuda",)).as_text()
    assert "moc_select_forward" in text  # the kernel's name in a profile
  keys = [mgpu_apply.forward_key(f, d, True, 0, 1376) for d in (jnp.bfloat16, jnp.float16)]
  keys.append(mgpu_apply.forward_key(f, jnp.bfloat16, False, 0, 1376))  # in_select's
  for key in keys:
    assert _mgpu_compact.balanced_loop(key, _mgpu_stream.KEY_DECLS) in snippets
  assert any("st.shared.v4.b32" in text for text in snippets)  # Z's zero fill
  assert any("ld.global.u32" in text for text in snippets)  # the words a row ahead
  done = _ptxas.assemble_snippets(snippets, tmp_path)
  assert done.returncode == 0, done.stderr


@pytest.mark.gpu
@pytest.mark.parametrize(("f", "k", "num_valid"), [(5504, 1024, 5461), (1408, 256, 1376)])
def test_mgpu_apply_gpu_equals_the_gathered_pass(f, k, num_valid):
  """Compiled on the GPU, 16384 rows of the 1B and 60m layers from the fused [G | U] buffer,
  Gaussian and tie-heavy: every output equals the gathered Triton pass's, Z bit for bit
  (the same silu PTX); so do the words and outputs of `in_select` (one kernel) and of the
  default ('auto': in_select here)."""
  seed = time.time_ns() % (2**31)
  in_select = dataclasses.replace(_CFG, apply_mode="in_select")
  gather = dataclasses.replace(moc_train.forward_config(f), apply_mode="gather")
  for ties in (False, True):
    g, u = inputs(16384, f, seed, ties)
    want, got = _passes(g, u, k, "moc", num_valid, False, fused=True, z_sel=True)
    assert_same(want, got, seed)
    want, got = _passes(g, u, k, "moc", num_valid, False, idx_dtype=jnp.int16)  # split G, U
    assert_same(want, got, seed)
    gu = jnp.concatenate([g, u], axis=1)
    for z_sel in (True, False):  # MoC keeps Z_sel, GCP does not
      kw = dict(num_valid=num_valid, z_sel=z_sel)
      want = mm.train_forward_bitmask(gu, None, k, config=gather, **kw)
      assert_same(want, mm.train_forward_bitmask(gu, None, k, config=in_select, **kw), seed)
      assert_same(want, mm.train_forward_bitmask(gu, None, k, **kw), seed)  # the default


def test_the_silu_ptx_computes_silu_mul():
  """The forward's per-key PTX (`forward_key`: silu(g)·u) evaluated on the CPU
  (`_ptx_arith`) gives `moc_train_mask.silu_mul`'s Z."""
  seed = time.time_ns() % (2**31)
  g, u, _ = gate_values(4096, seed)
  key = mgpu_apply.forward_key(512, jnp.bfloat16, True, 0)
  regs = _ptx_arith.run(key, {"gh": bf16_bits(g), "uh": bf16_bits(u)})
  assert_near(regs["zh"], mm.silu_mul(jnp.asarray(g), jnp.asarray(u), jnp.bfloat16), seed)


# The probe that times both (benchmarks/mgpu_stream_probe.py).


def test_probe_lowers_every_row_and_its_dry_run_finds_them_exact(capsys, tmp_path):
  """`--lower_only` lowers each Mosaic row for CUDA; `--dry_run` (interpret mode) checks every
  row against the shipped passes, times them and records it all."""
  import json

  from benchmarks import mgpu_stream_probe

  mgpu_stream_probe.main(["--lower_only", "--shapes=tiny", "--ctas=0,2"])
  out = capsys.readouterr().out
  # fwd, bwd: two CTA counts each; in_select, its warp form with g reloaded and from the keys
  assert out.count("lowered for CUDA") == 7
  assert "select_fwd in_select_warp_keys: lowered for CUDA" in out
  path = tmp_path / "probe.json"
  mgpu_stream_probe.main(["--dry_run", "--shapes=tiny", "--ctas=0", f"--out={path}"])
  tiny = json.loads(path.read_text())["shapes"]["tiny"]
  assert not tiny["errors"] and tiny["exact"]["bwd_gcp_mgpu_c0"] == [True, True]
  assert all(all(v) for v in tiny["exact"].values()) and len(tiny["exact"]) == 9
  assert tiny["select_fwd"]["in_select"]["median_us"] > 0
  assert tiny["fwd"]["mgpu_c0"]["median_us"] > 0 and "xla_copy" in tiny["bwd_moc"]


def test_auto_modes_take_mosaic_only_where_it_can_run(monkeypatch):
  """`apply_mode='auto'` / `StreamConfig(mode='auto')`: the Triton passes on this CPU (and in
  interpret mode), the Mosaic kernels where `_mgpu_stream.usable` says they run; the same
  outputs either way."""
  assert not _mgpu_stream.usable(jnp.bfloat16, 1408, 256, 64, interpret=False)  # no GPU here
  calls = record_calls(monkeypatch, (mgpu_apply, "apply"), (mgpu_backward, "backward"))
  seed = time.time_ns() % (2**31)
  dz, words, gs, us, zs = residuals(3, 512, 64, seed)
  g, u = inputs(3, 512, seed)
  auto_fwd = dataclasses.replace(_CFG, apply_mode="auto")
  auto_bwd = mm.StreamConfig(mode="auto")

  def both():
    gu = jnp.concatenate([g, u], axis=1)
    fwd = mm.apply_call(words, gu, None, 64, num_valid=None, cfg=auto_fwd, interpret=True)
    return fwd, mm.train_backward_bitmask(dz, words, gs, us, zs, config=auto_bwd, interpret=True)

  triton = both()
  assert calls == []
  monkeypatch.setattr(_mgpu_stream, "usable", lambda *a: True)
  mosaic = both()
  assert calls == ["apply", "backward"]
  for want, got in zip(triton, mosaic, strict=True):
    assert_same(want, got, seed)


def test_auto_forward_is_the_select_writing_the_pass_on_the_fused_buffer(monkeypatch):
  """The forward's 'auto' (the shipped default): `in_select` on the fused [G | U] buffer for
  'moc' where the Mosaic kernels run; the Triton select and gather on this CPU; the Mosaic
  streaming pass after the Triton selection; the Triton gather for split G, U. Same outputs."""
  calls = record_calls(monkeypatch, (mgpu_apply, "apply"), (mgpu_apply, "in_select"))
  seed = time.time_ns() % (2**31)
  g, u = inputs(3, 512, seed)
  gu = jnp.concatenate([g, u], axis=1)
  auto = dataclasses.replace(_CFG, apply_mode="auto", selection="auto")
  run = lambda *gu, cfg=auto: mm.train_forward_bitmask(
    *gu, 64, num_valid=500, interpret=True, z_sel=True, config=cfg
  )
  assert moc_train.FORWARD_DEFAULT.apply_mode == "auto"
  triton = run(gu, None)
  assert calls == []
  monkeypatch.setattr(_mgpu_stream, "usable", lambda *a: True)
  jax.clear_caches()  # (the jitted forward would keep the first trace's choice)
  assert_same(triton, run(gu, None), seed)
  assert calls == ["in_select"]
  assert_same(triton, run(gu, None, cfg=dataclasses.replace(auto, selection="triton")), seed)
  assert calls == ["in_select", "apply"]
  assert_same(triton, run(g, u), seed)  # split G, U: the Triton gather (not yet GPU-checked)
  assert calls == ["in_select", "apply"]
