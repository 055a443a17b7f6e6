"""The train backward's streaming pass as a Mosaic GPU kernel (`mgpu_backward`, the default
backward on Hopper where K % 64 == 0): its per-key PTX computes `backward_values`; in
interpret mode it gives the Triton walks' outputs bit for bit; it lowers for CUDA here and its
inline PTX assembles for sm_90a; on a GPU it equals the Triton walk at the 1B and 60m layer
shapes."""

import time

import _ptx_arith
import _ptxas
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _stream_checks import assert_near, assert_same, bf16_bits, gate_values, residuals

from pallas_kernels import _mgpu_compact, _mgpu_stream, mgpu_backward
from pallas_kernels import moc_train_mask as mm


@pytest.mark.parametrize("has_z", [False, True])
def test_the_backward_ptx_computes_the_gradients(has_z):
  """The backward's per-key PTX (`backward_key`) evaluated on the CPU gives
  `moc_train_mask.backward_values`' dG, dU and (GCP) Z."""
  seed = time.time_ns() % (2**31)
  g, u, dz = gate_values(4096, seed)
  z = np.asarray(mm.silu_mul(jnp.asarray(g), jnp.asarray(u), jnp.bfloat16))
  key = mgpu_backward.backward_key(512, 64, jnp.bfloat16, has_z)
  regs = {"gh": bf16_bits(g), "uh": bf16_bits(u), "dh": bf16_bits(dz), "zh": bf16_bits(z)}
  out = _ptx_arith.run(key, regs)
  dg, du, want_z = mm.backward_values(
    jnp.asarray(dz), jnp.asarray(g), jnp.asarray(u), z if has_z else None, jnp.bfloat16
  )
  for name, want in (("xh", dg), ("yh", du), ("zh", want_z)):
    assert_near(out[name], np.asarray(want, np.float32), seed)


_MGPU = mm.StreamConfig(mode="mgpu")


@pytest.mark.parametrize(
  ("f", "k", "num_valid"), [(512, 64, None), (1408, 256, 1376), (256, 128, None)]
)
@pytest.mark.parametrize("fused", [False, True])
def test_backward_interpret_equals_the_triton_walk(f, k, num_valid, fused):
  """Random and tie-heavy rows, with Z_sel (MoC) and without (GCP, Z recomputed)."""
  seed = time.time_ns() % (2**31)
  for ties in (False, True):
    dz, words, gs, us, zs = residuals(4, f, k, seed, num_valid, ties)
    for z_sel in (zs, None):
      kw = dict(interpret=True, fused=fused)
      want = mm.train_backward_bitmask(dz, words, gs, us, z_sel, config=mm._triton_walk(f), **kw)
      got = mm.train_backward_bitmask(dz, words, gs, us, z_sel, config=_MGPU, **kw)
      assert_same(want, got, seed)


def test_backward_refuses_bad_inputs_with_the_reason():
  dz, words, gs, us, _ = residuals(2, 512, 64, 0)
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
    dz, words, gs, us, zs = residuals(16384, f, k, seed, num_valid, ties, interpret=False)
    for fused in (False, True):
      for z_sel in (zs, None):
        kw = dict(fused=fused)  # (the default is the Mosaic kernel here: the walk named)
        want = mm.train_backward_bitmask(dz, words, gs, us, z_sel, config=walk, **kw)
        got = mm.train_backward_bitmask(dz, words, gs, us, z_sel, config=_MGPU, **kw)
        assert_same(want, got, seed)


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
