"""Shared by the streaming kernels' tests (test_mgpu_stream, test_mgpu_backward): their rows,
the forward's residuals, and bit-for-bit and 1-ulp comparisons."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from pallas_kernels import moc_train_mask as mm


def inputs(t: int, f: int, seed: int, ties: bool = False):
  keys = jax.random.split(jax.random.key(seed), 2)
  if ties:  # small integers: many keys equal the K-th
    g = jax.random.randint(keys[0], (t, f), -3, 4).astype(jnp.bfloat16)
  else:
    g = jax.random.normal(keys[0], (t, f)).astype(jnp.bfloat16)
  return g, jax.random.normal(keys[1], (t, f)).astype(jnp.bfloat16)


def assert_same(want, got, seed) -> None:
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


def bf16_bits(x) -> np.ndarray:
  return np.asarray(x, ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)


def gate_values(n: int, seed: int):
  """bf16 g (Gaussian, then a ramp over [-20, 20] for the exp's range reduction), u and dz."""
  rng = np.random.default_rng(seed)
  g = np.concatenate([rng.normal(size=n), np.linspace(-20, 20, n)])
  u, dz = rng.normal(size=2 * n), rng.normal(size=2 * n)
  return (np.asarray(v, ml_dtypes.bfloat16) for v in (g, u, dz))


def assert_near(got_bits, want, seed) -> None:
  """The PTX's bf16 results against jnp's: at most 1 ulp apart, 99% equal (the evaluator's
  ex2 and divide are exact where the GPU's are within 2 fp32 ulp)."""
  got = np.asarray(got_bits, np.uint16).view(ml_dtypes.bfloat16).astype(np.float32)
  want = np.asarray(want, ml_dtypes.bfloat16).astype(np.float32)
  ulp = np.abs(want.view(np.int32) - got.view(np.int32)) >> 16
  assert ulp.max() <= 1 and np.mean(got == want) >= 0.99, f"{seed=} {ulp.max()=}"


def residuals(t: int, f: int, k: int, seed: int, num_valid=None, ties=False, interpret=True):
  """dZ and the forward's (words, G_sel, U_sel, Z_sel) for `inputs`' rows."""
  g, u = inputs(t, f, seed, ties)
  dz = jax.random.normal(jax.random.key(seed + 1), (t, f)).astype(jnp.bfloat16)
  words, gs, us, _, zs = mm.train_forward_bitmask(
    g, u, k, num_valid=num_valid, interpret=interpret, z_sel=True
  )
  return dz, words, gs, us, zs
