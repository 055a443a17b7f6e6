"""Attention of one new token per row against its KV cache, as one Pallas kernel.

Why: XLA's attention for a decode step is several kernels (the q·K dot, the softmax's max and
sum, the P·V dot, their casts) and reads every cache slot, filled or not. Here program (b, h)
walks only the slots 0…pos[b] of its head in blocks, with an online softmax in fp32 (running
max, sum and accumulator), and writes o = acc / sum once: one launch per layer, and cache
bytes read in proportion to the context so far. Given the new token's k, v, it also writes
them into the cache (in place), so the cache update is no launch of its own either.
Same result as `jax.nn.dot_product_attention(q, k, v, mask=slots <= pos)` up to rounding
(the reference rounds the probabilities to the inputs' dtype before P·V; this keeps them in
fp32). The grid is rows × heads (16 programs for the 1b preset at batch 1): enough for the
short contexts timed here; long contexts would want each row's slots split over programs
too (flash-decoding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _triton_utils as tu
from pallas_kernels._decode_config import pow2_at_least

F32 = jnp.float32
I32 = jnp.int32


def _attend_kernel(q_ref, *refs, block_s, num_slots, head_dim, scale, write):
  """write: refs are (k_new, v_new, k, v, pos, o, k_out, v_out), k_out / v_out aliasing k / v;
  the new token's k, v go to slot pos and enter the softmax from registers, the cache gives
  slots 0…pos-1. Else (k, v, pos, o): slots 0…pos all from the cache."""
  if write:
    k_new_ref, v_new_ref, k_ref, v_ref, pos_ref, o_ref, k_out_ref, v_out_ref = refs
  else:
    k_ref, v_ref, pos_ref, o_ref = refs
  b, h = pl.program_id(0), pl.program_id(1)
  e = jnp.arange(pow2_at_least(head_dim), dtype=I32)
  in_head = e < head_dim
  q = plgpu.load(q_ref.at[b, h, e], mask=in_head, other=0).astype(F32)
  pos = pos_ref[b]
  cached = pos if write else pos + 1  # slots read from the cache: 0 … cached - 1

  def block(i, carry):
    top, total, acc = carry
    slots = i * block_s + jnp.arange(block_s, dtype=I32)
    filled = slots < cached
    both = filled[:, None] & in_head[None, :]
    at = (b, jnp.minimum(slots, num_slots - 1)[:, None], h, e[None, :])  # masked past pos
    keys = plgpu.load(k_ref.at[at], mask=both, other=0).astype(F32)
    vals = plgpu.load(v_ref.at[at], mask=both, other=0).astype(F32)
    logits = jnp.where(filled, jnp.sum(keys * q[None, :], axis=1) * scale, -jnp.inf)
    top_new = jnp.maximum(top, jnp.max(logits))
    p = jnp.exp(logits - top_new)
    rescale = jnp.exp(top - top_new)
    acc = acc * rescale + jnp.sum(p[:, None] * vals, axis=0)
    return top_new, total * rescale + jnp.sum(p), acc

  init = (jnp.float32(-jnp.inf), jnp.float32(0), jnp.zeros(e.shape, F32))
  if write:  # the new token first, as the cache would hold it (its dtype's rounding)
    at = (b, pos, h, e)
    k_new = plgpu.load(k_new_ref.at[b, h, e], mask=in_head, other=0).astype(k_out_ref.dtype)
    v_new = plgpu.load(v_new_ref.at[b, h, e], mask=in_head, other=0).astype(v_out_ref.dtype)
    plgpu.store(k_out_ref.at[at], k_new, mask=in_head)
    plgpu.store(v_out_ref.at[at], v_new, mask=in_head)
    init = (jnp.sum(k_new.astype(F32) * q) * scale, jnp.float32(1), v_new.astype(F32))
  _, total, acc = lax.fori_loop(0, pl.cdiv(cached, block_s), block, init)
  plgpu.store(o_ref.at[b, h, e], (acc / total).astype(o_ref.dtype), mask=in_head)


def _check(q_BxHxE, k_BxSxHxE, v_BxSxHxE, block_s: int) -> None:
  batch, heads, head_dim = q_BxHxE.shape
  num_slots = k_BxSxHxE.shape[1]
  if k_BxSxHxE.shape != v_BxSxHxE.shape or k_BxSxHxE.shape != (batch, num_slots, heads, head_dim):
    raise ValueError(
      f"decode attention needs q (B, H, E) and k, v (B, S, H, E) alike, got "
      f"{q_BxHxE.shape}, {k_BxSxHxE.shape}, {v_BxSxHxE.shape}"
    )
  if block_s & (block_s - 1):
    raise ValueError(f"block_s={block_s} must be a power of two")


def _call(q_BxHxE, k_BxSxHxE, write: bool, block_s: int, num_warps: int, interpret, **kw):
  batch, heads, head_dim = q_BxHxE.shape
  kernel = functools.partial(
    _attend_kernel,
    block_s=block_s,
    num_slots=k_BxSxHxE.shape[1],
    head_dim=head_dim,
    scale=head_dim**-0.5,
    write=write,
  )
  o = jax.ShapeDtypeStruct(q_BxHxE.shape, q_BxHxE.dtype)
  cache = jax.ShapeDtypeStruct(k_BxSxHxE.shape, k_BxSxHxE.dtype)
  return pl.pallas_call(
    kernel,
    out_shape=(o, cache, cache) if write else o,
    grid=(batch, heads),
    compiler_params=tu.compiler_params(num_warps, num_stages=2),
    interpret=tu.default_interpret(interpret),
    name="decode_attention",
    **kw,
  )


@functools.partial(jax.jit, static_argnames=("block_s", "num_warps", "interpret"))
def attend(
  q_BxHxE: jax.Array,
  k_BxSxHxE: jax.Array,
  v_BxSxHxE: jax.Array,
  pos_B: jax.Array,
  new_kv: tuple[jax.Array, jax.Array] | None = None,
  *,
  block_s: int = 64,
  num_warps: int = 4,
  interpret: bool | None = None,
):
  """Each row's query against its cache slots 0…pos[b] (pos in [0, S)), softmax scaled by
  1/sqrt(E), o_BxHxE in q's dtype.

  new_kv None: slot pos already holds the new token; returns o. new_kv = (k_BxHxE, v_BxHxE):
  they are written at slot pos first, in the same kernel; returns (o, k cache, v cache), the
  kernel's outputs aliasing the caches (in place wherever XLA can update them, as in the
  decode loop)."""
  _check(q_BxHxE, k_BxSxHxE, v_BxSxHxE, block_s)
  pos_B = pos_B.astype(I32)
  if new_kv is None:
    call = _call(q_BxHxE, k_BxSxHxE, False, block_s, num_warps, interpret)
    return call(q_BxHxE, k_BxSxHxE, v_BxSxHxE, pos_B)
  k_new, v_new = new_kv
  if k_new.shape != q_BxHxE.shape or v_new.shape != q_BxHxE.shape:
    raise ValueError(
      f"the new k, v must be shaped as q {q_BxHxE.shape}, got {k_new.shape}, {v_new.shape}"
    )
  aliases = {3: 1, 4: 2}  # the caches are updated in place
  call = _call(
    q_BxHxE, k_BxSxHxE, True, block_s, num_warps, interpret, input_output_aliases=aliases
  )
  return call(q_BxHxE, k_new, v_new, k_BxSxHxE, v_BxSxHxE, pos_B)
