"""The one-kernel decode attention (`pallas_kernels.decode_attention`) against a float64
reference and XLA's attention, in interpret mode on the CPU; compiled on a GPU (marked)."""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode_attention


def _inputs(seed: int, batch: int, slots: int, heads: int, head_dim: int, dtype):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (batch, heads, head_dim)).astype(dtype)
  k = (3 * jax.random.normal(ks[1], (batch, slots, heads, head_dim))).astype(dtype)
  v = jax.random.normal(ks[2], (batch, slots, heads, head_dim)).astype(dtype)
  return q, k, v


def _reference(q, k, v, pos) -> np.ndarray:
  """float64 softmax(q·K/sqrt(E)) V over slots 0…pos[b]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  out = np.zeros(q.shape)
  for b, p in enumerate(np.asarray(pos)):
    logits = np.einsum("he,she->hs", q[b], k[b, : p + 1]) / np.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    out[b] = np.einsum("hs,she->he", w / w.sum(axis=1, keepdims=True), v[b, : p + 1])
  return out


@pytest.mark.parametrize(
  ("batch", "slots", "heads", "head_dim", "block_s", "pos"),
  [
    (1, 1, 2, 16, 16, [0]),  # one slot
    (3, 77, 2, 16, 16, [0, 31, 76]),  # odd cache length; first, block edge, last slot
    (2, 130, 3, 24, 32, [64, 129]),  # head_dim not a power of two; pos on a block start
    (2, 256, 4, 32, 64, [127, 200]),
  ],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("prefetch", [False, True])
def test_attend_matches_float64_reference(
  batch, slots, heads, head_dim, block_s, pos, dtype, prefetch
):
  """Slots past pos hold large values (poison): they must not change the result, with each
  block loaded in its own step or one step ahead (prefetch)."""
  seed = time.time_ns() % (2**31)
  q, k, v = _inputs(seed, batch, slots, heads, head_dim, dtype)
  pos = jnp.asarray(pos, jnp.int32)
  past = jnp.arange(slots)[None, :, None, None] > pos[:, None, None, None]
  k, v = jnp.where(past, 1e4, k).astype(dtype), jnp.where(past, -1e4, v).astype(dtype)
  got = decode_attention.attend(q, k, v, pos, block_s=block_s, interpret=True, prefetch=prefetch)
  assert got.shape == q.shape and got.dtype == q.dtype
  want = _reference(q, k, v, pos)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol, rtol=tol)


@pytest.mark.parametrize(
  ("batch", "slots", "block_s", "pos"),
  [(1, 1, 16, [0]), (3, 77, 16, [0, 16, 76]), (2, 130, 32, [64, 129])],
)
@pytest.mark.parametrize(
  ("dtype", "cache_dtype"),
  [(jnp.float32, jnp.float32), (jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16)],
)
def test_attend_with_new_kv_equals_an_update_then_attend(
  batch, slots, block_s, pos, dtype, cache_dtype
):
  """The new k, v land at slot pos (rounded to the cache's dtype), every other slot is kept,
  and o is the attention over the updated cache; slot pos holds poison before the write."""
  seed = time.time_ns() % (2**31)
  heads, head_dim = 2, 24
  q, k, v = _inputs(seed, batch, slots, heads, head_dim, cache_dtype)
  new_q, k_new, v_new = _inputs(seed + 1, batch, 1, heads, head_dim, dtype)
  new_q, k_new, v_new = q.astype(dtype), k_new[:, 0], v_new[:, 0]
  pos = jnp.asarray(pos, jnp.int32)
  at = jnp.arange(slots)[None, :, None, None] == pos[:, None, None, None]
  k, v = jnp.where(at, 1e4, k).astype(cache_dtype), jnp.where(at, -1e4, v).astype(cache_dtype)
  rows = jnp.arange(batch)
  want_k = k.at[rows, pos].set(k_new.astype(cache_dtype))
  want_v = v.at[rows, pos].set(v_new.astype(cache_dtype))
  o, got_k, got_v = decode_attention.attend(
    new_q, k, v, pos, (k_new, v_new), block_s=block_s, interpret=True
  )
  assert np.array_equal(np.asarray(got_k), np.asarray(want_k))
  assert np.array_equal(np.asarray(got_v), np.asarray(want_v))
  assert o.shape == new_q.shape and o.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  want = _reference(new_q, want_k, want_v, pos)
  np.testing.assert_allclose(np.asarray(o, np.float64), want, atol=tol, rtol=tol)


@pytest.mark.parametrize(("write", "prefetch"), [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize(
  ("slots", "block_s", "chunk", "pos"), [(130, 16, 32, [0, 33, 129]), (77, 16, 16, [76, 15, 40])]
)
def test_chunks_merge_to_one_softmax(write, prefetch, slots, block_s, chunk, pos):
  """The cache split into chunks (programs), their softmaxes merged by XLA: empty chunks
  (past pos), a chunk holding only the new token, a pos on a chunk edge; prefetch (blocks
  loaded one step ahead) gives the same bits."""
  seed = time.time_ns() % (2**31)
  q, k, v = _inputs(seed, 3, slots, 2, 24, jnp.float32)
  pos = jnp.asarray(pos, jnp.int32)
  rows = jnp.arange(3)
  if write:
    k_new, v_new = k[rows, pos], v[rows, pos]
    poisoned = [c.at[rows, pos].set(1e4) for c in (k, v)]
    kw = dict(block_s=block_s, chunk=chunk, interpret=True)
    o, k2, v2 = decode_attention.attend(q, *poisoned, pos, (k_new, v_new), prefetch=prefetch, **kw)
    assert np.array_equal(np.asarray(k2), np.asarray(k))
    assert np.array_equal(np.asarray(v2), np.asarray(v))
    if prefetch:
      plain = decode_attention.attend(q, *poisoned, pos, (k_new, v_new), **kw)[0]
      np.testing.assert_array_equal(np.asarray(o), np.asarray(plain))
  else:
    o = decode_attention.attend(q, k, v, pos, block_s=block_s, chunk=chunk, interpret=True)
  want = _reference(q, k, v, pos)
  np.testing.assert_allclose(np.asarray(o, np.float64), want, atol=1e-5, rtol=1e-5)
  assert decode_attention.default_chunk(4096, 64) == 256
  assert decode_attention.default_chunk(500, 64) == 512


def test_attend_equals_xla_attention_in_fp32():
  """What the model's xla decode path computes, to fp32 rounding."""
  q, k, v = _inputs(1, 2, 40, 2, 16, jnp.float32)
  pos = jnp.asarray([5, 39], jnp.int32)
  mask = (jnp.arange(40)[None, None, :] <= pos[:, None, None])[:, None]
  want = jax.nn.dot_product_attention(q[:, None], k, v, mask=mask, implementation="xla")[:, 0]
  got = decode_attention.attend(q, k, v, pos, block_s=16, interpret=True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("slots", "pos", "chunk"), [(37, [0, 36], None), (300, [299, 130], 64)])
def test_attend_qkv_equals_rope_then_attend(slots, pos, chunk):
  """The q, k, v GEMV's output (B, 3, H, E) with RoPE applied inside the kernel: the same o
  and caches as `model.apply_rope` on q and k, then `attend` with new_kv (bf16, one chunk or
  several)."""
  from moc_jax.model import apply_rope, rope_cos_sin

  seed, batch, heads, head_dim = time.time_ns() % (2**31), 2, 3, 24
  dtype = jnp.bfloat16
  _, k, v = _inputs(seed, batch, slots, heads, head_dim, dtype)
  qkv = jax.random.normal(jax.random.key(seed + 1), (batch, 3, heads, head_dim), dtype)
  pos = jnp.asarray(pos, jnp.int32)
  rope = lambda t: apply_rope(t[:, None], pos[:, None], 500.0)[:, 0]
  new_kv = (rope(qkv[:, 1]), qkv[:, 2])
  want = decode_attention.attend(
    rope(qkv[:, 0]), k, v, pos, new_kv, chunk=chunk, block_s=32, interpret=True
  )
  cos, sin = rope_cos_sin(pos, head_dim, 500.0)
  got = decode_attention.attend_qkv(
    qkv, k, v, pos, cos, sin, chunk=chunk, block_s=32, interpret=True
  )
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(
      np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=f"{seed=}"
    )
  with pytest.raises(ValueError, match="cos, sin"):
    decode_attention.attend_qkv(qkv, k, v, pos, cos[:, :3], sin, interpret=True)


def _qkv_case(seed: int, slots: int, pos, batch=2, heads=3, head_dim=24):
  """A bf16 qkv, caches, positions and RoPE tables for `attend_qkv`."""
  from moc_jax.model import rope_cos_sin

  _, k, v = _inputs(seed, batch, slots, heads, head_dim, jnp.bfloat16)
  qkv = jax.random.normal(jax.random.key(seed + 1), (batch, 3, heads, head_dim), jnp.bfloat16)
  pos = jnp.asarray(pos, jnp.int32)
  return (qkv, k, v, pos, *rope_cos_sin(pos, head_dim, 500.0))


@pytest.mark.parametrize(("slots", "pos", "chunk"), [(37, [0, 36], None), (300, [299, 130], 64)])
def test_attend_qkv_with_warm_is_unchanged(slots, pos, chunk):
  """With weights to warm, the attention's programs run on one unravelled axis (here alone,
  as interpret mode runs them), and with blocks loaded one step ahead: the same o and caches
  bit for bit, one chunk or several; the launch with the warming programs lowers to one
  Triton call for CUDA."""
  seed = time.time_ns() % (2**31)
  args = _qkv_case(seed, slots, pos)
  w_o, w_g = (jax.random.normal(jax.random.key(seed + i), (72, 40), jnp.bfloat16) for i in (2, 3))
  kw = dict(chunk=chunk, block_s=32)
  want = decode_attention.attend_qkv(*args, **kw, interpret=True)
  warm = dict(warm=(w_o, w_g), warm_bytes=(w_o.nbytes, 1000), prefetch=True)
  got = decode_attention.attend_qkv(*args, **kw, **warm, interpret=True)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(
      np.asarray(g, np.float32), np.asarray(w, np.float32), err_msg=f"{seed=}"
    )
  fn = lambda *a: decode_attention.attend_qkv(*a, **kw, **warm, interpret=False)
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1 and "decode_attention_warm" in text
  with pytest.raises(ValueError, match="one entry per warm weight"):
    decode_attention.attend_qkv(*args, warm=(w_o,), warm_bytes=(), interpret=True)


def test_attend_refuses_mismatched_shapes():
  q, k, v = _inputs(0, 2, 8, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match="k, v"):
    decode_attention.attend(q, k[:, :, :1], v[:, :, :1], jnp.zeros(2, jnp.int32))
  with pytest.raises(ValueError, match="power of two"):
    decode_attention.attend(q, k, v, jnp.zeros(2, jnp.int32), block_s=24)
  with pytest.raises(ValueError, match="multiple of block_s"):
    decode_attention.attend(q, k, v, jnp.zeros(2, jnp.int32), block_s=16, chunk=24)
  with pytest.raises(ValueError, match="new k, v"):
    decode_attention.attend(q, k, v, jnp.zeros(2, jnp.int32), (q[:1], q))


@pytest.mark.gpu
def test_attend_gpu_1b_shape():
  """Compiled: the 1b preset's heads (16 × 128), a 256-slot bf16 cache, batch 4; reading
  only, and writing the new token first (inside a jit that updates the cache in place); and a
  4096-slot cache read in chunks."""
  seed = time.time_ns() % (2**31)
  q, k, v = _inputs(seed, 4, 256, 16, 128, jnp.bfloat16)
  pos = jnp.asarray([0, 63, 128, 255], jnp.int32)
  got = decode_attention.attend(q, k, v, pos)
  want = _reference(q, k, v, pos)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-2, rtol=2e-2)
  rows = jnp.arange(4)
  k_new, v_new = k[rows, pos], v[rows, pos]
  poisoned = [c.at[rows, pos].set(7.0) for c in (k, v)]
  o, k2, v2 = jax.jit(decode_attention.attend, donate_argnums=(1, 2))(
    q, *poisoned, pos, (k_new, v_new)
  )
  assert np.array_equal(np.asarray(k2), np.asarray(k)) and np.array_equal(v2, v)
  np.testing.assert_allclose(np.asarray(o, np.float64), want, atol=2e-2, rtol=2e-2)
  # a long cache: 4096 slots in chunks of 256 over more programs, merged by XLA; with each
  # block of slots loaded one step ahead, the same bits
  q, k, v = _inputs(seed + 1, 2, 4096, 16, 128, jnp.bfloat16)
  pos = jnp.asarray([700, 4095], jnp.int32)
  got = decode_attention.attend(q, k, v, pos)
  want = _reference(q, k, v, pos)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-2, rtol=2e-2)
  ahead = decode_attention.attend(q, k, v, pos, prefetch=True)
  np.testing.assert_array_equal(np.asarray(ahead, np.float32), np.asarray(got, np.float32))


@pytest.mark.gpu
def test_attend_qkv_gpu_1b_shape():
  """Compiled: RoPE and the split inside the kernel at the 1b heads, batch 2, 256 slots, the
  caches donated; o within bf16 rounding of RoPE by XLA then `attend`, the caches equal up to
  one bf16 rounding of the new k (XLA may contract the rotation into FMAs differently)."""
  from moc_jax.model import apply_rope, rope_cos_sin

  seed = time.time_ns() % (2**31)
  _, k, v = _inputs(seed, 2, 256, 16, 128, jnp.bfloat16)
  qkv = jax.random.normal(jax.random.key(seed + 1), (2, 3, 16, 128), jnp.bfloat16)
  pos = jnp.asarray([5, 255], jnp.int32)
  rope = lambda t: apply_rope(t[:, None], pos[:, None], 10000.0)[:, 0]
  want = decode_attention.attend(rope(qkv[:, 0]), k, v, pos, (rope(qkv[:, 1]), qkv[:, 2]))
  cos, sin = rope_cos_sin(pos, 128, 10000.0)
  fresh = lambda: (jnp.copy(k), jnp.copy(v))  # each donating call gets caches of its own
  got = jax.jit(decode_attention.attend_qkv, donate_argnums=(1, 2))(qkv, *fresh(), pos, cos, sin)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(
      np.asarray(g, np.float32), np.asarray(w, np.float32), atol=2e-2, rtol=2e-2
    )
  # beside 264 programs warming L2 with 16 MB of two weights, and each block of slots loaded
  # one step ahead: the same values bit for bit
  ws = tuple(jnp.ones((2048, 2048 * i), jnp.bfloat16) for i in (1, 3))
  warmed = jax.jit(
    functools.partial(decode_attention.attend_qkv, warm_bytes=(8 << 20, 8 << 20), prefetch=True),
    donate_argnums=(1, 2),
  )(qkv, *fresh(), pos, cos, sin, warm=ws)
  again = decode_attention.attend_qkv(qkv, *fresh(), pos, cos, sin)
  for g, w in zip(warmed, again, strict=True):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("ffn", ["moc", "dense"])
def test_model_attention_warm_plan_and_same_tokens(monkeypatch, ffn):
  """model.decode_attention_warm_mb: each layer's fused attention is handed the output
  projection whole, then the rest of the budget shared by the FFN's first weights (MoC: the
  gate; dense: gate and up); the fp32 tiny model's greedy tokens are those without warming
  (interpret mode runs the attention's programs alone, on the one axis they get beside
  warming programs)."""
  from flax import nnx

  from moc_jax import generate, model_config
  from moc_jax.model import Transformer

  cfg = model_config.from_preset(
    "tiny", vocab_size=301, num_layers=2, dtype="float32", ffn=ffn, decode_attention_warm_mb=0
  )
  plain = generate.with_backend(
    Transformer(cfg, nnx.Rngs(3)), "pallas", decode_attention="fused", decode_gemv="rowdot"
  )
  warmed = Transformer(dataclasses.replace(plain.cfg, decode_attention_warm_mb=1), nnx.Rngs(0))
  nnx.update(warmed, nnx.state(plain, nnx.Param))
  warmed.prepare_for_decode()
  seen = []
  real = decode_attention.attend_qkv
  monkeypatch.setattr(
    decode_attention,
    "attend_qkv",
    lambda *a, **kw: seen.append((kw["warm"], kw["warm_bytes"])) or real(*a, **kw),
  )
  block = warmed.blocks[0]
  w_o = block.attn.decode_weights[1][...]
  firsts = block.ffn.decode_weights[: 2 if ffn == "dense" else 1]
  share = ((1 << 20) - w_o.nbytes) // len(firsts)
  assert [b for _, b in block._attention_warm()] == [w_o.nbytes] + [share] * len(firsts)
  assert block._attention_warm()[1][0] is firsts[0][...]
  prompts = [[1, 5, 9, 13, 2], [3, 4, 60]]
  tokens = generate.generate(warmed, prompts, 4)
  assert seen and all(len(w) == len(b) == 1 + len(firsts) for w, b in seen)
  seen.clear()
  assert generate.generate(plain, prompts, 4) == tokens
  assert seen and all(w == b == () for w, b in seen)
