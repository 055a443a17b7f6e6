"""Pallas MoC train epilogues against `reference.train_{forward,backward}_epilogue`.

Interpret mode on CPU. Unwritten outputs would read NaN / INT32_MIN there, so equality
with the reference also shows every element (the zero fill included) was written.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import moc_train, moc_train_mask, reference
from pallas_kernels.moc_train import BackwardConfig
from pallas_kernels.topk import TopKConfig

_SEED = np.random.SeedSequence().entropy


def _key(tag: int) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(_SEED % (2**31)), tag)


def _close(a, b, dtype):
  a32, b32 = np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
  assert np.all(np.isfinite(a32)), f"seed={_SEED}"
  # silu/sigmoid rounding can differ from XLA's in the last fp32 bit: 1 bf16 ulp at most.
  tol = 1e-6 if dtype == jnp.float32 else 8e-3
  np.testing.assert_allclose(a32, b32, rtol=tol, atol=tol, err_msg=f"seed={_SEED}")
  np.testing.assert_array_equal(a32 == 0, b32 == 0)  # same zero pattern


def _equal(a, b):
  np.testing.assert_array_equal(
    np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)), err_msg=f"seed={_SEED}"
  )


def _padded_inputs(t, f, dtype, tag, ties=False, num_valid=None):
  """As `_inputs`, with G and U zero past num_valid, as padded weight columns give them."""
  g, u, dz = _inputs(t, f, dtype, tag, ties)
  if num_valid is not None:
    pad_F = jnp.arange(f) >= num_valid
    g, u = jnp.where(pad_F, 0, g).astype(dtype), jnp.where(pad_F, 0, u).astype(dtype)
  return g, u, dz


def _inputs(t, f, dtype, tag, ties=False):
  ks = jax.random.split(_key(tag), 3)
  if ties:
    g = jax.random.randint(ks[0], (t, f), -2, 3).astype(jnp.float32)
  else:
    g = jax.random.normal(ks[0], (t, f), jnp.float32)
  u = jax.random.normal(ks[1], (t, f), jnp.float32) + 0.1  # no exact zeros
  dz = jax.random.normal(ks[2], (t, f), jnp.float32) + 0.1
  return g.astype(dtype), u.astype(dtype), dz.astype(dtype)


@pytest.mark.parametrize(
  ("variant", "dtype", "t", "f", "k", "ties", "num_valid", "cfg"),
  [
    ("moc", jnp.bfloat16, 3, 1408, 256, False, 1376, TopKConfig(rows=2, fan=3)),  # padding, radix 4
    ("moc", jnp.float32, 3, 200, 100, True, None, TopKConfig(rows=2)),  # ties, K = F/2
    ("moc", jnp.bfloat16, 3, 72, 1, True, 61, TopKConfig(rows=2)),  # K = 1, ties, padding
    # ties; padding: a partial and a whole group
    ("moc_2of8", jnp.bfloat16, 3, 128, 32, True, 93, TopKConfig(rows=2)),
    ("moc", jnp.bfloat16, 3, 136, 16, True, 130, TopKConfig(rows=4, chunk=32)),  # narrow chunks
    # ternary on ragged equal chunks
    ("moc", jnp.bfloat16, 3, 200, 37, True, 190, TopKConfig(rows=2, fan=2, chunk=64)),
  ],
)
def test_forward_and_backward(variant, dtype, t, f, k, ties, num_valid, cfg):
  g, u, dz = _padded_inputs(t, f, dtype, f, ties, num_valid=num_valid)
  out = moc_train.train_forward_epilogue(g, u, k, variant, num_valid=num_valid, config=cfg)
  ref = reference.train_forward_epilogue(g, u, k, variant, num_valid=num_valid)
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(ref[0]), err_msg=f"seed={_SEED}")
  for a, b in zip(out[1:3], ref[1:3], strict=True):
    _equal(a, b)
  _close(out[3], ref[3], dtype)
  idx, g_sel, u_sel = ref[:3]
  idx16 = idx.astype(jnp.uint16)  # as moc_ffn stores them
  z_sel = reference.silu_and_mul(g_sel, u_sel)
  bcfg = BackwardConfig(rows=2)
  for z_arg in (z_sel, None) if variant == "moc_2of8" or k == 1 else (z_sel,):
    dg, du, z = moc_train.train_backward_epilogue(dz, idx16, g_sel, u_sel, z_arg, config=bcfg)
    ref_dg, ref_du, ref_z = reference.train_backward_epilogue(dz, idx, g_sel, u_sel, z_arg)
    assert dg.dtype == du.dtype == dz.dtype and z.dtype == u.dtype
    _close(dg, ref_dg, dtype)
    _close(du, ref_du, dtype)
    if z_arg is None:
      _close(z, ref_z, dtype)
    else:
      _equal(z, ref_z)


@pytest.mark.parametrize(
  ("variant", "dtype", "t", "f", "k", "ties", "num_valid", "cfg"),
  [
    ("moc", jnp.bfloat16, 3, 1408, 256, False, 1376, TopKConfig(compact=True)),
    ("moc", jnp.bfloat16, 2, 2752, 512, True, 2736, TopKConfig(compact=True, chunk=512, fan=2)),
    ("moc", jnp.bfloat16, 2, 2752, 512, False, 2736, TopKConfig(compact=True, apply_words=16)),
    ("moc", jnp.float32, 3, 200, 100, True, None, TopKConfig(compact=True, rows=2)),
    ("moc", jnp.bfloat16, 3, 72, 1, True, 61, TopKConfig(compact=True)),  # K = 1
    ("moc_2of8", jnp.bfloat16, 3, 128, 32, True, 93, TopKConfig(compact=True)),
    # slots filled in order by a search (`_apply_gather`): indices out too
    ("moc", jnp.bfloat16, 2, 2752, 512, True, 2736, TopKConfig(compact=True, apply_mode="gather")),
    ("moc_2of8", jnp.bfloat16, 3, 128, 32, True, 93, TopKConfig(compact=True, apply_mode="gather")),
    # 64 slots searched per step (8 steps at K = 512)
    (
      "moc",
      jnp.bfloat16,
      2,
      2752,
      512,
      True,
      2736,
      TopKConfig(compact=True, apply_mode="gather", gather_slots=64),
    ),
  ],
)
def test_forward_two_kernels(variant, dtype, t, f, k, ties, num_valid, cfg):
  """Selection bitmask, then the streaming pass: the same outputs as the one-kernel forward."""
  g, u, _ = _padded_inputs(t, f, dtype, f + 1, ties, num_valid=num_valid)
  out = moc_train.train_forward_epilogue(
    g, u, k, variant, num_valid=num_valid, config=cfg, idx_dtype=jnp.uint16
  )
  ref = reference.train_forward_epilogue(g, u, k, variant, num_valid=num_valid)
  assert out[0].dtype == jnp.uint16
  np.testing.assert_array_equal(np.asarray(out[0]).astype(np.int32), np.asarray(ref[0]))
  for a, b in zip(out[1:3], ref[1:3], strict=True):
    _equal(a, b)
  _close(out[3], ref[3], dtype)


def _words_of(idx_TxK, f: int) -> np.ndarray:
  """The bitmask the reference's indices describe: bit j of word w is channel 32 w + j."""
  idx = np.asarray(idx_TxK).astype(np.int64)
  words = np.zeros((idx.shape[0], -(-f // 32)), np.uint64)
  for row, chans in enumerate(idx):
    np.bitwise_or.at(words[row], chans // 32, np.uint64(1) << (chans % 32).astype(np.uint64))
  return words.astype(np.uint32).view(np.int32)


@pytest.mark.parametrize(
  ("variant", "dtype", "t", "f", "k", "ties", "num_valid", "keep_z", "stream"),
  [
    ("moc", jnp.bfloat16, 3, 1408, 256, False, 1376, True, ("row", 4)),
    ("moc", jnp.float32, 3, 200, 100, True, None, False, ("row", 4)),  # ties, K = F/2, GCP
    ("moc", jnp.bfloat16, 2, 72, 1, True, 61, True, ("row", 4)),  # K = 1
    ("moc_2of8", jnp.bfloat16, 3, 128, 32, True, 93, False, ("row", 4)),
    # More row walks (8-word blocks, row pieces), and one program per block of words.
    ("moc", jnp.bfloat16, 3, 1408, 256, True, 1376, True, ("row", 8)),
    ("moc", jnp.float32, 2, 200, 100, True, None, False, ("row", 0)),  # row pieces
    ("moc", jnp.bfloat16, 3, 1408, 256, False, 1376, False, ("block", 8)),
    ("moc", jnp.float32, 2, 200, 100, True, None, True, ("block", 2)),
    ("moc_2of8", jnp.bfloat16, 2, 128, 32, True, 93, True, ("block", 1)),
    # Forward slots filled in order by a search (`_apply_gather`); the backward walks rows.
    ("moc", jnp.bfloat16, 3, 1408, 256, True, 1376, True, ("gather", 8)),
    ("moc", jnp.float32, 2, 200, 100, True, None, False, ("gather", 2)),
    ("moc", jnp.bfloat16, 2, 72, 1, True, 61, True, ("gather", 1)),  # K = 1
    ("moc_2of8", jnp.bfloat16, 3, 128, 32, True, 93, True, ("gather", 4)),
  ],
)
def test_bitmask_epilogues(variant, dtype, t, f, k, ties, num_valid, keep_z, stream):
  """Selection kept as bits: the same G_sel, U_sel, Z, Z_sel, dG, dU as the index epilogues,
  whichever way the streaming passes walk the bitmask."""
  mode, words = stream
  g, u, dz = _padded_inputs(t, f, dtype, f + 2, ties, num_valid=num_valid)
  cfg = TopKConfig(chunk=64, apply_words=words, apply_mode=mode)
  out = moc_train_mask.train_forward_bitmask(
    g, u, k, variant, num_valid=num_valid, config=cfg, z_sel=keep_z
  )
  ref = reference.train_forward_epilogue(g, u, k, variant, num_valid=num_valid)
  np.testing.assert_array_equal(np.asarray(out[0]), _words_of(ref[0], f), err_msg=f"seed={_SEED}")
  for a, b in zip(out[1:3], ref[1:3], strict=True):
    _equal(a, b)
  _close(out[3], ref[3], dtype)
  z_sel = out[4] if keep_z else None
  if keep_z:  # Z_sel is Z at the selected channels, bit for bit
    _equal(z_sel, jnp.take_along_axis(out[3], ref[0], axis=-1))
  dg, du, z = moc_train_mask.train_backward_bitmask(
    dz,
    out[0],
    out[1],
    out[2],
    z_sel,
    config=moc_train_mask.StreamConfig(words, mode="row" if mode == "gather" else mode),
  )
  ref_dg, ref_du, ref_z = reference.train_backward_epilogue(dz, ref[0], ref[1], ref[2], z_sel)
  assert dg.dtype == du.dtype == dz.dtype and z.dtype == u.dtype
  _close(dg, ref_dg, dtype)
  _close(du, ref_du, dtype)
  if keep_z:
    _equal(z, ref_z)
  else:
    _close(z, ref_z, dtype)
  _equal(z, out[3])  # the backward's Z is the forward's, kept or recomputed


def _fused_layout_matches(g, u, dz, k, variant, num_valid, keep_z, **forward_kwargs):
  """One [G | U] input and one [dG | dU] output (a fused gate+up GEMM's layout) give exactly
  the outputs of separate G, U and dG, dU."""
  fwd = functools.partial(
    moc_train_mask.train_forward_bitmask, num_valid=num_valid, z_sel=keep_z, **forward_kwargs
  )
  apart = fwd(g, u, k, variant)
  fused = fwd(jnp.concatenate([g, u], axis=1), None, k, variant)
  for a, b in zip(apart, fused, strict=True):
    _equal(b, a)
  z_sel = apart[4] if keep_z else None
  dg, du, z = moc_train_mask.train_backward_bitmask(dz, *apart[:3], z_sel)
  dgu, z_fused = moc_train_mask.train_backward_bitmask(dz, *apart[:3], z_sel, fused=True)
  _equal(dgu, jnp.concatenate([dg, du], axis=1))
  _equal(z_fused, z)


@pytest.mark.parametrize(
  ("variant", "f", "k", "num_valid", "keep_z"),
  [("moc", 344, 64, 330, True), ("moc", 200, 100, None, False), ("moc_2of8", 128, 32, 93, True)],
)
def test_bitmask_epilogues_on_a_fused_gate_up_layout(variant, f, k, num_valid, keep_z):
  g, u, dz = _padded_inputs(3, f, jnp.bfloat16, f + 5, True, num_valid=num_valid)
  _fused_layout_matches(g, u, dz, k, variant, num_valid, keep_z, config=TopKConfig(chunk=64))


def test_gathered_forward_on_a_fused_gate_up_layout():
  g, u, dz = _padded_inputs(3, 344, jnp.bfloat16, 349, True, num_valid=330)
  cfg = TopKConfig(chunk=64, apply_mode="gather", apply_words=4)
  _fused_layout_matches(g, u, dz, 64, "moc", 330, True, config=cfg)


@pytest.mark.gpu
def test_gpu_bitmask_fused_gate_up_layout():
  f, k, nv = 5504, 1024, 5461
  g, u, dz = _padded_inputs(16384, f, jnp.bfloat16, f + 7, False, num_valid=nv)
  _fused_layout_matches(g, u, dz, k, "moc", nv, True)


def test_epilogue_configs_by_row_width():
  narrow = moc_train.forward_config(2816)
  assert (narrow.num_warps, narrow.apply_warps, narrow.apply_words) == (2, 4, 16)
  assert moc_train.forward_config(1408) == narrow
  assert moc_train.forward_config(5504) == moc_train.FORWARD_DEFAULT
  assert moc_train.FORWARD_DEFAULT.apply_mode == narrow.apply_mode == "auto"
  assert moc_train_mask.backward_config(1408).mode == "auto"  # the Mosaic walk, else:
  assert moc_train_mask._triton_walk(1408).mode == "row"
  assert moc_train_mask._triton_walk(2048) == moc_train_mask.TRITON_BACKWARD
  assert moc_train_mask.backward_config(2048) == moc_train_mask.BACKWARD_DEFAULT


def test_stream_config_rejects_bad_walks():
  with pytest.raises(ValueError, match="stream mode"):
    moc_train_mask.StreamConfig(mode="column")
  with pytest.raises(ValueError, match="power of two"):
    moc_train_mask.StreamConfig(words=24)
  with pytest.raises(ValueError, match="power of two"):
    moc_train_mask.StreamConfig(words=0, mode="block")


def test_forward_uint16_indices():
  g, u, _ = _inputs(3, 256, jnp.bfloat16, 5)
  out = moc_train.train_forward_epilogue(g, u, 32, "moc", idx_dtype=jnp.uint16)
  ref = reference.train_forward_epilogue(g, u, 32, "moc")
  assert out[0].dtype == jnp.uint16
  np.testing.assert_array_equal(np.asarray(out[0]).astype(np.int32), np.asarray(ref[0]))


def test_forward_default_on_wide_rows():
  """The forward's default at >= NARROW_ROW channels (the gather on 8 warps, 32-word blocks,
  indices out) in interpret mode: the path the 1B preset takes on the GPU."""
  f, k, nv = 4128, 512, 4100
  assert moc_train.forward_config(f) is moc_train.FORWARD_DEFAULT
  g, u, _ = _inputs(2, f, jnp.bfloat16, 17)
  out = moc_train.train_forward_epilogue(g, u, k, "moc", num_valid=nv)
  ref = reference.train_forward_epilogue(g, u, k, "moc", num_valid=nv)
  for a, b in zip(out[:3], ref[:3], strict=True):
    _equal(a, b)
  _close(out[3], ref[3], jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize(
  ("f", "k", "nv", "cfg"),
  [
    (5632, 1024, None, None),
    (5504, 1024, 5461, None),
    (2816, 512, 2736, None),
    (5504, 1024, 5461, TopKConfig(compact=True, chunk=512, fan=2)),
    (1408, 256, 1376, TopKConfig(compact=True)),
    (5504, 1024, 5461, TopKConfig(compact=True, chunk=512, rows=2, gauss_margin=0.1)),  # no ballot
  ],
)
def test_gpu_real_sizes(f, k, nv, cfg):
  g, u, dz = _inputs(16384, f, jnp.bfloat16, f)
  out = moc_train.train_forward_epilogue(g, u, k, "moc", num_valid=nv, config=cfg)
  ref = reference.train_forward_epilogue(g, u, k, "moc", num_valid=nv)
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(ref[0]))
  _equal(out[1], ref[1])
  _equal(out[2], ref[2])
  _close(out[3], ref[3], jnp.bfloat16)
  idx16 = ref[0].astype(jnp.uint16)
  for z_arg in (reference.silu_and_mul(ref[1], ref[2]), None):
    dg, du, z = moc_train.train_backward_epilogue(dz, idx16, ref[1], ref[2], z_arg)
    ref_dg, ref_du, ref_z = reference.train_backward_epilogue(dz, *ref[:3], z_arg)
    _close(dg, ref_dg, jnp.bfloat16)
    _close(du, ref_du, jnp.bfloat16)
    _close(z, ref_z, jnp.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize(
  ("keep_z", "ties", "f", "k", "nv"),
  [
    (True, False, 5504, 1024, 5461),
    (False, True, 5504, 1024, 5461),
    (True, False, 2048, 384, 2048),  # no padding channel (the 130m layer)
    (False, True, 1408, 256, 1376),  # the 60m layer: 2-warp selection, row-walk backward
    (True, False, 2816, 512, 2736),  # the 350m layer: 2-warp selection
  ],
)
def test_gpu_bitmask_real_size(keep_z, ties, f, k, nv):
  """Each preset's layer shape with the default configs for its width."""
  g, u, dz = _padded_inputs(16384, f, jnp.bfloat16, f + 3, ties, num_valid=nv)
  out = moc_train_mask.train_forward_bitmask(g, u, k, num_valid=nv, z_sel=keep_z)
  ref = reference.train_forward_epilogue(g, u, k, "moc", num_valid=nv)
  np.testing.assert_array_equal(np.asarray(out[0]), _words_of(ref[0], f))
  _equal(out[1], ref[1])
  _equal(out[2], ref[2])
  _close(out[3], ref[3], jnp.bfloat16)
  z_sel = out[4] if keep_z else None
  dg, du, z = moc_train_mask.train_backward_bitmask(dz, *out[:3], z_sel)
  ref_dg, ref_du, _ = reference.train_backward_epilogue(dz, *ref[:3], z_sel)
  _close(dg, ref_dg, jnp.bfloat16)
  _close(du, ref_du, jnp.bfloat16)
  _equal(z, out[3])


@pytest.mark.gpu
@pytest.mark.parametrize(("f", "k", "nv"), [(5504, 1024, 5461), (1408, 256, 1376)])
def test_gpu_forward_gather_real_size(f, k, nv):
  """The default forward pass, its slots gathered (`_apply_gather`), gives the scatter walk's
  outputs bit for bit at the 1B and 60M layer shapes, ties included."""
  g, u, _ = _padded_inputs(16384, f, jnp.bfloat16, f + 11, True, num_valid=nv)
  walk = dataclasses.replace(moc_train.forward_config(f), apply_mode="row", apply_warps=4)
  got = moc_train_mask.train_forward_bitmask(g, u, k, num_valid=nv, z_sel=True)
  want = moc_train_mask.train_forward_bitmask(g, u, k, num_valid=nv, config=walk, z_sel=True)
  for a, b in zip(got, want, strict=True):
    _equal(a, b)
