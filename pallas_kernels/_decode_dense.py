"""Dense SwiGLU decode in one pass over channel-major weights (Wg^T, Wu^T and Wd, all F × D).

Why: channel f's output z_f = silu(x·Wg^T[f]) · (x·Wu^T[f]) needs only row f of Wg^T and Wu^T,
and y = Σ_f z_f Wd[f] needs only row f of Wd. So nothing forces a grid-wide wait between the
gate/up GEMV and the down projection: program (t, s) owns a contiguous slice of channels for
token t, streams whole rows of all three weights (`list_rows` channels per loop step, every
load issued before any arithmetic) and writes an fp32 partial y; XLA sums the partials (one
small fusion, deterministic). That is one launch and one sum, where the split-K GEMV path is
a gate+up GEMV, its partial sum with the SwiGLU, the down GEMV and its partial sum: at T = 1
each of those is about a kernel's minimum latency (NOTES_decode.md). z is rounded to x's dtype
before the down projection, as `reference.dense_decode_ffn` does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _triton_utils as tu
from pallas_kernels._decode_config import DecodeConfig, cdiv, pow2_at_least

F32 = jnp.float32
I32 = jnp.int32


def _dense_rows_kernel(x_ref, wg_ref, wu_ref, wd_ref, y_ref, *, d_ff, per, rows, d_model, block_d):
  t, s = pl.program_id(0), pl.program_id(1)
  blocks = [(b, min(block_d, pow2_at_least(d_model - b))) for b in range(0, d_model, block_d)]
  col_ok = [b + jnp.arange(w, dtype=I32) < d_model for b, w in blocks]
  xs = [
    plgpu.load(x_ref.at[t, pl.ds(jnp.int32(b), w)], mask=ok, other=0).astype(F32)
    for (b, w), ok in zip(blocks, col_ok, strict=True)
  ]

  def body(i, ys):
    f0 = s * per + i * rows
    row_ok = f0 + jnp.arange(rows, dtype=I32) < d_ff  # rows past F load as 0, so z = 0

    def load(w_ref):  # rows f0:f0+rows of w, every column block
      return [
        plgpu.load(
          w_ref.at[pl.ds(f0, rows), pl.ds(jnp.int32(b), w)],
          mask=row_ok[:, None] & ok[None, :],
          other=0,
        )
        for (b, w), ok in zip(blocks, col_ok, strict=True)
      ]

    wg, wu, wd = load(wg_ref), load(wu_ref), load(wd_ref)
    dot = lambda ws: sum(
      jnp.sum(w.astype(F32) * xb[None, :], axis=1) for w, xb in zip(ws, xs, strict=True)
    )
    z = (tu.silu(dot(wg)) * dot(wu)).astype(x_ref.dtype).astype(F32)
    return tuple(
      y + jnp.sum(z[:, None] * w.astype(F32), axis=0) for y, w in zip(ys, wd, strict=True)
    )

  ys = tuple(jnp.zeros((w,), F32) for _, w in blocks)
  ys = lax.fori_loop(0, per // rows, body, ys)
  for (b, w), ok, y in zip(blocks, col_ok, ys, strict=True):
    plgpu.store(y_ref.at[s, t, pl.ds(jnp.int32(b), w)], y, mask=ok)


@functools.partial(jax.jit, static_argnums=(4, 5))
def dense_rows_ffn(
  x_TxD: jax.Array,
  w_gate_FxD: jax.Array,
  w_up_FxD: jax.Array,
  w_down_FxD: jax.Array,
  cfg: DecodeConfig,
  interpret: bool,
) -> jax.Array:
  """y_TxD = Σ_f silu(x·Wg^T[f]) (x·Wu^T[f]) Wd[f], in x's dtype; every weight F × D.

  Blocking from the list pipeline's knobs: `list_rows` channels per step, `list_programs`
  programs over all tokens, `list_block_d` columns per load, `list_warps`, `rows_stages`.
  """
  num_tokens, d_model = x_TxD.shape
  d_ff = w_gate_FxD.shape[0]
  rows = cfg.list_rows
  splits = max(1, min(cdiv(d_ff, rows), cfg.list_programs // num_tokens))
  per = cdiv(cdiv(d_ff, splits), rows) * rows  # channels per program, whole steps
  splits = cdiv(d_ff, per)
  kernel = functools.partial(
    _dense_rows_kernel,
    d_ff=d_ff,
    per=per,
    rows=rows,
    d_model=d_model,
    block_d=min(cfg.list_block_d, pow2_at_least(d_model)),
  )
  partials = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((splits, num_tokens, d_model), F32),
    grid=(num_tokens, splits),
    compiler_params=plgpu.CompilerParams(num_warps=cfg.list_warps, num_stages=cfg.rows_stages),
    interpret=interpret,
    name="decode_dense_rows",
  )(x_TxD, w_gate_FxD, w_up_FxD, w_down_FxD)
  return jnp.sum(partials, axis=0).astype(x_TxD.dtype)
