"""The train epilogues' streaming passes as Mosaic GPU kernels (`_mgpu_stream`): the forward
(`mgpu_apply`, opt-in as `TopKConfig.apply_mode='mgpu'`) and the backward (`mgpu_backward`,
`StreamConfig(mode='mgpu')`). In interpret mode (one CTA, the PTX ops as jnp) each gives the
Triton passes' outputs bit for bit; each lowers for CUDA here and its inline PTX assembles for
sm_90a; on a GPU each equals the Triton pass at the 1B and 60m layer shapes."""

import dataclasses
import time

import _ptx_arith
import _ptxas
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

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


def _inputs(t: int, f: int, seed: int, ties: bool = False):
  keys = jax.random.split(jax.random.key(seed), 2)
  if ties:  # small integers: many keys equal the K-th
    g = jax.random.randint(keys[0], (t, f), -3, 4).astype(jnp.bfloat16)
  else:
    g = jax.random.normal(keys[0], (t, f)).astype(jnp.bfloat16)
  return g, jax.random.normal(keys[1], (t, f)).astype(jnp.bfloat16)


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


def _assert_same(want, got, seed) -> None:
  """Bit for bit; a failure says how many elements differ and by how much (on a GPU: whether
  the silu PTX rounds as the Triton pass's does)."""
  assert len(want) == len(got)
  for n, (a, b) in enumerate(zip(want, got, strict=True)):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{seed=}"
    a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
    diff = np.abs(a32 - b32)
    assert np.array_equal(a32, b32), (
      f"{seed=} output {n}: {np.count_nonzero(a32 != b32)} of {a32.size} differ, max {diff.max()}"
    )


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
    g, u = _inputs(5, f, seed, ties)
    want, got = _passes(g, u, k, variant, num_valid, True, fused=fused, **extras)
    _assert_same(want, got, seed)


@pytest.mark.parametrize(("f", "k", "num_valid"), [(512, 64, 500), (1408, 256, 1376)])
def test_in_select_interpret_equals_the_two_kernels(f, k, num_valid):
  """`apply_mode='in_select'` (the Mosaic select writing the forward pass's outputs, in
  interpret mode) gives the words and outputs of the shipped select and gathered pass,
  random and tie-heavy rows, with Z_sel and without."""
  seed = time.time_ns() % (2**31)
  in_select = dataclasses.replace(_CFG, apply_mode="in_select")
  for ties in (False, True):
    gu = jnp.concatenate(_inputs(4, f, seed, ties), axis=1)
    for z_sel in (False, True):
      kw = dict(num_valid=num_valid, interpret=True, z_sel=z_sel)
      want = mm.train_forward_bitmask(gu, None, k, **kw)
      got = mm.train_forward_bitmask(gu, None, k, config=in_select, **kw)
      _assert_same(want, got, seed)
  with pytest.raises(ValueError, match="fused"):
    g, u = _inputs(4, f, seed)
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
    g, u = _inputs(16384, f, seed, ties)
    want, got = _passes(g, u, k, "moc", num_valid, False, fused=True, z_sel=True)
    _assert_same(want, got, seed)
    want, got = _passes(g, u, k, "moc", num_valid, False, idx_dtype=jnp.int16)  # split G, U
    _assert_same(want, got, seed)
    gu = jnp.concatenate([g, u], axis=1)
    for z_sel in (True, False):  # MoC keeps Z_sel, GCP does not
      kw = dict(num_valid=num_valid, z_sel=z_sel)
      want = mm.train_forward_bitmask(gu, None, k, config=gather, **kw)
      _assert_same(want, mm.train_forward_bitmask(gu, None, k, config=in_select, **kw), seed)
      _assert_same(want, mm.train_forward_bitmask(gu, None, k, **kw), seed)  # the default


def _bf16_bits(x) -> np.ndarray:
  return np.asarray(x, ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)


def _gate_values(n: int, seed: int):
  """bf16 g (Gaussian, then a ramp over [-20, 20] for the exp's range reduction), u and dz."""
  rng = np.random.default_rng(seed)
  g = np.concatenate([rng.normal(size=n), np.linspace(-20, 20, n)])
  u, dz = rng.normal(size=2 * n), rng.normal(size=2 * n)
  return (np.asarray(v, ml_dtypes.bfloat16) for v in (g, u, dz))


def _assert_near(got_bits, want, seed) -> None:
  """The PTX's bf16 results against jnp's: at most 1 ulp apart, 99% equal (the evaluator's
  ex2 and divide are exact where the GPU's are within 2 fp32 ulp)."""
  got = np.asarray(got_bits, np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
  want = np.asarray(want, ml_dtypes.bfloat16).astype(np.float32)
  ulp = np.abs(want.view(np.int32) - got.view(np.int32)) >> 16
  assert ulp.max() <= 1 and np.mean(got == want) >= 0.99, f"{seed=} {ulp.max()=}"


def test_the_silu_ptx_computes_silu_mul():
  """The forward's per-key PTX (`forward_key`: silu(g)·u) evaluated on the CPU
  (`_ptx_arith`) gives `moc_train_mask.silu_mul`'s Z."""
  seed = time.time_ns() % (2**31)
  g, u, _ = _gate_values(4096, seed)
  key = mgpu_apply.forward_key(512, jnp.bfloat16, True, 0)
  regs = _ptx_arith.run(key, {"gh": _bf16_bits(g), "uh": _bf16_bits(u)})
  _assert_near(regs["zh"], mm.silu_mul(jnp.asarray(g), jnp.asarray(u), jnp.bfloat16), seed)


@pytest.mark.parametrize("has_z", [False, True])
def test_the_backward_ptx_computes_the_gradients(has_z):
  """The backward's per-key PTX (`backward_key`) evaluated on the CPU gives
  `moc_train_mask.backward_values`' dG, dU and (GCP) Z."""
  seed = time.time_ns() % (2**31)
  g, u, dz = _gate_values(4096, seed)
  z = np.asarray(mm.silu_mul(jnp.asarray(g), jnp.asarray(u), jnp.bfloat16))
  key = mgpu_backward.backward_key(512, 64, jnp.bfloat16, has_z)
  regs = {"gh": _bf16_bits(g), "uh": _bf16_bits(u), "dh": _bf16_bits(dz), "zh": _bf16_bits(z)}
  out = _ptx_arith.run(key, regs)
  dg, du, want_z = mm.backward_values(
    jnp.asarray(dz), jnp.asarray(g), jnp.asarray(u), z if has_z else None, jnp.bfloat16
  )
  for name, want in (("xh", dg), ("yh", du), ("zh", want_z)):
    _assert_near(out[name], np.asarray(want, np.float32), seed)


# The backward pass.

_MGPU = mm.StreamConfig(mode="mgpu")


def _residuals(t: int, f: int, k: int, seed: int, num_valid=None, ties=False, interpret=True):
  """dZ and the forward's (words, G_sel, U_sel, Z_sel) for `_inputs`' rows."""
  g, u = _inputs(t, f, seed, ties)
  dz = jax.random.normal(jax.random.key(seed + 1), (t, f)).astype(jnp.bfloat16)
  words, gs, us, _, zs = mm.train_forward_bitmask(
    g, u, k, num_valid=num_valid, interpret=interpret, z_sel=True
  )
  return dz, words, gs, us, zs


@pytest.mark.parametrize(
  ("f", "k", "num_valid"), [(512, 64, None), (1408, 256, 1376), (256, 128, None)]
)
@pytest.mark.parametrize("fused", [False, True])
def test_backward_interpret_equals_the_triton_walk(f, k, num_valid, fused):
  """Random and tie-heavy rows, with Z_sel (MoC) and without (GCP, Z recomputed)."""
  seed = time.time_ns() % (2**31)
  for ties in (False, True):
    dz, words, gs, us, zs = _residuals(4, f, k, seed, num_valid, ties)
    for z_sel in (zs, None):
      kw = dict(interpret=True, fused=fused)
      want = mm.train_backward_bitmask(dz, words, gs, us, z_sel, config=mm._triton_walk(f), **kw)
      got = mm.train_backward_bitmask(dz, words, gs, us, z_sel, config=_MGPU, **kw)
      _assert_same(want, got, seed)


def test_backward_refuses_bad_inputs_with_the_reason():
  dz, words, gs, us, _ = _residuals(2, 512, 64, 0)
  with pytest.raises(ValueError, match="K % 64"):
    mgpu_backward.backward(dz, words, gs[:, :40], us[:, :40])
  with pytest.raises(ValueError, match="one dtype"):
    mgpu_backward.backward(dz.astype(jnp.float16), words, gs, us)


@pytest.mark.skipif(_ptxas.path() is None, reason="no ptxas on this machine")
def test_backward_lowers_for_cuda_and_its_ptx_assembles(monkeypatch, tmp_path):
  """Every form (fused or not, Z_sel or not, bf16 and f16) lowers for CUDA on this CPU
  machine, and each inline PTX block it emits assembles for sm_90a."""
  snippets = _ptxas.record_asm(monkeypatch)
  t, f, k = 16, 1408, 256
  words = jax.ShapeDtypeStruct((t, f // 32), jnp.int32)
  for dtype in (jnp.bfloat16, jnp.float16):
    rows, sel = jax.ShapeDtypeStruct((t, f), dtype), jax.ShapeDtypeStruct((t, k), dtype)
    for fused in (False, True):
      for has_z in (False, True):
        fn = lambda dz, w, g, u, *z, fused=fused: mgpu_backward.backward(
          dz, w, g, u, *z, fused=fused, interpret=False, ctas=3
        )
        args = (rows, words, sel, sel) + ((sel,) if has_z else ())
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "moc_backward_pass" in text  # the kernel's name in a profile
  for dtype in (jnp.bfloat16, jnp.float16):
    for has_z in (False, True):
      key = mgpu_backward.backward_key(f, k, dtype, has_z)
      assert _mgpu_compact.balanced_loop(key, _mgpu_stream.KEY_DECLS) in snippets
  done = _ptxas.assemble_snippets(snippets, tmp_path)
  assert done.returncode == 0, done.stderr


@pytest.mark.gpu
@pytest.mark.parametrize(("f", "k", "num_valid"), [(5504, 1024, 5461), (1408, 256, 1376)])
def test_mgpu_backward_gpu_equals_the_block_walk(f, k, num_valid):
  """Compiled on the GPU, 16384 rows of the 1B and 60m layers, Gaussian and tie-heavy, fused
  [dG | dU] and not, with Z_sel and without: bit for bit the Triton walks' outputs."""
  seed = time.time_ns() % (2**31)
  walk = mm._triton_walk(f)
  for ties in (False, True):
    dz, words, gs, us, zs = _residuals(16384, f, k, seed, num_valid, ties, interpret=False)
    for fused in (False, True):
      for z_sel in (zs, None):
        kw = dict(fused=fused)  # (the default is the Mosaic kernel here: the walk named)
        want = mm.train_backward_bitmask(dz, words, gs, us, z_sel, config=walk, **kw)
        got = mm.train_backward_bitmask(dz, words, gs, us, z_sel, config=_MGPU, **kw)
        _assert_same(want, got, seed)


# The probe that times both (benchmarks/mgpu_stream_probe.py).


def test_probe_lowers_every_row_and_its_dry_run_finds_them_exact(capsys, tmp_path):
  """`--lower_only` lowers each Mosaic row for CUDA; `--dry_run` (interpret mode) checks every
  row against the shipped passes, times them and records it all."""
  import json

  from benchmarks import mgpu_stream_probe

  mgpu_stream_probe.main(["--lower_only", "--shapes=tiny", "--ctas=0,2"])
  out = capsys.readouterr().out
  assert out.count("lowered for CUDA") == 6  # fwd, bwd: two CTA counts; in_select, its warp form
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
  calls = []
  for module, name in ((mgpu_apply, "apply"), (mgpu_backward, "backward")):
    original = getattr(module, name)
    spy = lambda *a, original=original, name=name, **k: calls.append(name) or original(*a, **k)
    monkeypatch.setattr(module, name, spy)
  seed = time.time_ns() % (2**31)
  dz, words, gs, us, zs = _residuals(3, 512, 64, seed)
  g, u = _inputs(3, 512, seed)
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
    _assert_same(want, got, seed)


def test_auto_forward_is_the_select_writing_the_pass_on_the_fused_buffer(monkeypatch):
  """The forward's 'auto' (the shipped default): `in_select` on the fused [G | U] buffer for
  'moc' where the Mosaic kernels run; the Triton select and gather on this CPU; the Mosaic
  streaming pass after the Triton selection; the Triton gather for split G, U. Same outputs."""
  calls = []
  for name in ("apply", "in_select"):
    original = getattr(mgpu_apply, name)
    spy = lambda *a, original=original, name=name, **k: calls.append(name) or original(*a, **k)
    monkeypatch.setattr(mgpu_apply, name, spy)
  seed = time.time_ns() % (2**31)
  g, u = _inputs(3, 512, seed)
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
  _assert_same(triton, run(gu, None), seed)
  assert calls == ["in_select"]
  _assert_same(triton, run(gu, None, cfg=dataclasses.replace(auto, selection="triton")), seed)
  assert calls == ["in_select", "apply"]
  _assert_same(triton, run(g, u), seed)  # split G, U: the Triton gather (not yet GPU-checked)
  assert calls == ["in_select", "apply"]


def test_backward_mode_swaps_the_default_and_restores_it():
  """`common.backward_mode` (ffn_layer's 'backward' field): 'triton' is the Triton walks by
  width (the default before 2026-12-05o), another mode replaces the default's; then back."""
  from benchmarks import common

  shipped = mm.BACKWARD_DEFAULT
  assert shipped.mode == "auto"
  with common.backward_mode("triton"):
    assert mm.backward_config(5504) == mm.TRITON_BACKWARD
    assert mm.backward_config(1408).mode == "row"
  with common.backward_mode("mgpu"):
    assert mm.backward_config(1408).mode == "mgpu"
  assert mm.BACKWARD_DEFAULT is shipped
