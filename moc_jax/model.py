"""A LLaMA-style decoder in Flax NNX whose FFN is dense SwiGLU or Mixture-of-Channels.

Pre-norm RMSNorm, RoPE, causal attention through `jax.nn.dot_product_attention`, untied
embeddings, no biases, N(0, 0.02) init. Parameters carry logical axis names (`embed`, `mlp`,
`heads`, `head_dim`, `vocab`) so a sharding rule table can place them without model changes.

Shape suffixes: B batch, L length, S cache length, D d_model, F d_ff, H heads, E head dim,
V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moc_jax import moc, moc_tp, sharding
from moc_jax.decode_ops import DecodeWeight, decode_layout, decode_linear, xla_cache_attention
from moc_jax.model_config import ModelConfig
from pallas_kernels import decode_attention, reference

init_normal = nnx.initializers.normal(stddev=0.02)
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed")


def _param(
  rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, init=init_normal
) -> nnx.Param:
  """A parameter annotated with logical axis names; the mesh rules place it later."""
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale, computed in fp32."""

  def __init__(self, dim: int, eps: float, param_dtype, rngs: nnx.Rngs):
    self.scale = _param(rngs, (dim,), ("embed",), param_dtype, nnx.initializers.ones)
    self.eps = eps

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    return reference.rms_norm(x_BxLxD, self.scale[...], self.eps)

  @property
  def spec(self) -> tuple[jax.Array, float]:
    """(scale, eps): what a decode kernel needs to apply this norm in its prologue."""
    return self.scale[...], self.eps


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float):
  """(cos, sin) of the rotary angles, fp32, shaped positions.shape + (E/2,)."""
  half = head_dim // 2
  freq_E2 = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None].astype(jnp.float32) * freq_E2
  return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x_BxLxHxE: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding on pairs (i, i + E/2), in fp32."""
  cos, sin = rope_cos_sin(positions_BxL, x_BxLxHxE.shape[-1], theta)
  cos, sin = cos[..., None, :], sin[..., None, :]
  x1, x2 = jnp.split(x_BxLxHxE.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxE.dtype)


class Attention(nnx.Module):
  """Multi-head causal self-attention with RoPE and an optional KV cache."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, h, e, pd = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.param_dtype
    self.w_q = _param(rngs, (d, h, e), ("embed", "heads", "head_dim"), pd)
    self.w_k = _param(rngs, (d, h, e), ("embed", "heads", "head_dim"), pd)
    self.w_v = _param(rngs, (d, h, e), ("embed", "heads", "head_dim"), pd)
    self.w_o = _param(rngs, (h, e, d), ("heads", "head_dim", "embed"), pd)
    self.cfg = cfg
    self.decode_weights: nnx.List | None = nnx.data(None)  # [w_qkv (D, 3HE), w_o (HE, D)]

  def _qkv(self, x_BxLxD, positions_BxL):
    dt = x_BxLxD.dtype
    proj = lambda w: jnp.einsum("bld,dhe->blhe", x_BxLxD, w[...].astype(dt))
    q = apply_rope(proj(self.w_q), positions_BxL, self.cfg.rope_theta)
    k = apply_rope(proj(self.w_k), positions_BxL, self.cfg.rope_theta)
    return q, k, proj(self.w_v)

  def _out(self, o_BxLxHxE):
    return jnp.einsum("blhe,hed->bld", o_BxLxHxE, self.w_o[...].astype(o_BxLxHxE.dtype))

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL=None):
    q, k, v = self._qkv(x_BxLxD, positions_BxL)
    if segment_ids_BxL is None:
      o = jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation=self.cfg.attention_impl()
      )
    else:
      # Packed rows: attend only within a document (and never to padding, segment 0).
      same_BxLxL = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
      causal_LxL = jnp.tril(jnp.ones((q.shape[1], q.shape[1]), bool))
      mask = (same_BxLxL & causal_LxL)[:, None]
      o = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    return self._out(o)

  def prepare_for_decode(self) -> None:
    """Compute-dtype copies as 2-D weights, made once: q, k, v in one (D, 3HE) GEMV and the
    output projection as (HE, D), so that decode reads each weight byte once per step."""
    d = self.cfg.d_model
    w_qkv = jnp.concatenate([w[...].reshape(d, -1) for w in (self.w_q, self.w_k, self.w_v)], 1)
    w_o = self.w_o[...].reshape(-1, d)
    self.decode_weights = nnx.List([decode_layout(self.cfg, w) for w in (w_qkv, w_o)])

  def decode(self, x_BxLxD, positions_BxL, cache: dict, norm: RMSNorm, warm=()):
    """x + attention(norm(x)) for new tokens: their k, v written at `positions` into the
    cache, every slot at or before them attended. Once prepared, the norm and the residual
    add go to the q, k, v and output GEMVs (inside the rowdot kernels: `decode_linear`).
    warm: (weight, bytes) pairs the fused attention kernel reads into L2 (no value changes)."""
    c = self.cfg
    if self.decode_weights is None:
      q, k, v = self._qkv(norm(x_BxLxD), positions_BxL)
      o, cache = self._attend(q, k, v, positions_BxL, cache)
      return x_BxLxD + self._out(o), cache
    qkv = decode_linear(c, x_BxLxD, self.decode_weights[0][...], norm=norm.spec)
    qkv_BxLx3xHxE = qkv.reshape(*qkv.shape[:2], 3, c.num_heads, c.head_dim)
    if c.decode_attention_impl() == "fused" and qkv.shape[1] == 1:
      # RoPE, the split and the cache write inside the attention kernel (`attend_qkv`)
      cos, sin = rope_cos_sin(positions_BxL[:, 0], c.head_dim, c.rope_theta)
      o, k_cache, v_cache = decode_attention.attend_qkv(
        qkv_BxLx3xHxE[:, 0],
        cache["k"],
        cache["v"],
        positions_BxL[:, 0],
        cos,
        sin,
        warm=tuple(w for w, _ in warm),
        warm_bytes=tuple(b for _, b in warm),
        warm_programs=decode_attention.WARM_PROGRAMS,
        prefetch=c.decode_prefetch,
      )
      o, cache = o[:, None], {"k": k_cache, "v": v_cache}
    else:
      q, k, v = (qkv_BxLx3xHxE[:, :, i] for i in range(3))
      rope = lambda t: apply_rope(t, positions_BxL, c.rope_theta)
      o, cache = self._attend(rope(q), rope(k), v, positions_BxL, cache)
    o_BxLxHE = o.reshape(*o.shape[:2], -1)
    return decode_linear(c, o_BxLxHE, self.decode_weights[1][...], residual=x_BxLxD), cache

  def _attend(self, q, k, v, positions_BxL, cache: dict):
    """(o, cache with the new k, v): one kernel for one token per row, else XLA."""
    if self.cfg.decode_attention_impl() in ("pallas", "fused") and q.shape[1] == 1:
      o, k_cache, v_cache = decode_attention.attend(
        q[:, 0],
        cache["k"],
        cache["v"],
        positions_BxL[:, 0],
        (k[:, 0], v[:, 0]),
        prefetch=self.cfg.decode_prefetch,
      )
      o = o[:, None]
    else:
      o, k_cache, v_cache = xla_cache_attention(q, k, v, cache["k"], cache["v"], positions_BxL)
    return o, {"k": k_cache, "v": v_cache}


class FeedForward(nnx.Module):
  """SwiGLU FFN: dense or MoC, all through `moc.moc_ffn`."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    d, f, pd = cfg.d_model, cfg.d_ff, cfg.param_dtype
    self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), pd)
    self.w_up = _param(rngs, (d, f), ("embed", "mlp"), pd)
    self.w_down = _param(rngs, (f, d), ("mlp", "embed"), pd)
    self.cfg = cfg
    self.decode_weights: nnx.List | None = nnx.data(None)
    # Static, off in training: channel_usage sets it to sow this FFN's input under nnx.capture.
    self.capture_input = False

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    c = self.cfg
    if self.capture_input:
      self.sow(nnx.Intermediate, "ffn_input", x_BxLxD)
    # F split over the mesh's `tensor` axis: the exact global top-K needs the sharded op.
    tp = c.ffn != "dense" and moc_tp.tensor_parallel_size() > 1
    op = moc_tp.moc_ffn_tp if tp else moc.moc_ffn
    if not tp:
      op = functools.partial(op, keep_weights=c.ffn_keep_weights)
    ffn = lambda x, wg, wu, wd: op(
      x, wg, wu, wd, k=c.k, variant=c.ffn, gcp=c.gcp, backend=c.kernel_backend, pad_to=c.pad_to
    )
    if c.remat == "ffn":
      ffn = jax.checkpoint(ffn)
    return ffn(x_BxLxD, self.w_gate[...], self.w_up[...], self.w_down[...])

  def prepare_for_decode(self) -> None:
    """Compute-dtype weight copies in the decode layout, made once: MoC reads only the
    selected rows of Wu^T (stored channel-major, F x D) and Wd; no per-step casts. With
    `decode_gemv='rowdot'` the weights read whole are stored transposed (`decode_layout`)."""
    c = self.cfg
    if c.ffn == "dense":
      ws = [decode_layout(c, w[...]) for w in (self.w_gate, self.w_up, self.w_down)]
    else:
      rows = (self.w_up[...].T, self.w_down[...])  # gathered by row: channel-major always
      ws = [
        decode_layout(c, self.w_gate[...]),
        *(DecodeWeight(w.astype(c.compute_dtype)) for w in rows),
      ]
    self.decode_weights = nnx.List(ws)

  def decode(self, h_BxLxD: jax.Array, norm: RMSNorm, warm: jax.Array | None = None):
    """h + FFN(norm(h)) for new tokens; once prepared the norm and the residual add may run
    inside the decode kernels (`moc.moc_decode_ffn`). warm: the weight the next layer reads
    first; the MoC kernels may warm L2 with it."""
    c = self.cfg
    if self.decode_weights is None:
      return h_BxLxD + self(norm(h_BxLxD))
    w_gate, w_up, w_down = (w[...] for w in self.decode_weights)
    return moc.moc_decode_ffn(
      h_BxLxD,
      w_gate,
      w_up,
      w_down,
      k=c.k,
      variant=c.ffn,
      backend=c.kernel_backend,
      warm=warm,
      output_major=c.decode_gemv_impl() == "rowdot",
      norm=norm.spec,
      residual=True,
      streaming=c.decode_prefetch,
    )


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then + ffn(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs)
    self.attn = Attention(cfg, rngs)
    self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs)
    self.ffn = FeedForward(cfg, rngs)

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL=None):
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL)
    return x_BxLxD + self.ffn(self.ffn_norm(x_BxLxD))

  def decode(self, x_BxLxD, positions_BxL, cache, warm=None):
    """warm: the next block's first decode weight, for the FFN's kernels to warm L2 with."""
    attn_warm = self._attention_warm()
    h_BxLxD, cache = self.attn.decode(x_BxLxD, positions_BxL, cache, self.attn_norm, attn_warm)
    return self.ffn.decode(h_BxLxD, self.ffn_norm, warm), cache

  def _attention_warm(self) -> tuple[tuple[jax.Array, int], ...]:
    """What the attention kernel reads into L2 (`decode_attention_warm_mb`): the output
    projection whole, then the rest of the budget shared by the weights the FFN's first
    kernel reads side by side (MoC: the gate; dense: gate and up)."""
    budget = self.attn.cfg.decode_attention_warm_mb << 20
    if not budget or self.attn.decode_weights is None or self.ffn.decode_weights is None:
      return ()
    w_o = self.attn.decode_weights[1][...]
    firsts = [w[...] for w in self.ffn.decode_weights[: 2 if self.ffn.cfg.ffn == "dense" else 1]]
    o_bytes = min(w_o.nbytes, budget)
    share = (budget - o_bytes) // len(firsts)
    return ((w_o, o_bytes), *((w, share) for w in firsts if share))

  def first_decode_weight(self) -> jax.Array | None:
    """The weight this block's decode reads first (q, k, v as one), once prepared."""
    weights = self.attn.decode_weights
    return None if weights is None else weights[0][...]


@jax.custom_vjp
def unembed(x_BxLxD: jax.Array, w_DxV: jax.Array) -> jax.Array:
  """fp32 logits x W. Plain autodiff would run both backward GEMMs in fp32 (the fp32 cotangent
  promotes W): 16 of the 246 ms of a 1b training step on the H200. Here they take the cotangent
  in x's dtype, at the tensor cores' bf16 rate, with fp32 accumulation."""
  return jnp.einsum("bld,dv->blv", x_BxLxD, w_DxV, preferred_element_type=jnp.float32)


def _unembed_fwd(x_BxLxD, w_DxV):
  return unembed(x_BxLxD, w_DxV), (x_BxLxD, w_DxV)


def _unembed_bwd(residuals, dlogits_BxLxV):
  x_BxLxD, w_DxV = residuals
  ct = dlogits_BxLxV.astype(x_BxLxD.dtype)
  f32 = jnp.float32
  dx = jnp.einsum("blv,dv->bld", ct, w_DxV, preferred_element_type=f32).astype(x_BxLxD.dtype)
  dw = jnp.einsum("bld,blv->dv", x_BxLxD, ct, preferred_element_type=f32).astype(w_DxV.dtype)
  return dx, dw


unembed.defvjp(_unembed_fwd, _unembed_bwd)


class Transformer(nnx.Module):
  """Token embedding, a stack of blocks, final norm, untied output projection."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.param_dtype)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.param_dtype, rngs)
    self.unembed = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype)
    # Set by prepare_for_decode: the unembedding in compute dtype (the param's own array when
    # the dtypes already match: astype does not copy then).
    self.decode_unembed: DecodeWeight | None = nnx.data(None)

  def _embed(self, tokens_BxL):
    return jnp.take(self.embed[...], tokens_BxL, axis=0).astype(self.cfg.compute_dtype)

  def _logits(self, x_BxLxD):
    x_BxLxD = self.final_norm(x_BxLxD)
    return unembed(x_BxLxD, self.unembed[...].astype(x_BxLxD.dtype))

  def __call__(self, tokens_BxL, positions_BxL=None, segment_ids_BxL=None) -> jax.Array:
    """Logits (B, L, V) in fp32 for a batch of (possibly packed) token rows."""
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    x = sharding.constrain(self._embed(tokens_BxL), ACTIVATION_AXES)
    for block in self.blocks:
      if self.cfg.remat == "full":
        x = nnx.remat(lambda b, *a: b(*a))(block, x, positions_BxL, segment_ids_BxL)
      else:
        x = block(x, positions_BxL, segment_ids_BxL)
      x = sharding.constrain(x, ACTIVATION_AXES)
    return self._logits(x)

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> list[dict]:
    """Per-layer zero k/v buffers of shape (B, S, H, E)."""
    c = self.cfg
    dtype = dtype or c.compute_dtype
    shape = (batch_size, max_len, c.num_heads, c.head_dim)
    return [
      {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(c.num_layers)
    ]

  def decode(self, tokens_BxL, positions_BxL, cache: list[dict]):
    """Run L new tokens per row at `positions` (contiguous per row) against the cache."""
    x = self._embed(tokens_BxL)
    new_cache = []
    nexts = [b.first_decode_weight() for b in list(self.blocks)[1:]] + [None]
    for block, layer_cache, warm in zip(self.blocks, cache, nexts, strict=True):
      x, layer_cache = block.decode(x, positions_BxL, layer_cache, warm)
      new_cache.append(layer_cache)
    return self._decode_logits(x), new_cache

  def _decode_logits(self, x_BxLxD):
    """`_logits` through the decode GEMV once prepared (XLA for more than 16 tokens)."""
    if self.decode_unembed is None:
      return self._logits(x_BxLxD)
    w = self.decode_unembed[...]
    return decode_linear(self.cfg, x_BxLxD, w, jnp.float32, norm=self.final_norm.spec)

  def prepare_for_decode(self) -> None:
    """Decode layouts, made once: channel-major Wu^T for the FFNs, fused 2-D attention
    weights, and the unembedding in compute dtype (a copy only if the param's dtype differs)."""
    for block in self.blocks:
      block.ffn.prepare_for_decode()
      block.attn.prepare_for_decode()
    self.decode_unembed = decode_layout(self.cfg, self.unembed[...])


def count_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
