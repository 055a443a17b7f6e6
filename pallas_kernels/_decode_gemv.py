"""Split-K GEMV for a few tokens (T = 1…16): y = x W over a D × N weight, every SM streaming.

Grid over N blocks × D splits; each program accumulates x[:, split] W[split, block] in fp32
(T padded to 16 rows for tl.dot, or a multiply-reduce for one token) and writes its fp32
partial; the partials are summed by XLA (deterministic split-K, no atomics). With one split
the kernel writes the result itself (optionally the SwiGLU z = silu(g) u of two weights).
Used by the MoC gate (`moc_decode`), the dense FFN decode, and `linear` (attention and output
projections at decode time: XLA's batch-1 dots stream at ~1 TB/s, NOTES_decode.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _triton_utils as tu
from pallas_kernels._decode_config import DecodeConfig
from pallas_kernels._decode_config import cdiv as _cdiv
from pallas_kernels._decode_config import pow2_at_least as _pow2_at_least

F32 = jnp.float32


def precision_for(dtype) -> lax.Precision:
  """fp32 operands get IEEE fp32 dots (not tf32); narrow types use the tensor cores as they are."""
  return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else lax.Precision.DEFAULT


def padded_rows(num_tokens: int, cfg: DecodeConfig) -> int:
  """Tokens padded for tl.dot (needs ≥ 16 rows); T = 1 may take a plain multiply-reduce."""
  return 1 if num_tokens == 1 and not cfg.t1_dot else max(16, _pow2_at_least(num_tokens))


def load_x(x_ref, d0, block_d, num_tokens, rows, d_model):
  """x[:, d0:d0+block_d] as (block_d,) fp32 for T = 1, else (rows, block_d) zero-padded."""
  d_mask = d0 + jnp.arange(block_d) < d_model
  if rows == 1:
    return plgpu.load(x_ref.at[jnp.int32(0), pl.ds(d0, block_d)], mask=d_mask, other=0).astype(F32)
  t_mask = jnp.arange(rows) < num_tokens
  return plgpu.load(
    x_ref.at[pl.ds(0, rows), pl.ds(d0, block_d)],
    mask=t_mask[:, None] & d_mask[None, :],
    other=0,
  )


def tf_ref(ref, rows, f0, block_f, lead=()):
  """ref[*lead, 0:rows, f0:f0+block_f] (or ref[*lead, 0, ...] for one token).

  One `.at` with the whole index: interpret mode mishandles chained `.at` in stores.
  """
  if rows == 1:
    return ref.at[(*lead, jnp.int32(0), pl.ds(f0, block_f))]
  return ref.at[(*lead, pl.ds(0, rows), pl.ds(f0, block_f))]


def tf_mask(rows, num_tokens, f_mask):
  if rows == 1:
    return f_mask
  return (jnp.arange(rows) < num_tokens)[:, None] & f_mask[None, :]


# --- 1. GEMV over D × F weights --------------------------------------------------------------


def _gemv_kernel(
  x_ref,
  *refs,
  num_w,
  num_tokens,
  rows,
  d_model,
  d_ff,
  block_d,
  block_f,
  d_split,
  swiglu,
  final,
  precision,
):
  w_refs, out_ref = refs[:num_w], refs[num_w]
  fi, si = pl.program_id(0), pl.program_id(1)
  f0 = fi * block_f
  f_mask = f0 + jnp.arange(block_f) < d_ff
  d_end = jnp.minimum((si + 1) * d_split, d_model)

  def body(i, accs):
    d0 = si * d_split + i * block_d
    d_mask = (d0 + jnp.arange(block_d)) < d_end
    xk = load_x(x_ref, d0, block_d, num_tokens, rows, d_model)
    out = []
    for w_ref, acc in zip(w_refs, accs, strict=True):
      w = plgpu.load(
        w_ref.at[pl.ds(d0, block_d), pl.ds(f0, block_f)],
        mask=d_mask[:, None] & f_mask[None, :],
        other=0,
      )
      if rows == 1:
        out.append(acc + jnp.sum(xk[:, None] * w.astype(F32), axis=0))
      else:
        out.append(acc + jnp.dot(xk, w, preferred_element_type=F32, precision=precision))
    return tuple(out)

  shape = (block_f,) if rows == 1 else (rows, block_f)
  accs = tuple(jnp.zeros(shape, F32) for _ in range(num_w))
  accs = lax.fori_loop(0, pl.cdiv(d_split, block_d), body, accs)
  mask = tf_mask(rows, num_tokens, f_mask)
  if swiglu:  # one D split: write z = silu(g) * u in x's dtype
    z = (tu.silu(accs[0]) * accs[1]).astype(out_ref.dtype)
    plgpu.store(tf_ref(out_ref, rows, f0, block_f), z, mask=mask)
    return
  if final:  # one D split, one weight: the result itself, in the output's dtype
    plgpu.store(tf_ref(out_ref, rows, f0, block_f), accs[0].astype(out_ref.dtype), mask=mask)
    return
  for w, acc in enumerate(accs):
    plgpu.store(tf_ref(out_ref, rows, f0, block_f, (si, jnp.int32(w))), acc, mask=mask)


# Shared memory the pipelined weight tiles may take: the configs are tuned on bf16, and the
# same tiles in fp32 asked for 272 KB of the H200's 227 (256-wide x 128-row down GEMV tile).
SMEM_BUDGET_BYTES = 200 * 1024


def fit_block_d(cfg: DecodeConfig, d_model: int, block_f: int, bytes_per_element: int) -> int:
  """The config's D step (at most D rounded up to a power of 2), halved while `gemv_stages`
  weight tiles of `bytes_per_element` (summed over the weights) exceed SMEM_BUDGET_BYTES."""
  block_d = min(cfg.gemv_block_d, _pow2_at_least(d_model))
  while (
    block_d > 16 and cfg.gemv_stages * block_d * block_f * bytes_per_element > SMEM_BUDGET_BYTES
  ):
    block_d //= 2
  return block_d


def gemv(
  x_TxD, ws_DxF, cfg: DecodeConfig, *, swiglu: bool, interpret: bool, out_dtype=None
) -> jax.Array:
  """swiglu: z_TxF in x's dtype (needs one D split); else fp32 partials (splits, W, T, F_pow2).

  out_dtype (one weight, one D split): y_TxF = x W written by the kernel in that dtype.
  """
  num_tokens, d_model = x_TxD.shape
  d_ff = ws_DxF[0].shape[1]
  splits = 1 if swiglu else cfg.gemv_splits
  final = out_dtype is not None
  if final and (swiglu or splits != 1 or len(ws_DxF) != 1):
    raise ValueError("gemv: out_dtype needs one weight, one D split and no swiglu")
  block_f = min(cfg.gemv_block_f, _pow2_at_least(d_ff))
  block_d = fit_block_d(cfg, d_model, block_f, len(ws_DxF) * ws_DxF[0].dtype.itemsize)
  d_split = _cdiv(d_model, splits)
  rows = padded_rows(num_tokens, cfg)
  if swiglu or final:
    out_shape = jax.ShapeDtypeStruct((num_tokens, d_ff), x_TxD.dtype if swiglu else out_dtype)
  else:
    out_shape = jax.ShapeDtypeStruct((splits, len(ws_DxF), num_tokens, _pow2_at_least(d_ff)), F32)
  kernel = functools.partial(
    _gemv_kernel,
    num_w=len(ws_DxF),
    num_tokens=num_tokens,
    rows=rows,
    d_model=d_model,
    d_ff=d_ff,
    block_d=block_d,
    block_f=block_f,
    d_split=d_split,
    swiglu=swiglu,
    final=final,
    precision=precision_for(x_TxD.dtype),
  )
  return pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=(pl.cdiv(d_ff, block_f), splits),
    compiler_params=plgpu.CompilerParams(num_warps=cfg.gemv_warps, num_stages=cfg.gemv_stages),
    interpret=interpret,
    name="decode_gemv",
  )(x_TxD, *ws_DxF)


# --- 2. y = x W for attention and output projections at decode time ---------------------------

MAX_TOKENS = 16  # decode kernels take at most this many tokens; more (prefill) go to XLA


def linear_config(num_tokens: int, d_model: int, n: int) -> DecodeConfig:
  """128-wide N blocks, 64-row D steps, 8 D splits (fewer if a split would hold < 2 steps),
  4 warps, 4 stages, tl.dot at T = 1.

  From `gemv_sweep_h200_20261201.json` (T = 1, d = 2048, ~30 configs per shape): this rule is
  within 3% of the best config at N = 2048, 5464 and 6144 (5.9, 11.9-12.2 µs) and 2% at the
  32000-wide unembedding (37.6 vs 36.8 µs); XLA took 15.3, 24.6, 25.0 and 41.0 µs.
  """
  del num_tokens, n  # one rule measured good at every N; T = 4 not swept yet
  block_f, block_d = 128, 64
  splits = max(1, min(8, d_model // (2 * block_d)))
  return DecodeConfig(
    gemv_block_f=block_f,
    gemv_block_d=block_d,
    gemv_splits=1 << (splits.bit_length() - 1),
    gemv_warps=4,
    gemv_stages=4,
    t1_dot=True,
  )


def check_gemv_inputs(name: str, x, w, d_axis: int, out_dtype):
  """(x's leading dims, x as T x D, the output dtype) for a decode GEMV whose weight holds D
  on `d_axis`; one clear error for a bad shape, dtype or token count."""
  want = "w[D, N]" if d_axis == 0 else "w[N, D]"
  if w.ndim != 2 or x.shape[-1] != w.shape[d_axis]:
    raise ValueError(f"{name}: x {x.shape} and w {w.shape} need x[..., D] and {want}")
  if x.dtype != w.dtype:
    raise ValueError(f"{name}: x is {x.dtype} but w is {w.dtype}; cast the weight once")
  x_TxD = x.reshape(-1, x.shape[-1])
  if x_TxD.shape[0] > MAX_TOKENS:
    raise ValueError(f"{name}: T={x_TxD.shape[0]} tokens; the GEMV takes at most {MAX_TOKENS}")
  return x.shape[:-1], x_TxD, jnp.dtype(x.dtype if out_dtype is None else out_dtype)


def linear(
  x_TxD: jax.Array,
  w_DxN: jax.Array,
  *,
  config: DecodeConfig | None = None,
  out_dtype=None,
  interpret: bool | None = None,
) -> jax.Array:
  """y_TxN = x W for T ≤ 16 tokens (leading dims of x flattened): at d = 2048 XLA's batch-1
  dots streamed at ~0.6-3.2 TB/s, this split-K GEMV at 1.4-3.5 (2.1× faster at the qkv shape;
  gemv_sweep_h200_20261201). fp32 accumulation, the fp32 sum over D splits cast once to
  out_dtype (default x's dtype); with one split the kernel writes y itself.
  """
  lead, x_TxD, out_dtype = check_gemv_inputs("linear", x_TxD, w_DxN, 0, out_dtype)
  d_model, n = w_DxN.shape
  num_tokens = x_TxD.shape[0]
  if num_tokens == 0:
    return jnp.zeros((*lead, n), out_dtype)
  cfg = config or linear_config(num_tokens, d_model, n)
  y_TxN = split_k_linear(x_TxD, w_DxN, cfg, out_dtype, tu.default_interpret(interpret))
  return y_TxN.reshape(*lead, n)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def split_k_linear(x_TxD, w_DxN, cfg: DecodeConfig, out_dtype, interpret: bool) -> jax.Array:
  """`linear` without its checks, for 2-D operands and a given config (the MoC gate, the dense
  down projection). Jitted so that every layer's call at one shape reuses one trace."""
  if cfg.gemv_splits == 1:
    return gemv(x_TxD, (w_DxN,), cfg, swiglu=False, interpret=interpret, out_dtype=out_dtype)
  partials = gemv(x_TxD, (w_DxN,), cfg, swiglu=False, interpret=interpret)
  return jnp.sum(partials[:, 0, :, : w_DxN.shape[1]], axis=0).astype(out_dtype)
