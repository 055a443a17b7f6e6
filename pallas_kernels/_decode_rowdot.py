"""Output-major GEMV for a few tokens (T = 1…16): y = x Wᵀ over an N × D weight, no partials.

Why: the split-K GEMV (`_decode_gemv`) over a D × N weight must split D across programs to
fill the GPU, and XLA then sums its fp32 partials in a launch of its own (1.5-3 µs per call at
the 1b decode shapes, NOTES_decode.md 2026-12-04). With the weight stored output-major (N × D,
converted once when the model is prepared for decoding, as the MoC rows already are), each
program reads `block_n` whole contiguous rows and writes its outputs itself: one launch, and
N / block_n programs (768 at the 1b q, k, v shape with 8 rows each).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _triton_utils as tu
from pallas_kernels._decode_config import pow2_at_least
from pallas_kernels._decode_gemv import (
  MAX_TOKENS as MAX_TOKENS,  # the model reads it here
)
from pallas_kernels._decode_gemv import (
  check_gemv_inputs,
  load_x,
  precision_for,
  tf_mask,
  tf_ref,
)

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class RowdotConfig:
  """Rows per block, the D step (powers of 2), Triton's warps and pipeline stages; t1_dot:
  one token through tl.dot (padded to 16 rows) instead of a multiply-reduce; prefetch (the
  multiply-reduce): load each D step one step ahead; programs (the multiply-reduce): at most
  this many programs, each taking row blocks pid, pid + programs, … in turn with every load
  one step ahead, across blocks too (0: one program per block).

  Why prefetch: Triton software-pipelines (cp.async, `stages`) only the tl.dot loop; the T = 1
  multiply-reduce loop compiles to loads that the same step waits for (no async copies in its
  TTGIR for sm_90), so a program makes one HBM round trip per D step.
  Why programs: a grid of one program per block runs in waves when it holds more programs
  than the SMs keep resident (683 gate programs, 396 resident at 168 registers in 2048-wide
  steps): each wave pays the memory latency again, and a short last wave leaves SMs idle.
  A grid of about what stays resident, each program streaming its blocks back to back, pays
  it once (untimed; `gemv_sweep` has `_p<N>` rows)."""

  block_n: int = 8
  block_d: int = 512
  warps: int = 4
  stages: int = 3
  t1_dot: bool = False
  prefetch: bool = False
  programs: int = 0


STREAMING_PER_SM = 4  # `rowdot_config(streaming=True)`'s resident programs per SM


def rowdot_config(
  num_tokens: int,
  d_model: int,
  n: int,
  weights: int = 1,
  itemsize: int = 2,
  streaming: bool = False,
) -> RowdotConfig:
  """From the H200 sweep at T = 1 (`gemv_sweep_rowdot_h200_20261205.json`, bf16): 8 rows and
  512-wide D steps, except for one 2-byte weight at one token, where a D over 2048 goes in
  2048-wide steps (dense down at D = 5464: 11.2 µs against 21.0; 168 registers a thread) and
  N from 16384 up in 4 rows (the unembedding, N = 32000: 37.3 against 41.2). Two weights (the
  SwiGLU), fp32 weights and T > 1 keep the default: their wider steps were not measured and
  hold more registers and shared memory.

  streaming: a narrow GEMV (T = 1, one weight, 512-wide steps, N < 16384: q, k, v, the output
  projection, MoC's gate) loads each step one ahead on a grid of 4 programs per SM that stays
  resident (`STREAMING_PER_SM`). It pays most where the weight is already in L2 (warmed by
  a kernel before it): in MoC's decode loop on the H200 it took q, k, v 0.193 → 0.188 and the
  gate 0.186 → 0.180 ms per token, on an H100 q, k, v 0.328 → 0.268; dense's q, k, v there
  0.293 → 0.274 (NOTES_decode 2026-12-05e, f). It made dense's 2048-wide down GEMV 2.2-3×
  slower, so wider steps, two weights and the unembedding never stream."""
  if num_tokens != 1 or weights != 1:
    return RowdotConfig()
  cfg = RowdotConfig(
    block_n=4 if n >= 16384 else 8,
    block_d=2048 if d_model > 2048 and itemsize <= 2 else 512,
  )
  if streaming and cfg.block_d <= 512 and n < 16384:
    return dataclasses.replace(cfg, prefetch=True, programs=STREAMING_PER_SM * tu.sm_count())
  return cfg


def _rows(num_tokens: int, cfg: RowdotConfig) -> int:
  return 1 if num_tokens == 1 and not cfg.t1_dot else max(16, pow2_at_least(num_tokens))


def _inv_rms(x_ref, *, num_tokens, rows, d_model, eps):
  """Per token 1 / sqrt(mean(x²) + eps) in fp32, as `model.RMSNorm` computes it. x is read
  in wide steps (all of it at once at T = 1 up to D = 8192), squares summed lane-wise and
  reduced once: this runs before the weight loads start, so its latency is the GEMV's."""
  step = min(pow2_at_least(d_model), max(128, 8192 // rows))

  def body(i, acc):
    return acc + jnp.square(load_x(x_ref, i * step, step, num_tokens, rows, d_model).astype(F32))

  shape = (step,) if rows == 1 else (rows, step)
  acc = lax.fori_loop(0, pl.cdiv(d_model, step), body, jnp.zeros(shape, F32))
  return lax.rsqrt(jnp.sum(acc, axis=-1) / d_model + eps)


def _kernel(
  *refs,
  num_tokens,
  rows,
  d_model,
  n,
  block_n,
  block_d,
  num_w,
  swiglu,
  norm_eps,
  residual,
  write_normed,
  precision,
  prefetch,
  programs,
):
  """y = x Wᵀ for this program's block of rows (`programs`: its blocks, in turn); with two
  weights (swiglu) silu(x Wgᵀ) x Wuᵀ.

  refs: x, [norm scale], weights…, [residual], y, [normed x]. With a norm (norm_eps not None)
  x is RMS-normalized first (rounded to its dtype, as the model's norm output is); program 0
  also writes that normalized x if asked. With a residual, y = round(x Wᵀ) + residual.
  prefetch (T = 1): each D step's loads are issued one step ahead (the first before the
  norm's read of x), so a program has two steps in flight instead of one round trip a step.
  programs > 0 (T = 1): a grid of at most that many programs, each streaming row blocks pid,
  pid + programs, … with every block's first step loaded during the last one's."""
  refs = list(refs)
  x_ref = refs.pop(0)
  scale_ref = refs.pop(0) if norm_eps is not None else None
  w_refs = [refs.pop(0) for _ in range(num_w)]
  res_ref = refs.pop(0) if residual else None
  y_ref = refs.pop(0)
  xn_ref = refs.pop(0) if write_normed else None
  pid = pl.program_id(0)
  dims = dict(num_tokens=num_tokens, rows=rows, d_model=d_model)
  steps = pl.cdiv(d_model, block_d)

  def load_x_scale(i):
    """Step i's x and norm scale (past D all masked: no memory traffic)."""
    d0 = i * block_d
    d_mask = d0 + jnp.arange(block_d) < d_model
    xk = load_x(x_ref, d0, block_d, num_tokens, rows, d_model)
    if scale_ref is None:
      return xk, None
    return xk, plgpu.load(scale_ref.at[pl.ds(d0, block_d)], mask=d_mask, other=0).astype(F32)

  def load_w(b, i):
    """Row block b's weight tiles at step i (past N or D all masked)."""
    n0, d0 = b * block_n, i * block_d
    mask = (n0 + jnp.arange(block_n) < n)[:, None] & (d0 + jnp.arange(block_d) < d_model)[None, :]
    return tuple(
      plgpu.load(w_ref.at[pl.ds(n0, block_n), pl.ds(d0, block_d)], mask=mask, other=0)
      for w_ref in w_refs
    )

  def normalized(i, xk, scale, inv, write=True):
    """x at step i, normalized with the norm; program 0 writes it out (once: `write`)."""
    if scale is None:
      return xk
    d0 = i * block_d
    d_mask = d0 + jnp.arange(block_d) < d_model
    per_token = inv if rows == 1 else inv[:, None]
    xk = (xk.astype(F32) * per_token * scale).astype(x_ref.dtype)
    if xn_ref is not None:
      mine = tf_mask(rows, num_tokens, d_mask) & (pid == 0) & write
      plgpu.store(tf_ref(xn_ref, rows, d0, block_d), xk, mask=mine)
    return xk.astype(F32) if rows == 1 else xk

  def accumulate(accs, xk, ws):
    out = []
    for w, acc in zip(ws, accs, strict=True):
      if rows == 1:  # whole-row products summed once per block
        out.append(acc + w.astype(F32) * xk[None, :])
      else:
        dims_ = (((1,), (1,)), ((), ()))
        out.append(
          acc + lax.dot_general(xk, w, dims_, preferred_element_type=F32, precision=precision)
        )
    return tuple(out)

  def finish(b, accs) -> None:
    """Row block b's outputs from its accumulators: the SwiGLU, the residual, the store."""
    n0 = b * block_n
    ys = [jnp.sum(acc, axis=1) if rows == 1 else acc for acc in accs]
    y = (tu.silu(ys[0]) * ys[1] if swiglu else ys[0]).astype(y_ref.dtype)
    mask = tf_mask(rows, num_tokens, n0 + jnp.arange(block_n) < y_ref.shape[-1])  # 0 past N
    if res_ref is not None:  # the residual add as XLA does it: round, add in fp32, round
      r = plgpu.load(tf_ref(res_ref, rows, n0, block_n), mask=mask, other=0).astype(F32)
      y = (y.astype(F32) + r).astype(y_ref.dtype)
    plgpu.store(tf_ref(y_ref, rows, n0, block_n), y, mask=mask)

  shape = (block_n, block_d) if rows == 1 else (rows, block_n)
  zeros = tuple(jnp.zeros(shape, F32) for _ in w_refs)
  if programs and rows == 1:  # blocks pid, pid + programs, …: one flat loop, a step ahead

    def at(j):
      """Flat step j's (row block, D step); int32 throughout (Triton takes no i1 divisor)."""
      j = jnp.asarray(j, jnp.int32)
      return pid + j // jnp.int32(steps) * programs, j % jnp.int32(steps)

    def loads(j):
      b, i = at(j)
      return load_x_scale(i), load_w(b, i)

    first = loads(0)  # issued before the norm's own read of x
    inv = None if scale_ref is None else _inv_rms(x_ref, eps=norm_eps, **dims)

    def update(j, accs, step):
      (xk, scale), ws = step
      b, i = at(j)
      accs = accumulate(accs, normalized(i, xk, scale, inv, write=j < steps), ws)
      last = i == steps - 1
      pl.when(last)(lambda: finish(b, accs))
      return tuple(jnp.where(last, 0.0, acc) for acc in accs)

    mine = pl.cdiv(pl.cdiv(y_ref.shape[-1], block_n) - pid, programs)  # this program's blocks
    tu.fori_prefetched(mine * steps, loads, update, zeros, prefetch=True, first=first)
    return
  if prefetch and rows == 1:  # more tokens take tl.dot, which Triton pipelines itself
    loads = lambda i: (load_x_scale(i), load_w(pid, i))
    first = loads(0)  # issued before the norm's own read of x
    inv = None if scale_ref is None else _inv_rms(x_ref, eps=norm_eps, **dims)

    def update(i, accs, step):
      (xk, scale), ws = step
      return accumulate(accs, normalized(i, xk, scale, inv), ws)

    accs = tu.fori_prefetched(steps, loads, update, zeros, prefetch=True, first=first)
  else:  # x normalized before the weight tiles load: fewer registers held (72 for the gate)
    inv = None if scale_ref is None else _inv_rms(x_ref, eps=norm_eps, **dims)

    def body(i, accs):
      xk = normalized(i, *load_x_scale(i), inv)
      return accumulate(accs, xk, load_w(pid, i))

    accs = lax.fori_loop(0, steps, body, zeros)
  finish(pid, accs)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5, 6, 7))
def _rowdot(
  x_TxD,
  ws_NxD,
  cfg: RowdotConfig,
  out_dtype,
  interpret: bool,
  norm_eps=None,
  normed=False,
  out_cols=None,
  scale_D=None,
  residual_TxN=None,
):
  """One launch over N / block_n programs (out_cols / block_n: y's columns past N are 0);
  two weights: the SwiGLU of both. Returns y, or (y, normalized x) with `normed`."""
  num_tokens, d_model = x_TxD.shape
  n = ws_NxD[0].shape[0]
  out_cols = out_cols or n
  block_n = min(cfg.block_n, pow2_at_least(n))
  block_d = min(cfg.block_d, pow2_at_least(d_model))
  blocks = pl.cdiv(out_cols, block_n)
  programs = min(cfg.programs, blocks) if _rows(num_tokens, cfg) == 1 else 0
  kernel = functools.partial(
    _kernel,
    num_tokens=num_tokens,
    rows=_rows(num_tokens, cfg),
    d_model=d_model,
    n=n,
    block_n=block_n,
    block_d=block_d,
    num_w=len(ws_NxD),
    swiglu=len(ws_NxD) == 2,
    norm_eps=norm_eps,
    residual=residual_TxN is not None,
    write_normed=normed,
    precision=precision_for(x_TxD.dtype),
    prefetch=cfg.prefetch,
    programs=programs,
  )
  out_shape = [jax.ShapeDtypeStruct((num_tokens, out_cols), out_dtype)]
  if normed:
    out_shape.append(jax.ShapeDtypeStruct(x_TxD.shape, x_TxD.dtype))
  inputs = [x_TxD, *([scale_D] if norm_eps is not None else []), *ws_NxD]
  inputs += [] if residual_TxN is None else [residual_TxN]
  outs = pl.pallas_call(
    kernel,
    out_shape=tuple(out_shape),
    grid=(programs or blocks,),
    compiler_params=plgpu.CompilerParams(num_warps=cfg.warps, num_stages=cfg.stages),
    interpret=interpret,
    name="decode_rowdot",
  )(*inputs)
  return tuple(outs) if normed else outs[0]


def _norm_args(norm, return_normed: bool) -> tuple:
  """(norm_eps, normed, scale) for `_rowdot` from norm = (scale_D, eps) or None."""
  if norm is None:
    if return_normed:
      raise ValueError("rowdot: return_normed needs a norm")
    return None, False, None
  scale_D, eps = norm
  return float(eps), return_normed, scale_D


def rowdot(
  x_TxD: jax.Array,
  w_NxD: jax.Array,
  *,
  config: RowdotConfig | None = None,
  out_dtype=None,
  interpret: bool | None = None,
  norm: tuple[jax.Array, float] | None = None,
  residual: jax.Array | None = None,
  return_normed: bool = False,
  out_cols: int | None = None,
  streaming: bool = False,
):
  """y_TxN = x Wᵀ for T ≤ 16 tokens (leading dims of x flattened), W output-major (N × D);
  fp32 accumulation, one cast to out_dtype (default x's dtype).

  norm = (scale_D, eps): x is RMS-normalized first, as `model.RMSNorm` does (so the norm
  costs no launch of its own); return_normed: also return that normalized x (T × D).
  residual (x's leading dims × N): y = residual + x Wᵀ, added as XLA adds two bf16 arrays.
  out_cols (>= N, no residual): y is that wide, 0 past N (the padded G a select reads).
  streaming: without a config, `rowdot_config`'s streaming tile where it applies."""
  lead, x_TxD, out_dtype = check_gemv_inputs("rowdot", x_TxD, w_NxD, 1, out_dtype)
  n, d_model = w_NxD.shape
  if out_cols is not None and (out_cols < n or residual is not None):
    raise ValueError(f"rowdot: out_cols={out_cols} needs >= N={n} and no residual")
  n = out_cols or n
  num_tokens = x_TxD.shape[0]
  norm_eps, normed, scale = _norm_args(norm, return_normed)
  if num_tokens == 0:
    y = jnp.zeros((*lead, n), out_dtype)
    return (y, jnp.zeros((*lead, d_model), x_TxD.dtype)) if normed else y
  size = w_NxD.dtype.itemsize
  cfg = config or rowdot_config(num_tokens, d_model, n, itemsize=size, streaming=streaming)
  res = None if residual is None else residual.reshape(num_tokens, n)
  interpret = tu.default_interpret(interpret)
  out = _rowdot(x_TxD, (w_NxD,), cfg, out_dtype, interpret, norm_eps, normed, n, scale, res)
  y_TxN, xn_TxD = out if normed else (out, None)
  y = y_TxN.reshape(*lead, n)
  return (y, xn_TxD.reshape(*lead, d_model)) if normed else y


def swiglu(
  x_TxD: jax.Array,
  w_gate_FxD: jax.Array,
  w_up_FxD: jax.Array,
  *,
  config: RowdotConfig | None = None,
  interpret: bool | None = None,
  norm: tuple[jax.Array, float] | None = None,
) -> jax.Array:
  """z_TxF = silu(x Wgᵀ) · x Wuᵀ in x's dtype (fp32 G and U, as `reference.dense_decode_ffn`),
  both weights output-major: the dense FFN's first half in one launch, no partials. norm: as
  `rowdot`'s."""
  num_tokens, d_model = x_TxD.shape
  d_ff = w_gate_FxD.shape[0]
  cfg = config or rowdot_config(num_tokens, d_model, d_ff, weights=2)
  norm_eps, _, scale = _norm_args(norm, False)
  ws = (w_gate_FxD, w_up_FxD)
  interpret = tu.default_interpret(interpret)
  return _rowdot(x_TxD, ws, cfg, x_TxD.dtype, interpret, norm_eps, False, None, scale)
