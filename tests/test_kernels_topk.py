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
    # the search from a Gaussian guess (heavy-tailed and shifted rows below: outer or open side)
    (jnp.bfloat16, 5, 1376, 256, TopKConfig(chunk=512, gauss_margin=0.1, rows=2)),
    (jnp.float32, 4, 700, 128, TopKConfig(gauss_margin=0.02)),
  ],
)
def test_random_rows(dtype, t, f, k, config):
  """Gaussian rows, one shifted Laplace row and one Cauchy row (tails far from Gaussian)."""
  g = jax.random.normal(_key(f), (t, f), jnp.float32)
  g = g.at[1].set(jax.random.laplace(_key(f + 1), (f,)) * 3 + 2)
  g = g.at[2].set(jax.random.cauchy(_key(f + 2), (f,)))
  _assert_same(g.astype(dtype), k, "moc", config=config)


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
  _assert_same(g, k, "moc", config=TopKConfig(chunk=64, compact=True, apply_mode="gather"))


def test_group_2of8():
  g = jax.random.normal(_key(7), (5, 96), jnp.float32).astype(jnp.bfloat16)
  g = g.at[0].set(jax.random.randint(_key(8), (96,), -1, 2).astype(jnp.bfloat16))
  g = g.at[1].set(0.5)
  _assert_same(g, 24, "moc_2of8", config=TopKConfig(rows=2))
  _assert_same(g, 24, "moc_2of8", config=TopKConfig(rows=2, compact=True))  # bitmask path
  _assert_same(g, 24, "moc_2of8", config=TopKConfig(compact=True, apply_mode="gather"))


@pytest.mark.parametrize(
  ("f", "k", "config"),
  [
    (5461, 1024, TopKConfig(compact=True)),  # odd F: a ragged last word
    (2736, 512, TopKConfig(rows=2, chunk=512, fan=2, compact=True)),
    (5461, 1024, TopKConfig(chunk=512, compact=True)),  # the train forward's selection
    (2736, 512, TopKConfig(rows=2, chunk=512, compact=True)),  # rows from the program id
    # slots gathered in order by a search over the words (`_apply_gather.compact_call`)
    (5461, 1024, TopKConfig(chunk=512, compact=True, gauss_margin=0.1, apply_mode="gather")),
    (2736, 512, TopKConfig(rows=2, chunk=512, compact=True, apply_mode="gather")),
    # fewer or more slots searched per step; K not a multiple of the step
    (2736, 500, TopKConfig(chunk=512, compact=True, apply_mode="gather", gather_slots=128)),
    (5461, 1024, TopKConfig(chunk=512, compact=True, apply_mode="gather", gather_slots=1024)),
  ],
)
def test_compact(f, k, config):
  """Shapes as in test_random_rows (reference compiles shared); rows with ties at v."""
  g = jax.random.normal(_key(f + 1), (3, f), jnp.float32).astype(jnp.bfloat16)
  g = g.at[1].set(jnp.where(jnp.arange(f) % 3 == 0, -0.0, 0.0).astype(g.dtype))  # +-0 ties
  g = g.at[2, : f // 2].set(g[2, f // 2 : 2 * (f // 2)])  # duplicated half: ties at v
  _assert_same(g, k, "moc", config=config)


@pytest.mark.parametrize("gauss", [0.0, 0.1])
@pytest.mark.parametrize("k", [1, 37, 350, 699, 700])
def test_mask_ties_across_chunks(k, gauss):
  """The bitmask's tie cut: values in {-2..2}, so the K-th value's ties span many 64-wide
  chunks and the cut lands in any of them; an all-equal row and a row of +-0; ragged rows
  (rows=2, T=5) and a ragged last chunk (F=700)."""
  g = jax.random.randint(_key(k), (5, 700), -2, 3).astype(jnp.bfloat16)
  g = g.at[3].set(1.5).at[4].set(jnp.where(jnp.arange(700) % 2 == 0, -0.0, 0.0))
  cfg = TopKConfig(rows=2, chunk=64, compact=True, gauss_margin=gauss)
  _assert_same(g, k, "moc", config=cfg)


def test_default_config():
  """`select` without a config: 512-wide chunks, the search from a checked Gaussian guess, the
  slots gathered (the H200 figures in `topk.default_config`); exact on shifted Laplace and
  Cauchy rows too."""
  assert topk.default_config(2048) is topk.default_config(5461) is topk.GAUSS_GATHER
  assert topk.default_config(5632, "moc_2of8") is topk.default_config(16384) is topk.GAUSS
  g = jax.random.normal(_key(3), (4, 1100), jnp.float32)
  g = (
    g.at[1]
    .set(jax.random.laplace(_key(4), (1100,)) - 3)
    .at[2]
    .set(jax.random.cauchy(_key(5), (1100,)))
  )
  _assert_same(g.astype(jnp.bfloat16), 200, "moc")  # config=None: three chunks, the last ragged


def test_errors():
  for bad in (dict(fan=4), dict(chunk=384), dict(ablate="no_scan"), dict(selection="x")):
    with pytest.raises(ValueError):
      TopKConfig(**bad)
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
  _assert_real_size(dtype, f, k, seed=f + k)


def _assert_real_size(dtype, f: int, k: int, seed: int, config=None):
  """16384 Gaussian rows, then 512 rows of heavy ties, against the reference."""
  g = jax.random.normal(_key(seed), (16384, f), jnp.float32).astype(dtype)
  _assert_same(g, k, "moc", config=config)
  gi = jax.random.randint(_key(f), (512, f), -3, 4).astype(dtype)  # heavy ties
  _assert_same(gi, k, "moc", config=config)


@pytest.mark.gpu
@pytest.mark.parametrize(
  ("dtype", "f", "k"),
  [
    (jnp.bfloat16, 5632, 1024),
    (jnp.bfloat16, 1376, 256),
    (jnp.float32, 2736, 512),
    (jnp.bfloat16, 16384, 4096),  # past topk.GATHER_MAX_F: forced here, to decide the cap
  ],
)
def test_gpu_compact_gather(dtype, f, k):
  """The two-kernel top-K with its slots gathered, against the reference, ties included."""
  _assert_real_size(dtype, f, k, seed=f - k, config=topk.GAUSS_GATHER)


@pytest.mark.gpu
def test_gpu_group_2of8():
  g = jax.random.normal(_key(11), (4096, 5632), jnp.float32).astype(jnp.bfloat16)
  _assert_same(g, 5632 // 4, "moc_2of8")


def test_gauss_bracket_holds_the_kth_key():
  """The guess's search state (plain jnp, as the kernel runs it) always contains the K-th key,
  whichever interval it lands in: Gaussian, skewed, Cauchy and constant rows, K = 1 ... F."""
  from pallas_kernels._topk_count import bracket_state, gauss_bracket
  from pallas_kernels._triton_utils import order_keys

  g = jax.random.normal(_key(21), (6, 300)) * jnp.array([1, 1, 1, 1, 1, 0])[:, None]
  g = g.at[1].set(jnp.exp(g[1]) - 2).at[2].set(jax.random.cauchy(_key(22), (300,)))
  g = g.at[3].multiply(1e-30).astype(jnp.bfloat16)
  keys = order_keys(g)
  x = g.astype(jnp.float32)
  s1, s2 = jnp.sum(x, 1, keepdims=True), jnp.sum(x * x, 1, keepdims=True)
  for k in (1, 56, 150, 300):
    kth = jnp.sort(keys, axis=1)[:, -k][:, None]
    thrs = gauss_bracket(s1, s2, 300, k, 0.1, g.dtype)
    counts = [jnp.sum(keys >= t, axis=1, keepdims=True) for t in thrs]
    lo, hi, chi = bracket_state(thrs, counts, k, g.dtype)
    assert bool(jnp.all((lo <= kth) & (kth <= hi))), k
    np.testing.assert_array_equal(chi, jnp.sum(keys > hi, axis=1, keepdims=True))
