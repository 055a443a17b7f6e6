"""Pallas top-K selection against `reference.select` (interpret mode on CPU).

Outputs are fresh pallas_call buffers: in interpret mode an unwritten float is NaN and an
unwritten int32 is INT32_MIN, so exact equality with the reference also proves every
element was written.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import reference, topk
from pallas_kernels.topk import TopKConfig

_SEED = np.random.SeedSequence().entropy  # fresh inputs every run; printed on failure


def _key(tag: int) -> jax.Array:
  return jax.random.fold_in(jax.random.PRNGKey(_SEED % (2**31)), tag)


def _assert_same(g, k, variant, **kw):
  idx, val = topk.select(g, k, variant, **kw)
  assert idx.shape[:-1] == g.shape[:-1]
  idx, val = idx.reshape(-1, idx.shape[-1]), val.reshape(-1, val.shape[-1])
  ref_idx, ref_val = reference.select(g.reshape(-1, g.shape[-1]), k, variant)
  assert idx.dtype == jnp.int32 and val.dtype == g.dtype, f"seed={_SEED}"
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(ref_idx), err_msg=f"seed={_SEED}")
  np.testing.assert_array_equal(
    np.asarray(val.astype(jnp.float32)), np.asarray(ref_val.astype(jnp.float32))
  )


@pytest.mark.parametrize(
  ("dtype", "t", "f", "k", "config"),
  [
    (jnp.bfloat16, 5, 1376, 256, TopKConfig(fan=3, rows=2)),  # radix-4 search, ragged rows
    (jnp.float32, 4, 700, 128, TopKConfig(rows=2)),  # 32-bit keys, integer counts
    (jnp.float32, 3, 700, 128, TopKConfig(rows=2, chunk=256)),  # chunks, a padding-only row
    (jnp.bfloat16, 3, 5461, 1024, TopKConfig(count="int", granule=0)),  # odd F, one block
    # equal chunks (the last one ragged), packed counts: ternary; radix 4 (a pair + one)
    (jnp.bfloat16, 3, 5461, 1024, TopKConfig(chunk=512, fan=2)),
    (jnp.bfloat16, 5, 1376, 256, TopKConfig(chunk=1024, fan=3, rows=2, count="int")),
    (jnp.bfloat16, 3, 2736, 512, TopKConfig(rows=2, strided=False)),  # contiguous lanes
  ],
)
def test_random_rows(dtype, t, f, k, config):
  g = jax.random.normal(_key(f), (t, f), jnp.float32).astype(dtype)
  _assert_same(g, k, "moc", config=config)


@pytest.mark.parametrize(("dtype", "k"), [(jnp.bfloat16, 1), (jnp.float32, 150)])
def test_ties_and_equal_rows(dtype, k):
  """Small-integer values and all-equal rows (ties to the lower channel); K = 1 and F / 2.

  Also leading dimensions: (2, 3, F) is flattened to rows and back.
  """
  f = 300
  g = jax.random.randint(_key(k), (6, f), -2, 3).astype(dtype)
  g = g.at[4].set(1.5).at[5].set(-0.75).reshape(2, 3, f)
  _assert_same(g, k, "moc", config=TopKConfig(rows=2, fan=3 if k == 1 else 1))
  if dtype == jnp.bfloat16:  # ternary search over packed counts (16-bit keys)
    _assert_same(g, k, "moc", config=TopKConfig(rows=2, chunk=128, fan=2))
    _assert_same(g, k, "moc", config=TopKConfig(rows=4, chunk=64, fan=2))  # all-equal rows
  _assert_same(g, k, "moc", config=TopKConfig(rows=4, compact=True))  # bitmask + compaction


def _subnormals(seed: int, f: int, dtype) -> jax.Array:
  """A row of small multiples of the smallest subnormal, both signs, and +-0 (built on the
  host: XLA on CPU may flush subnormal arithmetic to zero)."""
  rng = np.random.default_rng(seed)
  tiny = float(jnp.finfo(dtype).smallest_subnormal)
  vals = rng.integers(-3, 4, f) * tiny
  vals[::11] = -0.0
  return jnp.asarray(vals.astype(jnp.dtype(dtype)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("k", [1, 37, 150])
def test_pair_counts(dtype, k):
  """count='pair' (values counted two per instruction as 16-bit floats) at the edges where
  float order and key order part: -0 vs +0 at the threshold, +-inf, the lowest finite value,
  all-equal rows, a ragged last chunk and ternary / bisection searches."""
  f = 300
  g = jax.random.normal(_key(k + 11), (8, f), jnp.float32).astype(dtype)
  zeros = jnp.where(jnp.arange(f) % 3 == 0, -0.0, 0.0)
  g = g.at[0].set(zeros.astype(dtype))  # only +-0: v = key(+0) or key(-0)
  g = g.at[1].set(jnp.where(jnp.arange(f) < 20, 1.0, zeros).astype(dtype))  # K-th among +-0
  g = g.at[2].set(jnp.where(jnp.arange(f) % 7 == 0, jnp.inf, -jnp.inf).astype(dtype))
  g = g.at[3].set(jnp.finfo(dtype).min).at[4].set(jnp.finfo(dtype).max)
  g = g.at[5, ::5].set(-jnp.inf).at[6, ::4].set(jnp.inf)
  g = g.at[7].set(_subnormals(k, f, dtype))
  for fan in (1, 2):
    _assert_same(g, k, "moc", config=TopKConfig(count="pair", chunk=64, fan=fan, rows=2))
  _assert_same(g, k, "moc", config=TopKConfig(count="pair", chunk=128, compact=True))


def test_group_2of8():
  g = jax.random.normal(_key(7), (5, 96), jnp.float32).astype(jnp.bfloat16)
  g = g.at[0].set(jax.random.randint(_key(8), (96,), -1, 2).astype(jnp.bfloat16))
  g = g.at[1].set(0.5)
  _assert_same(g, 24, "moc_2of8", config=TopKConfig(rows=2))
  _assert_same(g, 24, "moc_2of8", config=TopKConfig(rows=2, compact=True))  # bitmask path


@pytest.mark.parametrize(
  ("f", "k", "config"),
  [
    (5461, 1024, TopKConfig(compact=True)),  # odd F: a ragged last word
    (2736, 512, TopKConfig(rows=2, chunk=512, fan=2, compact=True)),
  ],
)
def test_compact(f, k, config):
  """Shapes as in test_random_rows (reference compiles shared); rows with ties at v."""
  g = jax.random.normal(_key(f + 1), (3, f), jnp.float32).astype(jnp.bfloat16)
  g = g.at[1].set(jnp.where(jnp.arange(f) % 3 == 0, -0.0, 0.0).astype(g.dtype))  # +-0 ties
  g = g.at[2, : f // 2].set(g[2, f // 2 : 2 * (f // 2)])  # duplicated half: ties at v
  _assert_same(g, k, "moc", config=config)


def test_errors():
  for bad in (dict(fan=4), dict(chunk=384), dict(ablate="no_scan")):
    with pytest.raises(ValueError):
      TopKConfig(**bad)
  with pytest.raises(ValueError, match="pair"):  # packed counts need equal chunks
    topk.select(jnp.ones((2, 64), jnp.bfloat16), 8, config=TopKConfig(count="pair"))
  g = jnp.ones((2, 64), jnp.float32)
  for k, variant in ((0, "moc"), (65, "moc"), (8, "moc_3of8")):
    with pytest.raises(ValueError):
      topk.select(g, k, variant)
  with pytest.raises(ValueError):
    topk.select(jnp.ones((2, 60)), 15, "moc_2of8")


@pytest.mark.gpu
@pytest.mark.parametrize(
  ("dtype", "f", "k"),
  [
    (jnp.bfloat16, 5632, 1024),
    (jnp.bfloat16, 5461, 1024),
    (jnp.bfloat16, 1376, 256),
    (jnp.bfloat16, 16384, 4096),
    (jnp.float32, 2736, 512),
  ],
)
def test_gpu_real_sizes(dtype, f, k):
  g = jax.random.normal(_key(f + k), (16384, f), jnp.float32).astype(dtype)
  _assert_same(g, k, "moc")
  gi = jax.random.randint(_key(f), (512, f), -3, 4).astype(dtype)  # heavy ties
  _assert_same(gi, k, "moc")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_gpu_pair_counts(dtype):
  """count='pair' compiled: real rows, heavy ties, +-0, +-inf and subnormal rows."""
  f, k = 5461, 1024
  cfg = TopKConfig(count="pair", chunk=512)
  g = jax.random.normal(_key(f + 5), (16384, f), jnp.float32).astype(dtype)
  _assert_same(g, k, "moc", config=cfg)
  gi = jax.random.randint(_key(f), (512, f), -3, 4).astype(dtype)
  gi = gi.at[0].set(jnp.where(jnp.arange(f) % 3 == 0, -0.0, 0.0).astype(dtype))
  gi = gi.at[1].set(jnp.where(jnp.arange(f) % 7 == 0, jnp.inf, -jnp.inf).astype(dtype))
  gi = gi.at[2].set(_subnormals(2, f, dtype)).at[3].set(-_subnormals(3, f, dtype))
  _assert_same(gi, k, "moc", config=cfg)
  _assert_same(gi, k, "moc", config=TopKConfig(count="pair", chunk=512, fan=2))


@pytest.mark.gpu
def test_gpu_group_2of8():
  g = jax.random.normal(_key(11), (4096, 5632), jnp.float32).astype(jnp.bfloat16)
  _assert_same(g, 5632 // 4, "moc_2of8")
