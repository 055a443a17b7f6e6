"""Pallas MoC train epilogues against `reference.train_{forward,backward}_epilogue`.

Interpret mode on CPU. Unwritten outputs would read NaN / INT32_MIN there, so equality
with the reference also shows every element (the zero fill included) was written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import moc_train, reference
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
  ("variant", "dtype", "t", "f", "k", "ties"),
  [
    ("moc", jnp.bfloat16, 6, 1376, 256, False),
    ("moc", jnp.float32, 5, 200, 100, True),
    ("moc_2of8", jnp.bfloat16, 5, 96, 24, True),
  ],
)
def test_forward_and_backward(variant, dtype, t, f, k, ties):
  g, u, dz = _inputs(t, f, dtype, f, ties)
  out = moc_train.train_forward_epilogue(g, u, k, variant, config=TopKConfig(rows=2))
  ref = reference.train_forward_epilogue(g, u, k, variant)
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(ref[0]), err_msg=f"seed={_SEED}")
  for a, b in zip(out[1:3], ref[1:3], strict=True):
    np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), b.astype(jnp.float32))
  _close(out[3], ref[3], dtype)
  idx, g_sel, u_sel = ref[:3]
  dg, du, _ = moc_train.train_backward_epilogue(dz, idx, g_sel, u_sel, rows=2)
  ref_dg, ref_du, _ = reference.train_backward_epilogue(dz, idx, g_sel, u_sel)
  assert dg.dtype == du.dtype == dz.dtype
  _close(dg, ref_dg, dtype)
  _close(du, ref_du, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(("f", "k"), [(5632, 1024), (5461, 1024), (2736, 512)])
def test_gpu_real_sizes(f, k):
  g, u, dz = _inputs(16384, f, jnp.bfloat16, f)
  out = moc_train.train_forward_epilogue(g, u, k, "moc")
  ref = reference.train_forward_epilogue(g, u, k, "moc")
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(ref[0]))
  _close(out[3], ref[3], jnp.bfloat16)
  dg, du, _ = moc_train.train_backward_epilogue(dz, *ref[:3])
  ref_dg, ref_du, _ = reference.train_backward_epilogue(dz, *ref[:3])
  _close(dg, ref_dg, jnp.bfloat16)
  _close(du, ref_du, jnp.bfloat16)
