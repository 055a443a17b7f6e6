"""MoC's exact top-K as a Mosaic GPU radix select with shared-memory histograms.

Why: the Triton selection is instruction-bound (~270 µs at 16384 × 5504, NOTES_kernels.md);
counting keys into shared-memory histograms, one atomic per key and 8-bit digit, is how fast
GPU top-K kernels work, and Pallas-Triton cannot express those atomics. Not a default anywhere
(`TopKConfig.selection='mgpu'` picks it): exact in interpret mode on the CPU, not yet run on a
GPU (benchmarks/mgpu_select_probe.py is the first run).

Per row, one warpgroup per CTA, rows taken in turn by the CTAs; keys are the order-preserving
16-bit images of the values (0…65535):
  1. histogram of each key's high byte; suffix sums by doubling over shifted views of a
     zero-padded shared buffer; the bin b1 holding the K-th key: the largest b with
     S1[b] >= K; above = S1[b1 + 1];
  2. the same over the low byte of the keys whose high byte is b1: the K-th key
     v = 256 b1 + b2, `need` = K - #keys above v;
  3. words of keys above v and of keys equal to v; the equal words keep only their first
     `need` bits in channel order (a prefix sum of their popcounts, then per word the lowest
     bits that fit); the row's (F/32) words go to HBM by TMA;
  4. (`select`) each selected channel's slot from the words (prefix of their popcounts + its
     word's lower bits); channels and values stored there in shared memory, out by TMA.
"""

from __future__ import annotations

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _triton_utils as tu
from pallas_kernels._mgpu_ops import I32, LaneOps

BINS = 256
LANES = 128  # threads per warpgroup
MAX_CTAS = 1024  # rows are spread over at most this many CTAs (a divisor of T)
KEY_DTYPES = (jnp.bfloat16, jnp.float16)


def popcount(x):
  """Set bits of each int32 (SWAR; Mosaic GPU lowers no population_count)."""
  x = x - (lax.shift_right_logical(x, 1) & 0x55555555)
  x = (x & 0x33333333) + (lax.shift_right_logical(x, 2) & 0x33333333)
  x = (x + lax.shift_right_logical(x, 4)) & 0x0F0F0F0F
  return lax.shift_right_logical(x * 0x01010101, 24)


def _suffix_sums(buf_ref, layout, n: int, ops) -> None:
  """buf[b] = Σ_{j >= b} buf[j] for b < n, by doubling; buf[n : 2n] must hold zeros."""
  s = 1
  while s < n:
    a = ops.cast(buf_ref[pl.ds(0, n)], layout)
    b = ops.cast(buf_ref[pl.ds(s, n)], layout)
    ops.barrier()
    buf_ref[pl.ds(0, n)] = a + b
    ops.barrier()
    s *= 2


def _prefix_sums(buf_ref, layout, n: int, ops) -> None:
  """buf[n + w] = Σ_{j <= w} buf[n + j], by doubling; buf[0 : n] must hold zeros."""
  s = 1
  while s < n:
    a = ops.cast(buf_ref[pl.ds(n, n)], layout)
    b = ops.cast(buf_ref[pl.ds(n - s, n)], layout)
    ops.barrier()
    buf_ref[pl.ds(n, n)] = a + b
    ops.barrier()
    s *= 2


def _last_where(ok, iota):
  """The largest index where ok holds (-1 if none), as a uniform scalar."""
  return jnp.max(jnp.where(ok, iota, -1))


def keep_lowest(x, m):
  """The lowest m set bits of each int32 x (0 <= m <= 32): x masked below the smallest bit
  position p with m set bits under it, p found by a 6-step binary search."""
  lo, hi = jnp.zeros_like(x), jnp.full_like(x, 32)
  below = lambda p: jnp.where(p >= 32, -1, lax.shift_left(jnp.ones_like(x), p) - 1)
  for _ in range(6):
    mid = lax.shift_right_logical(lo + hi, 1)
    enough = popcount(x & below(mid)) >= m
    lo, hi = jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)
  return x & below(hi)


def kernel(
  t: int,
  f: int,
  k: int,
  ctas: int,
  num_valid: int | None = None,
  compact: bool = False,
  interpret: bool = False,
  aggregate: bool = False,
):
  """The kernel for (T, W >= F) 16-bit inputs, selecting among each row's first F columns:
  (T, F/32) int32 words; channels >= num_valid never selected. compact: also (T, K) int32
  channels (ascending) and (T, K) int16 bits of their values, `topk.select`'s outputs.
  aggregate: the histograms' atomics aggregated per warp (`_mgpu_ops.AGGREGATED_ADD`)."""
  nv = f if num_valid is None else num_valid
  if f % LANES or f // 32 > BINS or t % ctas or not 0 < k <= nv <= f:
    raise ValueError(
      f"the Mosaic GPU select needs F % {LANES} == 0, F <= {32 * BINS}, T % ctas == 0 and "
      f"0 < K <= num_valid <= F; got T={t}, F={f}, ctas={ctas}, K={k}, num_valid={nv}"
    )
  if compact and k % 8:
    raise ValueError(f"the Mosaic GPU top-K copies K-long rows by TMA: K % 8 == 0, got {k}")
  if interpret and ctas != 1:
    raise ValueError("interpret mode binds no CTA axis: use ctas=1")
  nw = f // 32
  per_lane = f // LANES
  vec = next(v for v in (4, 2, 1) if per_lane % v == 0)  # widest loads the row allows
  row_layout = plgpu.Layout.WG_STRIDED((f,), vec_size=vec)
  bin_layout = plgpu.Layout.WG_STRIDED((BINS,), vec_size=2)
  ops = LaneOps(row_layout, bin_layout, f, interpret, aggregate)
  _barrier = ops.barrier

  def compact_row(r, chan, word, key, gt_ref, eq_ref, idx_ref, val_ref, idx_out, val_out):
    """Slots from the final words (exclusive prefix of their popcounts), then the row's
    channels and values stored at their slots and copied out."""
    words = ops.cast(gt_ref[...], bin_layout)
    _barrier()
    eq_ref[pl.ds(BINS, BINS)] = popcount(words)
    _barrier()
    _prefix_sums(eq_ref, bin_layout, BINS, ops)
    first = ops.cast(eq_ref[pl.ds(BINS, BINS)], bin_layout) - popcount(words)
    _barrier()
    eq_ref[pl.ds(BINS, BINS)] = first
    _barrier()
    w = ops.lds(word, gt_ref)
    lower = lax.shift_left(jnp.ones_like(chan), chan & 31) - 1
    slot = ops.lds(word, eq_ref.at[pl.ds(BINS, BINS)]) + popcount(w & lower)
    sel = lax.shift_right_logical(w, chan & 31) & 1
    ops.sts32(slot, chan, sel, idx_ref)
    centered = key - 32768  # the value's bits back from its key (the map is its own inverse)
    ops.sts16(slot, jnp.where(centered < 0, centered ^ 0x7FFF, centered), sel, val_ref)
    ops.commit()
    ops.copy_out(idx_ref, idx_out.at[r])
    ops.copy_out(val_ref, val_out.at[r])

  def body(g_ref, out_ref, *refs):
    idx_out, val_out, hist_ref, gt_ref, eq_ref, idx_ref, val_ref = (
      refs if compact else (None, None, *refs, None, None)
    )
    pid = 0 if interpret else lax.axis_index("cta")  # interpret mode: one CTA (ctas=1)
    bin_iota = ops.cast(lax.broadcasted_iota(I32, (BINS,), 0), bin_layout)
    zeros_b = ops.cast(jnp.zeros((BINS,), I32), bin_layout)

    def kth_bin(base):
      """(largest b with base + S[b] >= K, base + S[b + 1]) from hist_ref's counts."""
      _suffix_sums(hist_ref, bin_layout, BINS, ops)
      s = ops.cast(hist_ref[pl.ds(0, BINS)], bin_layout)
      b = _last_where(base + s >= k, bin_iota)
      above_b = base + hist_ref[b + 1]
      _barrier()  # every thread has read the sums before anyone clears them
      return b, above_b

    def row(i, carry):
      r = pid + i * ctas
      hist_ref[pl.ds(0, BINS)] = zeros_b
      hist_ref[pl.ds(BINS, BINS)] = zeros_b
      gt_ref[...] = zeros_b
      eq_ref[pl.ds(0, BINS)] = zeros_b
      eq_ref[pl.ds(BINS, BINS)] = zeros_b
      _barrier()
      g = g_ref[r, pl.ds(0, f)]
      # per row, not hoisted: fewer arrays of F / 128 registers live across the row loop
      chan = ops.cast(lax.broadcasted_iota(I32, (f,), 0), row_layout)
      both = lambda ok: (ok if nv == f else ok & (chan < nv)).astype(I32)  # and not padding
      bits = ops.cast(lax.bitcast_convert_type(g, jnp.int16).astype(I32), row_layout)
      key = jnp.where(bits < 0, bits ^ 0x7FFF, bits) + 32768
      ops.count(lax.shift_right_logical(key, 8), None if nv == f else both(chan >= 0), hist_ref)
      _barrier()
      b1, above = kth_bin(0)
      hist_ref[pl.ds(0, BINS)] = zeros_b
      _barrier()
      ops.count(key & 0xFF, both(lax.shift_right_logical(key, 8) == b1), hist_ref)
      _barrier()
      b2, gt = kth_bin(above)
      v, need = b1 * BINS + b2, k - gt
      word = lax.shift_right_logical(chan, 5)
      bit = lax.shift_left(jnp.ones_like(chan), chan & 31)
      ops.bit_or(word, bit, both(key > v), gt_ref)
      ops.bit_or(word, bit, both(key == v), eq_ref.at[pl.ds(BINS, BINS)])
      _barrier()
      eq = ops.cast(eq_ref[pl.ds(BINS, BINS)], bin_layout)
      _barrier()
      eq_ref[pl.ds(BINS, BINS)] = popcount(eq)
      _barrier()
      _prefix_sums(eq_ref, bin_layout, BINS, ops)
      before = ops.cast(eq_ref[pl.ds(BINS, BINS)], bin_layout) - popcount(eq)
      keep = keep_lowest(eq, jnp.clip(need - before, 0, 32))
      ops.bit_or_bins(bin_iota, keep, None, gt_ref)  # keep is 0 past the row's words
      _barrier()
      if compact:
        refs_c = (gt_ref, eq_ref, idx_ref, val_ref, idx_out, val_out)
        compact_row(r, chan, word, key, *refs_c)
      ops.commit()  # the atomics' words, visible to the TMA engine
      ops.copy_out(gt_ref.at[pl.ds(0, nw)], out_ref.at[r])
      ops.wait()
      _barrier()  # the copy has read gt_ref before any thread clears it for the next row
      return carry

    lax.fori_loop(0, t // ctas, row, 0)

  out_type = [jax.ShapeDtypeStruct((t, nw), I32)]
  scratch = [
    plgpu.SMEM((2 * BINS,), I32),  # histogram, then zeros for the shifted views
    plgpu.SMEM((BINS,), I32),  # words of keys above v, then the row's words
    plgpu.SMEM((2 * BINS,), I32),  # zeros, then the words of keys equal to v, then slots
  ]
  if compact:
    out_type += [jax.ShapeDtypeStruct((t, k), I32), jax.ShapeDtypeStruct((t, k), jnp.int16)]
    scratch += [plgpu.SMEM((k,), I32), plgpu.SMEM((k,), jnp.int16)]
  return plgpu.kernel(
    body,
    out_type=tuple(out_type),
    grid=(ctas,),
    grid_names=("cta",),
    scratch_types=scratch,
    interpret=interpret,
  )


def _ctas(t: int, interpret: bool, ctas: int | None) -> int:
  """CTAs for T rows: `ctas` if given, else the largest divisor of T up to MAX_CTAS (1 in
  interpret mode)."""
  if interpret:
    return 1
  return ctas or max(d for d in range(1, min(t, MAX_CTAS) + 1) if t % d == 0)


def _check_dtype(g: jax.Array) -> None:
  if g.dtype not in KEY_DTYPES:
    raise ValueError(f"the Mosaic GPU select takes 16-bit floats (bf16, f16), got {g.dtype}")


def words(
  g2: jax.Array,
  k: int,
  *,
  num_valid: int | None = None,
  width: int | None = None,
  aggregate: bool = False,
  interpret: bool | None = None,
  ctas: int | None = None,
) -> jax.Array:
  """`topk_compact.mask_call`'s (T, F/32) int32 words for the first `width` columns of g2
  (default: all of them; the [G | U] buffer of a fused GEMM passes F)."""
  _check_dtype(g2)
  interpret = tu.default_interpret(interpret)
  t, f = g2.shape[0], width or g2.shape[1]
  kw = dict(interpret=interpret, aggregate=aggregate)
  return kernel(t, f, k, _ctas(t, interpret, ctas), num_valid, **kw)(g2)[0]


def select(
  g_TxF: jax.Array,
  k: int,
  *,
  aggregate: bool = False,
  interpret: bool | None = None,
  ctas: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """`topk.select(g, k, 'moc')` for a (T, F) 16-bit G: (idx ascending, values)."""
  _check_dtype(g_TxF)
  interpret = tu.default_interpret(interpret)
  t, f = g_TxF.shape
  kw = dict(compact=True, interpret=interpret, aggregate=aggregate)
  build = kernel(t, f, k, _ctas(t, interpret, ctas), **kw)
  _, idx, val_bits = build(g_TxF)
  return idx, lax.bitcast_convert_type(val_bits, g_TxF.dtype)
