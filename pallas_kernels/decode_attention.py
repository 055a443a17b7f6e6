"""Attention of one new token per row against its KV cache, as one Pallas kernel.

Why: XLA's attention for a decode step is several kernels (the q·K dot, the softmax's max and
sum, the P·V dot, their casts) and reads every cache slot, filled or not. Here program (b, h)
walks only the slots 0…pos[b] of its head in blocks, with an online softmax in fp32 (running
max, sum and accumulator), and writes o = acc / sum once: one launch per layer, and cache
bytes read in proportion to the context so far. Given the new token's k, v, it also writes
them into the cache (in place), so the cache update is no launch of its own either.
Same result as `jax.nn.dot_product_attention(q, k, v, mask=slots <= pos)` up to rounding
(the reference rounds the probabilities to the inputs' dtype before P·V; this keeps them in
fp32). Caches longer than 512 slots are split into chunks of 256 over more programs, whose
partial softmaxes XLA merges (one more small fusion): rows × heads programs alone (16 for the
1b preset at batch 1) would read a long cache on 16 SMs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _l2_prefetch
from pallas_kernels import _triton_utils as tu
from pallas_kernels._decode_config import pow2_at_least

F32 = jnp.float32
I32 = jnp.int32
# Warming programs beside the attention's own (`attend_qkv(warm=...)`): two per H200 SM, as
# the top-K's (`DecodeConfig.warm_programs`, the best of 131 and 264 there).
WARM_PROGRAMS = 264


def _rotated(ref, part, b, h, e, half, in_head, cos_ref, sin_ref, dtype):
  """RoPE of ref[b, part, h, :] at its row's position, as `model.apply_rope` computes it
  (pairs (i, i + E/2) in fp32, then rounded to `dtype`), from that row's cos and sin."""
  partner = jnp.where(e < half, e + half, e - half)
  x = plgpu.load(ref.at[b, part, h, e], mask=in_head, other=0).astype(F32)
  x_pair = plgpu.load(ref.at[b, part, h, partner], mask=in_head, other=0).astype(F32)
  i = jnp.where(e < half, e, e - half)
  cos = plgpu.load(cos_ref.at[b, i], mask=in_head, other=0)
  sin = plgpu.load(sin_ref.at[b, i], mask=in_head, other=0)
  out = jnp.where(e < half, x * cos - x_pair * sin, x * cos + x_pair * sin)
  return out.astype(dtype)


def _attend_kernel(
  *refs, block_s, chunk, num_slots, head_dim, scale, write, fused, flat_grid=None, prefetch=False
):
  """Program (b, h, c): query (b, h) against the cached slots [c·chunk, (c+1)·chunk).

  write: refs are (q, k_new, v_new, k, v, pos, outputs…, k_out, v_out), k_out / v_out aliasing
  k / v; the new token's k, v go to slot pos (by chunk 0) and enter chunk 0's softmax from
  registers, the cache gives slots 0…pos-1. fused: the same with (qkv, cos, sin) for
  (q, k_new, v_new): q, k, v unrotated in one (B, 3, H, E) array, RoPE applied here. Else
  (q, k, v, pos, outputs…): slots 0…pos all from the cache. Outputs: o (one chunk), or each
  chunk's running max, sum and fp32 accumulator for `_combine`. flat_grid = (B, H, C): the
  programs come as one axis of B·H·C (beside L2-warming programs: `_l2_prefetch`). prefetch:
  each block's K and V are loaded one block ahead, the first before the query is formed
  (Triton does not software-pipeline this multiply-reduce loop: without it, one HBM round
  trip per block)."""
  b, h, c = tu.program_ids(flat_grid or (1, 1, 1), flat=flat_grid is not None)
  e = jnp.arange(pow2_at_least(head_dim), dtype=I32)
  in_head = e < head_dim
  k_ref, v_ref, pos_ref = refs[3:6] if write else refs[1:4]
  pos = pos_ref[b]
  first = c * chunk
  # cached slots this program reads: first … end - 1
  end = jnp.minimum(pos if write else pos + 1, first + chunk)

  def slots_of(i):
    slots = first + i * block_s + jnp.arange(block_s, dtype=I32)
    return slots, slots < end

  def load_block(i):
    """Block i's cached keys and values (masked past end: no memory traffic)."""
    slots, filled = slots_of(i)
    both = filled[:, None] & in_head[None, :]
    at = (b, jnp.minimum(slots, num_slots - 1)[:, None], h, e[None, :])
    return tuple(plgpu.load(ref.at[at], mask=both, other=0) for ref in (k_ref, v_ref))

  first_kv = load_block(0) if prefetch else None
  if fused:
    qkv_ref, cos_ref, sin_ref, *outs = refs[:3] + refs[6:]
    outs, (k_out_ref, v_out_ref) = outs[:-2], outs[-2:]
    rope = functools.partial(
      _rotated,
      qkv_ref,
      b=b,
      h=h,
      e=e,
      half=head_dim // 2,
      in_head=in_head,
      cos_ref=cos_ref,
      sin_ref=sin_ref,
    )
    q = rope(0, dtype=qkv_ref.dtype).astype(F32)
    k_new = rope(1, dtype=k_out_ref.dtype)
    v_new = plgpu.load(qkv_ref.at[b, 2, h, e], mask=in_head, other=0).astype(v_out_ref.dtype)
  elif write:
    q_ref, k_new_ref, v_new_ref, *outs = refs[:3] + refs[6:]
    outs, (k_out_ref, v_out_ref) = outs[:-2], outs[-2:]
    q = plgpu.load(q_ref.at[b, h, e], mask=in_head, other=0).astype(F32)
    k_new = plgpu.load(k_new_ref.at[b, h, e], mask=in_head, other=0).astype(k_out_ref.dtype)
    v_new = plgpu.load(v_new_ref.at[b, h, e], mask=in_head, other=0).astype(v_out_ref.dtype)
  else:
    q_ref, *outs = refs[:1] + refs[4:]
    q = plgpu.load(q_ref.at[b, h, e], mask=in_head, other=0).astype(F32)

  def block(i, carry, kv):
    top, total, acc = carry
    _, filled = slots_of(i)
    keys, vals = (t.astype(F32) for t in kv)
    logits = jnp.where(filled, jnp.sum(keys * q[None, :], axis=1) * scale, -jnp.inf)
    top_new = jnp.maximum(top, jnp.max(logits))
    p = jnp.exp(logits - top_new)
    rescale = jnp.exp(top - top_new)
    acc = acc * rescale + jnp.sum(p[:, None] * vals, axis=0)
    return top_new, total * rescale + jnp.sum(p), acc

  init = (jnp.float32(-jnp.inf), jnp.float32(0), jnp.zeros(e.shape, F32))
  if write:  # the new token, as the cache would hold it (its dtype's rounding), in chunk 0
    mine = in_head & (c == 0)
    at = (b, pos, h, e)
    plgpu.store(k_out_ref.at[at], k_new, mask=mine)
    plgpu.store(v_out_ref.at[at], v_new, mask=mine)
    logit = jnp.sum(k_new.astype(F32) * q) * scale
    init = (
      jnp.where(c == 0, logit, init[0]),
      jnp.where(c == 0, 1.0, init[1]).astype(F32),
      jnp.where(c == 0, v_new.astype(F32), init[2]),
    )
  steps = pl.cdiv(jnp.maximum(end - first, 0), block_s)
  top, total, acc = tu.fori_prefetched(
    steps, load_block, block, init, prefetch=prefetch, first=first_kv
  )
  if len(outs) == 1:  # one chunk: the output itself
    plgpu.store(outs[0].at[b, h, e], (acc / total).astype(outs[0].dtype), mask=in_head)
    return
  top_ref, total_ref, acc_ref = outs
  top_ref[b, h, c] = top
  total_ref[b, h, c] = total
  plgpu.store(acc_ref.at[b, h, c, e], acc, mask=in_head)


def _combine(top_BxHxC, total_BxHxC, acc_BxHxCxE, dtype) -> jax.Array:
  """The chunks' softmaxes merged: each weighted by exp(its max - the overall max)."""
  weight = jnp.exp(top_BxHxC - jnp.max(top_BxHxC, axis=-1, keepdims=True))  # 0 for empty
  total = jnp.sum(weight * total_BxHxC, axis=-1)
  acc = jnp.sum(weight[..., None] * acc_BxHxCxE, axis=2)  # fp32, not a (TF32) dot
  return (acc / total[..., None]).astype(dtype)


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


def _call(
  o_shape,
  dtype,
  k_BxSxHxE,
  write,
  fused,
  block_s,
  chunk,
  num_warps,
  interpret,
  warm=(),
  warm_programs=WARM_PROGRAMS,
  prefetch=False,
):
  """The pallas_call: its outputs are o (one chunk) or the chunks' (max, sum, accumulator),
  then (write) the two caches, aliasing inputs 3 and 4. warm: (weight, bytes) pairs that
  `warm_programs` more programs of the same launch read into L2 (`_l2_prefetch`); the
  attention's programs then form one axis (in interpret mode too, which runs them alone)."""
  batch, heads, head_dim = o_shape
  chunks = -(-k_BxSxHxE.shape[1] // chunk)
  kernel = functools.partial(
    _attend_kernel,
    block_s=block_s,
    chunk=chunk,
    num_slots=k_BxSxHxE.shape[1],
    head_dim=head_dim,
    scale=head_dim**-0.5,
    write=write,
    fused=fused,
    flat_grid=(batch, heads, chunks) if warm else None,
    prefetch=prefetch,
  )
  if chunks == 1:
    outs = [jax.ShapeDtypeStruct(o_shape, dtype)]
  else:
    per_chunk = jax.ShapeDtypeStruct((batch, heads, chunks), F32)
    outs = [per_chunk, per_chunk, jax.ShapeDtypeStruct((batch, heads, chunks, head_dim), F32)]
  aliases = {}
  if write:
    aliases = {3: len(outs), 4: len(outs) + 1}  # the caches are updated in place
    outs += [jax.ShapeDtypeStruct(k_BxSxHxE.shape, k_BxSxHxE.dtype)] * 2
  params = tu.compiler_params(num_warps, num_stages=2)
  interpret = tu.default_interpret(interpret)
  if warm and not interpret:
    return lambda *inputs: _l2_prefetch.call(
      kernel,
      inputs,
      out_shape=outs,
      grid=batch * heads * chunks,
      warm=warm,
      programs=warm_programs,
      compiler_params=params,
      name="decode_attention_warm",
      input_output_aliases=aliases,
    )
  return pl.pallas_call(
    kernel,
    out_shape=tuple(outs),
    grid=(batch * heads * chunks,) if warm else (batch, heads, chunks),
    compiler_params=params,
    interpret=interpret,
    name="decode_attention",
    input_output_aliases=aliases,
  )


def default_chunk(num_slots: int, block_s: int) -> int:
  """Slots per program: all of them up to 512 (one launch, no merge), else 256, so that a
  long cache is read by rows × heads × S/256 programs instead of rows × heads. On the H200
  (decode_attention_h200_20261205.json) one program per head took 27.9 µs a step over 1008
  filled slots (XLA: 20.6), ~0.9 µs per 64-slot block on top of ~13 µs; 512-slot chunks at
  4096 slots took 17.6 µs (XLA: 52.6)."""
  chunk = num_slots if num_slots <= 512 else 256
  return -(-chunk // block_s) * block_s


@functools.partial(
  jax.jit, static_argnames=("block_s", "chunk", "num_warps", "interpret", "prefetch")
)
def attend(
  q_BxHxE: jax.Array,
  k_BxSxHxE: jax.Array,
  v_BxSxHxE: jax.Array,
  pos_B: jax.Array,
  new_kv: tuple[jax.Array, jax.Array] | None = None,
  *,
  block_s: int = 64,
  chunk: int | None = None,
  num_warps: int = 4,
  interpret: bool | None = None,
  prefetch: bool = False,
):
  """Each row's query against its cache slots 0…pos[b] (pos in [0, S)), softmax scaled by
  1/sqrt(E), o_BxHxE in q's dtype.

  new_kv None: slot pos already holds the new token; returns o. new_kv = (k_BxHxE, v_BxHxE):
  they are written at slot pos first, in the same kernel; returns (o, k cache, v cache), the
  kernel's outputs aliasing the caches (in place wherever XLA can update them, as in the
  decode loop). chunk: slots per program (a multiple of block_s; default `default_chunk`);
  with more than one chunk per row, XLA merges the chunks' softmaxes (`_combine`). prefetch:
  each block of slots is loaded one block ahead (same values)."""
  _check(q_BxHxE, k_BxSxHxE, v_BxSxHxE, block_s)
  chunk = chunk or default_chunk(k_BxSxHxE.shape[1], block_s)
  if chunk % block_s:
    raise ValueError(f"chunk={chunk} must be a multiple of block_s={block_s}")
  write = new_kv is not None
  args = (k_BxSxHxE, write, False, block_s, chunk, num_warps, interpret)
  call = _call(q_BxHxE.shape, q_BxHxE.dtype, *args, prefetch=prefetch)
  if write:
    k_new, v_new = new_kv
    if k_new.shape != q_BxHxE.shape or v_new.shape != q_BxHxE.shape:
      raise ValueError(
        f"the new k, v must be shaped as q {q_BxHxE.shape}, got {k_new.shape}, {v_new.shape}"
      )
    outs = call(q_BxHxE, k_new, v_new, k_BxSxHxE, v_BxSxHxE, pos_B.astype(I32))
    outs, caches = outs[:-2], tuple(outs[-2:])
  else:
    outs, caches = call(q_BxHxE, k_BxSxHxE, v_BxSxHxE, pos_B.astype(I32)), ()
  o = outs[0] if len(outs) == 1 else _combine(*outs, q_BxHxE.dtype)
  return (o, *caches) if write else o


@functools.partial(
  jax.jit,
  static_argnames=(
    "block_s",
    "chunk",
    "num_warps",
    "interpret",
    "warm_bytes",
    "warm_programs",
    "prefetch",
  ),
)
def attend_qkv(
  qkv_Bx3xHxE: jax.Array,
  k_BxSxHxE: jax.Array,
  v_BxSxHxE: jax.Array,
  pos_B: jax.Array,
  cos_BxE2: jax.Array,
  sin_BxE2: jax.Array,
  *,
  block_s: int = 64,
  chunk: int | None = None,
  num_warps: int = 4,
  interpret: bool | None = None,
  warm: tuple[jax.Array, ...] = (),
  warm_bytes: tuple[int, ...] = (),
  warm_programs: int = WARM_PROGRAMS,
  prefetch: bool = False,
):
  """`attend` with new_kv, taking q, k, v as the q, k, v GEMV wrote them (unrotated, one
  array) and each row's RoPE cos and sin (fp32, E/2): the rotation, the split into q, k, v
  and the cache write all happen in the one kernel, so no XLA fusion runs between the GEMV
  and the attention. Returns (o_BxHxE, k cache, v cache).

  warm, warm_bytes: weights the next kernels read (the output projection, the FFN's first
  weights) and how many of each one's first bytes to read into L2 on `warm_programs` programs
  of this launch beside the attention's (one program per head and row leaves most SMs idle
  at batch 1). No value changes. prefetch: as `attend`'s."""
  batch, three, heads, head_dim = qkv_Bx3xHxE.shape
  o_shape = (batch, heads, head_dim)
  if three != 3 or head_dim % 2:
    raise ValueError(f"attend_qkv needs qkv (B, 3, H, E) with E even, got {qkv_Bx3xHxE.shape}")
  _check(jax.ShapeDtypeStruct(o_shape, qkv_Bx3xHxE.dtype), k_BxSxHxE, v_BxSxHxE, block_s)
  if cos_BxE2.shape != (batch, head_dim // 2) or sin_BxE2.shape != cos_BxE2.shape:
    raise ValueError(f"cos, sin must be (B, E/2) = {(batch, head_dim // 2)}, got {cos_BxE2.shape}")
  chunk = chunk or default_chunk(k_BxSxHxE.shape[1], block_s)
  if chunk % block_s:
    raise ValueError(f"chunk={chunk} must be a multiple of block_s={block_s}")
  if len(warm) != len(warm_bytes):
    raise ValueError(f"warm_bytes needs one entry per warm weight, got {warm_bytes}")
  warm_plan = tuple((w, b) for w, b in zip(warm, warm_bytes, strict=True) if b > 0)
  args = (k_BxSxHxE, True, True, block_s, chunk, num_warps, interpret, warm_plan, warm_programs)
  call = _call(o_shape, qkv_Bx3xHxE.dtype, *args, prefetch=prefetch)
  rope = (cos_BxE2.astype(F32), sin_BxE2.astype(F32))
  outs = call(qkv_Bx3xHxE, *rope, k_BxSxHxE, v_BxSxHxE, pos_B.astype(I32))
  outs, caches = outs[:-2], tuple(outs[-2:])
  o = outs[0] if len(outs) == 1 else _combine(*outs, qkv_Bx3xHxE.dtype)
  return (o, *caches)
