"""MoC selection spread over many programs (T ≤ 4): per-block key histograms, no row scan.

`DecodeConfig.select_mode = "hist"` (list pipeline). Launches for bf16 'moc':
  1. `_gemv_hist_kernel`, grid over F blocks, the whole D per program (no split): G rounded to
     x's dtype (stored as fp32) and, per block and token, a 256-bin histogram of the top 8 bits
     of G's order-preserving key.
  2. `_level_kernel` (bits // 8 - 1 launches: one for 16-bit keys), grid (T, F / hist_block):
     every program sums the histograms so far (from L2), which fixes the next 8 bits of the
     K-th largest key, and histograms the next 8 bits of its own keys that share the prefix.
  3. `_write_kernel`, same grid: with every digit known, tau and the number of ties to keep are
     exact; the counts of earlier blocks (> tau, == tau) come from the histograms, so each
     program writes its slice of the sorted list (idx, silu(G)) without seeing other keys.
     Same semantics as the reference: top-K signed values, ties to the lower index.
'moc_2of8' needs no threshold: launch 1 without histograms, then the group select of
`_decode_select` with one program per `hist_block // 8` groups.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _decode_select as sel
from pallas_kernels import _triton_utils as tu
from pallas_kernels import reference
from pallas_kernels._decode_config import DecodeConfig, cdiv, pow2_at_least

F32 = jnp.float32
I32 = jnp.int32
BINS = 256
CHUNK = 32  # histogram rows summed per loop step


def _gemv_hist_kernel(
  x_ref, w_ref, g_ref, *h_ref, num_tokens, d_model, d_ff, block_d, block_f, bits
):
  fi = pl.program_id(0)
  rows = max(16, pow2_at_least(num_tokens))
  f0 = fi * block_f
  f_mask = f0 + jnp.arange(block_f) < d_ff
  t_mask = jnp.arange(rows) < num_tokens
  prec = lax.Precision.HIGHEST if x_ref.dtype == F32 else lax.Precision.DEFAULT

  def body(i, acc):
    d0 = i * block_d
    d_mask = d0 + jnp.arange(block_d) < d_model
    x = plgpu.load(
      x_ref.at[pl.ds(0, rows), pl.ds(d0, block_d)], mask=t_mask[:, None] & d_mask[None, :], other=0
    )
    w = plgpu.load(
      w_ref.at[pl.ds(d0, block_d), pl.ds(f0, block_f)],
      mask=d_mask[:, None] & f_mask[None, :],
      other=0,
    )
    return acc + jnp.dot(x, w, preferred_element_type=F32, precision=prec)

  acc = lax.fori_loop(0, pl.cdiv(d_model, block_d), body, jnp.zeros((rows, block_f), F32))
  g = acc.astype(x_ref.dtype)
  mask = t_mask[:, None] & f_mask[None, :]
  plgpu.store(g_ref.at[pl.ds(0, rows), pl.ds(f0, block_f)], g.astype(F32), mask=mask)
  if not h_ref:
    return
  b = (sel.sortable_key(g) >> (bits - 8)) + BINS // 2
  b = jnp.where(mask, b, -1)  # padding counts nowhere
  row = jnp.arange(rows)[:, None]
  for t in range(num_tokens):  # one token's row through a masked reduction (no register slicing)
    bt = jnp.sum(jnp.where(row == t, b, 0), axis=0)
    hit = bt[:, None] == jnp.arange(BINS)[None, :]
    plgpu.store(h_ref[0].at[jnp.int32(t), fi, :], jnp.sum(hit.astype(I32), axis=0))


def _digit(total, need):
  """The bin holding the need-th largest key, and how many of the keys needed lie in it."""
  bins = jnp.arange(BINS)
  ge = jnp.sum(total) - jnp.cumsum(total) + total  # keys in this bin or above
  d = jnp.sum((ge >= need).astype(I32)) - 1
  above = jnp.sum(jnp.where(bins > d, total, 0))
  return d, need - above


def _hist_sum(h_ref, t, fn):
  """sum over the blocks q of h_ref[t] of fn(q (CHUNK,), hist (CHUNK, BINS)), in chunks."""
  nb = h_ref.shape[1]

  def body(i, acc):
    q = i * CHUNK + jnp.arange(CHUNK)
    h = plgpu.load(h_ref.at[t, pl.ds(i * CHUNK, CHUNK), :], mask=(q < nb)[:, None], other=0)
    return acc + fn(q, h)

  return lax.fori_loop(
    0, cdiv(nb, CHUNK), body, fn(jnp.arange(CHUNK), jnp.zeros((CHUNK, BINS), I32))
  )


def _digits(h_refs, t, k):
  """Digits of the K-th largest key fixed by the given levels: (prefix, digits, need left)."""
  prefix, need, digits = jnp.int32(0), jnp.int32(k), []
  for level, h_ref in enumerate(h_refs):
    total = _hist_sum(h_ref, t, lambda q, h: jnp.sum(h, axis=0))
    d, need = _digit(total, need)
    digits.append(d)
    prefix = d - BINS // 2 if level == 0 else prefix * BINS + d
  return prefix, digits, need


def _my_keys(g_ref, t, c0, width, d_ff, round_dtype):
  valid = c0 + jnp.arange(width) < d_ff
  g = plgpu.load(g_ref.at[t, pl.ds(c0, width)], mask=valid, other=0).astype(round_dtype)
  return g, sel.sortable_key(g), valid


def _level_kernel(g_ref, *refs, k, d_ff, width, bits, round_dtype):
  *h_refs, out_ref = refs
  t, p = pl.program_id(0), pl.program_id(1)
  prefix, _, _ = _digits(h_refs, t, k)
  _, key, valid = _my_keys(g_ref, t, p * width, width, d_ff, round_dtype)
  shift = bits - 8 * (len(h_refs) + 1)
  b = jnp.where(valid & ((key >> (shift + 8)) == prefix), (key >> shift) & (BINS - 1), -1)
  hist = jnp.sum((b[:, None] == jnp.arange(BINS)[None, :]).astype(I32), axis=0)
  plgpu.store(out_ref.at[t, p, :], hist)


def _write_kernel(g_ref, *refs, k, d_ff, width, block0, bits, round_dtype, interpret):
  *h_refs, idx_ref, a_ref = refs
  t, p = pl.program_id(0), pl.program_id(1)
  tau, digits, need = _digits(h_refs, t, k)
  bins = jnp.arange(BINS)[None, :]
  c0 = p * width
  gt_before = jnp.int32(0)
  for level, (h_ref, d) in enumerate(zip(h_refs, digits, strict=True)):
    size = block0 if level == 0 else width  # channels per histogram row at this level
    gt_before += _hist_sum(
      h_ref,
      t,
      lambda q, h, d=d, size=size: jnp.sum(jnp.where((q * size < c0)[:, None] & (bins > d), h, 0)),
    )
  eq_before = _hist_sum(
    h_refs[-1], t, lambda q, h: jnp.sum(jnp.where((q < p)[:, None] & (bins == digits[-1]), h, 0))
  )
  g, key, valid = _my_keys(g_ref, t, c0, width, d_ff, round_dtype)
  tied = valid & (key == tau)
  selected = (valid & (key > tau)) | (tied & (eq_before + jnp.cumsum(tied.astype(I32)) <= need))
  first = gt_before + jnp.minimum(eq_before, need)  # list slots taken by earlier blocks
  pos = first + jnp.cumsum(selected.astype(I32)) - 1
  channel = c0 + jnp.arange(width, dtype=I32)
  sel._store_list((idx_ref, a_ref), t, pos, channel, tu.silu(g.astype(F32)), selected, interpret)


def hist_select(x_TxD, w_gate_DxF, k, variant, cfg: DecodeConfig, *, interpret: bool):
  """(idx_TxK int32 ascending, a_TxK = silu(G) there), as `select_scale(..., lists=True)`."""
  num_tokens, d_model = x_TxD.shape
  d_ff = w_gate_DxF.shape[1]
  round_dtype = x_TxD.dtype
  bits = jnp.dtype(round_dtype).itemsize * 8
  block_f = min(cfg.gemv_block_f, pow2_at_least(d_ff))
  width = max(min(cfg.hist_block, pow2_at_least(d_ff)), block_f, reference.GROUP)
  nb = cdiv(d_ff, width)
  nb0 = nb * width // block_f
  g_shape = jax.ShapeDtypeStruct((num_tokens, nb * width), F32)
  params = plgpu.CompilerParams(num_warps=cfg.gemv_warps, num_stages=cfg.gemv_stages)
  gemv = functools.partial(
    _gemv_hist_kernel,
    num_tokens=num_tokens,
    d_model=d_model,
    d_ff=d_ff,
    block_d=min(cfg.gemv_block_d, pow2_at_least(d_model)),
    block_f=block_f,
    bits=bits,
  )
  hist = jax.ShapeDtypeStruct((num_tokens, nb0, BINS), I32)
  out = pl.pallas_call(
    gemv,
    out_shape=(g_shape, hist) if variant == "moc" else (g_shape,),
    grid=(nb0,),
    compiler_params=params,
    interpret=interpret,
    name="decode_gemv_hist",
  )(x_TxD, w_gate_DxF)
  g = out[0]
  if variant == "moc_2of8":
    return sel.select_scale(
      g[None, None],
      k,
      variant,
      d_ff=d_ff,
      round_dtype=round_dtype,
      warps=cfg.select_warps,
      lists=True,
      interpret=interpret,
      group_block=width // reference.GROUP,
    )
  if variant != "moc":
    raise ValueError(f"unknown MoC variant {variant!r}; expected 'moc' or 'moc_2of8'")
  hists = [out[1]]
  params = plgpu.CompilerParams(num_warps=cfg.select_warps, num_stages=1)
  common = dict(k=k, d_ff=d_ff, width=width, bits=bits, round_dtype=round_dtype)
  for level in range(1, bits // 8):
    hists.append(
      pl.pallas_call(
        functools.partial(_level_kernel, **common),
        out_shape=jax.ShapeDtypeStruct((num_tokens, nb, BINS), I32),
        grid=(num_tokens, nb),
        compiler_params=params,
        interpret=interpret,
        name=f"decode_hist_level{level}",
      )(g, *hists)
    )
  return pl.pallas_call(
    functools.partial(_write_kernel, **common, block0=block_f, interpret=interpret),
    out_shape=(
      jax.ShapeDtypeStruct((num_tokens, k), I32),
      jax.ShapeDtypeStruct((num_tokens, k), F32),
    ),
    grid=(num_tokens, nb),
    compiler_params=params,
    interpret=interpret,
    name="decode_hist_write",
  )(g, *hists)
