"""The decode selection kernels (`pallas_kernels._decode_select`) against the reference's
selection, in interpret mode on the CPU: one program per token sums the gate GEMV's split
partials and selects exactly (ties to the lower channel), as a mask of silu(G), as per-token
lists, over equal chunks, or through the training top-K kernel; lowered for CUDA here.
Fresh random inputs every run; integer gates make ties on purpose.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _decode_select, reference, topk


def _seed() -> int:
  return time.time_ns() % (2**31)


def _selected(a_TxF: jax.Array, d_ff: int) -> np.ndarray:
  return np.asarray(a_TxF[:, :d_ff] != 0)


@pytest.mark.parametrize("variant", ["moc", "moc_2of8"])
def test_select_is_exact_with_ties(variant):
  """The selection kernel picks exactly the reference's channels, ties to the lower index."""
  seed, num_tokens, d_ff, k = _seed(), 5, 200, 37
  g_TxF = jax.random.randint(jax.random.key(seed), (num_tokens, d_ff), -6, 7).astype(jnp.float32)
  g_TxF = g_TxF.at[:, 5].set(-0.0).at[:, 9].set(0.0)  # +0 ranks above -0, as in lax.top_k
  width = 256
  partials = jnp.zeros((2, 1, num_tokens, width), jnp.float32)
  partials = partials.at[0, 0, :, :d_ff].set(g_TxF * 0.5).at[1, 0, :, :d_ff].set(g_TxF * 0.5)
  a = _decode_select.select_scale(
    partials, k, variant, d_ff=d_ff, round_dtype=jnp.bfloat16, radix_bits=2, interpret=True
  )
  idx, val = reference.select(g_TxF.astype(jnp.bfloat16), k, variant)
  want = np.zeros((num_tokens, d_ff), bool)
  np.put_along_axis(want, np.asarray(idx), True, axis=1)
  # silu(0) = 0 leaves a zero scale: compare the selection where the gate is nonzero.
  nonzero = np.asarray(g_TxF != 0)
  np.testing.assert_array_equal(_selected(a, d_ff) & nonzero, want & nonzero, err_msg=f"{seed=}")
  got_val = np.take_along_axis(np.asarray(a[:, :d_ff]), np.asarray(idx), axis=1)
  np.testing.assert_allclose(got_val, jax.nn.silu(val.astype(jnp.float32)), rtol=1e-6)


@pytest.mark.parametrize(("splits", "dtype"), [(2, jnp.bfloat16), (3, jnp.float32)])
def test_topk_from_partials_matches_reference(splits, dtype):
  """The top-K of G = the split partials summed and rounded as the select loads them: the
  reference's indices and values, ties (common in bf16) to the lower channel."""
  seed, t, d_ff, k = _seed(), 5, 203, 57
  p = jax.random.normal(jax.random.key(seed), (splits, t, 256), jnp.float32)
  p = p.at[:, :, d_ff:].set(jnp.nan)  # lanes past F must never be read
  idx, val = _decode_select.topk_from_partials(p, k, d_ff, dtype, topk.CHUNKED, True)
  g = functools.reduce(jnp.add, list(p[:, :, :d_ff])).astype(dtype)  # the kernel's order
  want_idx, want_val = reference.select(g, k, "moc")
  np.testing.assert_array_equal(idx, want_idx, err_msg=f"{seed=}")
  np.testing.assert_array_equal(val, want_val, err_msg=f"{seed=}")


@pytest.mark.parametrize("granule", [0, 8])  # 8: pieces of 128 + 64 + 16 lanes, not 256
def test_select_lists_match_reference(granule):
  """List outputs: the reference's ascending indices and silu(G) there, ties included (also
  across the pieces of a row split into powers of two)."""
  seed, num_tokens, d_ff, k = _seed(), 3, 203, 41
  g_TxF = jax.random.randint(jax.random.key(seed), (num_tokens, d_ff), -4, 5).astype(jnp.float32)
  partials = jnp.zeros((1, 1, num_tokens, 256), jnp.float32).at[0, 0, :, :d_ff].set(g_TxF)
  idx, a = _decode_select.select_scale(
    partials,
    k,
    "moc",
    d_ff=d_ff,
    round_dtype=jnp.float32,
    lists=True,
    interpret=True,
    granule=granule,
  )
  want_idx, want_val = reference.select(g_TxF, k, "moc")
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_idx), err_msg=f"{seed=}")
  np.testing.assert_allclose(np.asarray(a), jax.nn.silu(want_val), rtol=1e-6)


@pytest.mark.parametrize(
  ("num_tokens", "d_ff", "k", "dtype", "integer_gate", "radix_bits", "chunk", "lists"),
  [
    (1, 1376, 250, jnp.bfloat16, True, 2, 256, True),  # ties, 6 chunks, last one masked
    (3, 2736, 700, jnp.bfloat16, True, 4, 512, False),  # (16, 512) counts, mask output
    (3, 1376, 300, jnp.float32, False, 4, 512, True),  # 32-bit keys
    (1, 2736, 600, jnp.float32, True, 2, 256, False),  # 32-bit ties, 11 chunks
    (3, 203, 41, jnp.float32, True, 2, 32, True),  # 7 chunks of 32 lanes, final pieces of 256
    (1, 203, 41, jnp.bfloat16, False, 4, 512, False),  # one chunk (the row, 256 lanes)
  ],
)
def test_select_chunks_match_reference(
  num_tokens, d_ff, k, dtype, integer_gate, radix_bits, chunk, lists
):
  """select_chunk: the search on equal chunks (counts summed lane-wise), the final pass on
  re-loaded power-of-two pieces; exactly the reference's channels, ties to the lower index."""
  seed = _seed()
  key = jax.random.key(seed)
  if integer_gate:
    g_TxF = jax.random.randint(key, (num_tokens, d_ff), -6, 7).astype(jnp.float32)
    g_TxF = g_TxF.at[:, 5].set(-0.0).at[:, 9].set(0.0)  # +0 ranks above -0, as in lax.top_k
  else:
    g_TxF = jax.random.normal(key, (num_tokens, d_ff), jnp.float32)
  width = 1 << (d_ff - 1).bit_length()
  partials = jnp.zeros((2, 1, num_tokens, width), jnp.float32)  # halves: exact sums
  partials = partials.at[:, 0, :, :d_ff].set(jnp.stack([g_TxF * 0.5, g_TxF * 0.5]))
  out = _decode_select.select_scale(
    partials,
    k,
    "moc",
    d_ff=d_ff,
    round_dtype=dtype,
    radix_bits=radix_bits,
    lists=lists,
    interpret=True,
    chunk=chunk,
  )
  want_idx, want_val = reference.select(g_TxF.astype(dtype), k, "moc")
  want_a = jax.nn.silu(want_val.astype(jnp.float32))
  if lists:
    np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(want_idx), err_msg=f"{seed=}")
    np.testing.assert_allclose(np.asarray(out[1]), want_a, rtol=1e-6, err_msg=f"{seed=}")
    return
  want = np.zeros((num_tokens, d_ff), np.float32)
  np.put_along_axis(want, np.asarray(want_idx), np.asarray(want_a), axis=1)
  np.testing.assert_allclose(np.asarray(out[:, :d_ff]), want, rtol=1e-6, err_msg=f"{seed=}")


def test_select_chunks_lower_for_cuda():
  """The chunked select lowers to a Triton custom call for CUDA (no GPU needed to lower)."""
  partials = jax.ShapeDtypeStruct((2, 1, 1, 8192), jnp.float32)
  for lists, radix_bits in ((True, 2), (False, 4)):
    fn = functools.partial(
      _decode_select.select_scale,
      k=1024,
      variant="moc",
      d_ff=5464,
      round_dtype=jnp.bfloat16,
      radix_bits=radix_bits,
      lists=lists,
      chunk=512,
    )
    text = jax.jit(fn).trace(partials).lower(lowering_platforms=("cuda",)).as_text()
    assert "__gpu$xla.gpu.triton" in text
