"""Probe: the whole MoC selection (top-K of each row as a bitmask) as a Mosaic GPU radix select.

The kernel writes the same (T, F/32) int32 words as the Triton selection pass
(`topk_compact.mask_call`: bit j of word w is channel 32 w + j; the K largest signed values,
ties to the lower channel), so it could replace that ~270 µs pass at 16384 × 5504 if it is
exact and fast. Not wired into any default: it has only been lowered on a CPU.

Per row, one warpgroup per CTA, rows taken in turn by the CTAs; keys are the order-preserving
16-bit images of bf16 values (0…65535):
  1. histogram of each key's high byte (one `red.shared` add per key, `mgpu_hist_probe`);
     suffix sums by doubling over shifted views of a zero-padded shared buffer; the bin b1
     holding the K-th key: the largest b with S1[b] >= K; above = S1[b1 + 1];
  2. the same over the low byte of the keys whose high byte is b1 (predicated adds): the K-th
     key v = 256 b1 + b2, `need` = K - #keys above v;
  3. words of keys above v and of keys equal to v (`red.shared.or`); the equal words keep only
     their first `need` bits in channel order (a prefix sum of their popcounts by doubling,
     then per word the lowest bits that fit); the row's words go to HBM;
  4. (`mgpu_topk`, the whole `topk.select`) each selected channel's slot from the words
     (prefix of their popcounts + its word's lower bits); its channel and value stored there in
     shared memory; both K-long rows to HBM by TMA.

  python3 benchmarks/mgpu_select_probe.py [--t=16384 --f=5632 --k=1024 --ctas=1024] [--out=F]
  python3 benchmarks/mgpu_select_probe.py --lower_only   # CPU: lower for CUDA, nothing runs
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils

from benchmarks import common

BINS = 256
LANES = 128  # threads per warpgroup
I32 = jnp.int32


# One key's count, aggregated over its warp: the lanes holding the same bin (`match.any`) add
# their number once, from the lowest of them, so a bin many lanes hit costs one atomic, not one
# per lane (Gaussian rows put most keys' high bytes in a few bins). Lanes with where == 0 match
# on a key no bin has. Operands: $0 the lane's address, $1 its bin, $2 where.
AGGREGATED_ADD = """{
.reg .pred p, q;
.reg .b32 k, m, t, me, cnt, lane;
setp.ne.s32 p, $2, 0;
mov.u32 lane, %laneid;
or.b32 t, lane, 0x80000000;
selp.b32 k, $1, t, p;
match.any.sync.b32 m, k, 0xffffffff;
neg.s32 t, m;
and.b32 t, t, m;
mov.u32 me, 1;
shl.b32 me, me, lane;
setp.eq.and.u32 q, t, me, p;
popc.b32 cnt, m;
@q red.shared::cta.add.u32 [$0], cnt;
}"""


def _red(layout, op: str, aggregate: bool = False):
  """In-kernel: for every element i of `where`, ref[index[i]] op= value[i] if where[i] != 0
  (`red.shared::cta.{op}`); three int32 arrays of one layout, and a shared int32 ref.
  aggregate (op 'add' with every value 1: counting): one atomic per bin and warp."""

  @plgpu.inline_mgpu(arg_types=(layout, layout, layout, plgpu.RefType()))
  def red(ctx, index, value, where, ref):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    base = mgpu_utils.memref_ptr(ref)
    regs = zip(index.registers.flat, value.registers.flat, where.registers.flat, strict=True)
    for idx_v, val_v, ok_v in regs:
      for j in range(ir.VectorType(idx_v.type).shape[0]):
        lane = arith.constant(i32, j)
        index_j = llvm.extractelement(idx_v, lane)
        ptr = mgpu_utils.getelementptr(base, [index_j], i32)
        ok = llvm.extractelement(ok_v, lane)
        if aggregate:
          asm, operands = AGGREGATED_ADD, [ptr, index_j, ok]
        else:
          asm = "{ .reg .pred p; setp.ne.s32 p, $2, 0; "
          asm += f"@p red.shared::cta.{op}.b32 [$0], $1; }}".replace(".add.b32", ".add.u32")
          operands = [ptr, llvm.extractelement(val_v, lane), ok]
        llvm.inline_asm(ir.Type.parse("!llvm.void"), operands, asm, "r,r,r", has_side_effects=True)

  return red


def _lds(layout, n: int):
  """In-kernel: ref[index[i]] for every element of `index` (int32, from a shared int32 ref)."""

  @plgpu.inline_mgpu(
    arg_types=(layout, plgpu.RefType()),
    return_type=plgpu.ShapeDtypeStruct((n,), I32, layout=layout),
  )
  def lds(ctx, index, ref):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    base = mgpu_utils.memref_ptr(ref)
    out = np.empty_like(index.registers)
    for pos, idx_v in np.ndenumerate(index.registers):
      acc = idx_v
      for j in range(ir.VectorType(idx_v.type).shape[0]):
        lane = arith.constant(i32, j)
        ptr = mgpu_utils.getelementptr(base, [llvm.extractelement(idx_v, lane)], i32)
        acc = llvm.insertelement(acc, llvm.load(i32, ptr), lane)
      out[pos] = acc
    return mgpu.FragmentedArray(_registers=out, _layout=index.layout, _is_signed=True)

  return lds


def _sts(layout, bits: int):
  """In-kernel: ref[index[i]] = value[i] (its low `bits` bits) where where[i] != 0, into a
  shared ref of bits-wide elements; three int32 arrays of one layout."""

  @plgpu.inline_mgpu(arg_types=(layout, layout, layout, plgpu.RefType()))
  def sts(ctx, index, value, where, ref):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    elem = ir.IntegerType.get_signless(bits)
    base = mgpu_utils.memref_ptr(ref)
    regs = zip(index.registers.flat, value.registers.flat, where.registers.flat, strict=True)
    for idx_v, val_v, ok_v in regs:
      for j in range(ir.VectorType(idx_v.type).shape[0]):
        lane = arith.constant(i32, j)
        ptr = mgpu_utils.getelementptr(base, [llvm.extractelement(idx_v, lane)], elem)
        val = llvm.extractelement(val_v, lane)
        if bits != 32:
          val = arith.trunci(elem, val)
        llvm.inline_asm(
          ir.Type.parse("!llvm.void"),
          [ptr, val, llvm.extractelement(ok_v, lane)],
          f"{{ .reg .pred p; setp.ne.s32 p, $2, 0; @p st.shared.b{bits} [$0], $1; }}",
          "r," + ("h" if bits == 16 else "r") + ",r",
          has_side_effects=True,
        )

  return sts


@plgpu.inline_mgpu()
def _barrier_gpu(ctx):
  del ctx
  mgpu_utils.warpgroup_barrier()


def _scatter(ref, index, value, where, combine: str) -> None:
  """Interpret mode's stand-in for the inline shared-memory ops, on the whole ref at once."""
  cur = ref[...]
  size = cur.shape[0]
  if combine == "or":  # OR-reduce every value that lands on each element
    hits = (index[None, :] == jnp.arange(size)[:, None]) & (where[None, :] != 0)
    contrib = jnp.where(hits, value[None, :], 0)
    ref[...] = cur | lax.reduce(contrib, np.int32(0), lax.bitwise_or, (1,))
    return
  target = jnp.where(where != 0, index, size)  # out of range: dropped
  at = cur.at[target]
  ref[...] = (
    at.add(value, mode="drop") if combine == "add" else at.set(value.astype(cur.dtype), mode="drop")
  )


def _assign(src_ref, dst_ref) -> None:
  dst_ref[...] = src_ref[...]


class _Ops:
  """The kernel's lane-level shared-memory ops: inline PTX on the GPU, jnp in interpret mode
  (which runs each CTA's program as one array program, so barriers are no-ops there)."""

  def __init__(self, row_layout, bin_layout, f: int, interpret: bool, aggregate: bool):
    if interpret:
      self.red_add = lambda i, v, w, ref: _scatter(ref, i, v, w, "add")
      self.red_or = self.red_or_w = lambda i, v, w, ref: _scatter(ref, i, v, w, "or")
      self.lds = lambda i, ref: ref[...][i]
      self.sts32 = self.sts16 = lambda i, v, w, ref: _scatter(ref, i, v, w, "set")
      self.barrier = self.commit = self.wait = lambda: None
      self.copy_out = _assign
      self.cast = lambda x, layout: x
      return
    self.cast = plgpu.layout_cast
    self.red_add, self.red_or = _red(row_layout, "add", aggregate), _red(row_layout, "or")
    self.red_or_w = _red(bin_layout, "or")
    self.lds, self.sts32, self.sts16 = (
      _lds(row_layout, f),
      _sts(row_layout, 32),
      _sts(row_layout, 16),
    )
    self.barrier = _barrier_gpu
    self.commit = plgpu.commit_smem
    self.copy_out = plgpu.copy_smem_to_gmem  # TMA: a bulk copy of the contiguous row
    self.wait = lambda: plgpu.wait_smem_to_gmem(0)


def _popcount(x):
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


def _keep_lowest(x, m):
  """The lowest m set bits of each int32 x (0 <= m <= 32): x masked below the smallest bit
  position p with m set bits under it, p found by a 6-step binary search."""
  lo, hi = jnp.zeros_like(x), jnp.full_like(x, 32)
  below = lambda p: jnp.where(p >= 32, -1, lax.shift_left(jnp.ones_like(x), p) - 1)
  for _ in range(6):
    mid = lax.shift_right_logical(lo + hi, 1)
    enough = _popcount(x & below(mid)) >= m
    lo, hi = jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)
  return x & below(hi)


def select_kernel(
  t: int,
  f: int,
  k: int,
  ctas: int,
  num_valid: int | None = None,
  compact: bool = False,
  interpret: bool = False,
  aggregate: bool = False,
):
  """(T, F) bf16 -> (T, F/32) int32 selection words; channels >= num_valid never selected.
  compact: also (T, K) int32 channels (ascending) and (T, K) int16 bits of their values, i.e.
  `topk.select`'s outputs: each selected channel's slot is the popcount of the row's set bits
  before it, both rows are built in shared memory and leave by TMA."""
  nv = f if num_valid is None else num_valid
  if f % LANES or f // 32 > BINS or t % ctas or not 0 < k <= nv <= f:
    raise ValueError(
      f"need F % {LANES} == 0, F <= {32 * BINS}, T % ctas == 0, 0 < K <= num_valid <= F; "
      f"got T={t}, F={f}, ctas={ctas}, K={k}, num_valid={nv}"
    )
  if interpret and ctas != 1:
    raise ValueError("interpret mode binds no CTA axis: use ctas=1")
  nw = f // 32
  per_lane = f // LANES
  vec = next(v for v in (4, 2, 1) if per_lane % v == 0)  # widest loads the row allows
  row_layout = plgpu.Layout.WG_STRIDED((f,), vec_size=vec)
  bin_layout = plgpu.Layout.WG_STRIDED((BINS,), vec_size=2)
  ops = _Ops(row_layout, bin_layout, f, interpret, aggregate)
  red_add, red_or, red_or_w = ops.red_add, ops.red_or, ops.red_or_w
  lds, sts32, sts16, _barrier = ops.lds, ops.sts32, ops.sts16, ops.barrier

  def compact_row(r, chan, word, bits, gt_ref, eq_ref, idx_ref, val_ref, idx_out, val_out):
    """Slots from the final words (exclusive prefix of their popcounts), then the row's
    channels and values stored at their slots and copied out."""
    words = ops.cast(gt_ref[...], bin_layout)
    _barrier()
    eq_ref[pl.ds(BINS, BINS)] = _popcount(words)
    _barrier()
    _prefix_sums(eq_ref, bin_layout, BINS, ops)
    first = ops.cast(eq_ref[pl.ds(BINS, BINS)], bin_layout) - _popcount(words)
    _barrier()
    eq_ref[pl.ds(BINS, BINS)] = first
    _barrier()
    w = lds(word, gt_ref)
    lower = lax.shift_left(jnp.ones_like(chan), chan & 31) - 1
    slot = lds(word, eq_ref.at[pl.ds(BINS, BINS)]) + _popcount(w & lower)
    sel = lax.shift_right_logical(w, chan & 31) & 1
    sts32(slot, chan, sel, idx_ref)
    sts16(slot, bits, sel, val_ref)
    ops.commit()
    ops.copy_out(idx_ref, idx_out.at[r])
    ops.copy_out(val_ref, val_out.at[r])

  def body(g_ref, out_ref, *refs):
    idx_out, val_out, hist_ref, gt_ref, eq_ref, idx_ref, val_ref = (
      refs if compact else (None, None, *refs, None, None)
    )
    pid = 0 if interpret else lax.axis_index("cta")  # interpret mode: one CTA (ctas=1)
    chan = ops.cast(lax.broadcasted_iota(I32, (f,), 0), row_layout)
    bin_iota = ops.cast(lax.broadcasted_iota(I32, (BINS,), 0), bin_layout)
    zeros_b = ops.cast(jnp.zeros((BINS,), I32), bin_layout)
    ones_r = ops.cast(jnp.ones((f,), I32), row_layout)
    valid = (chan < nv).astype(I32)

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
      bits = ops.cast(lax.bitcast_convert_type(g_ref[r], jnp.int16).astype(I32), row_layout)
      key = jnp.where(bits < 0, bits ^ 0x7FFF, bits) + 32768
      hi = lax.shift_right_logical(key, 8)
      red_add(hi, ones_r, valid, hist_ref)
      _barrier()
      b1, above = kth_bin(0)
      hist_ref[pl.ds(0, BINS)] = zeros_b
      _barrier()
      red_add(key & 0xFF, ones_r, valid & (hi == b1).astype(I32), hist_ref)
      _barrier()
      b2, gt = kth_bin(above)
      v, need = b1 * BINS + b2, k - gt
      word, bit = lax.shift_right_logical(chan, 5), lax.shift_left(ones_r, chan & 31)
      red_or(word, bit, valid & (key > v).astype(I32), gt_ref)
      red_or(word, bit, valid & (key == v).astype(I32), eq_ref.at[pl.ds(BINS, BINS)])
      _barrier()
      eq = ops.cast(eq_ref[pl.ds(BINS, BINS)], bin_layout)
      _barrier()
      eq_ref[pl.ds(BINS, BINS)] = _popcount(eq)
      _barrier()
      _prefix_sums(eq_ref, bin_layout, BINS, ops)
      before = ops.cast(eq_ref[pl.ds(BINS, BINS)], bin_layout) - _popcount(eq)
      keep = _keep_lowest(eq, jnp.clip(need - before, 0, 32))
      red_or_w(bin_iota, keep, (bin_iota < nw).astype(I32), gt_ref)
      _barrier()
      if compact:
        refs_c = (gt_ref, eq_ref, idx_ref, val_ref, idx_out, val_out)
        compact_row(r, chan, word, bits, *refs_c)
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


def emulate_words(g: jax.Array, k: int, num_valid: int | None = None) -> jax.Array:
  """The kernel's algorithm in jnp, row by row, with the kernel's own bit helpers: the CPU
  check of its digits, thresholds and tie cut (the kernel itself runs only on a GPU)."""
  t, f = g.shape
  bits = lax.bitcast_convert_type(g, jnp.int16).astype(I32)
  key = jnp.where(bits < 0, bits ^ 0x7FFF, bits) + 32768
  hi, lo = key >> 8, key & 0xFF
  valid = jnp.arange(f) < (f if num_valid is None else num_valid)
  suffix = lambda h: jnp.cumsum(h[:, ::-1], axis=1)[:, ::-1]
  bin_iota = jnp.arange(BINS)
  pad = lambda s: jnp.concatenate([s, jnp.zeros((t, 1), I32)], axis=1)
  count = jax.vmap(lambda r, ok: jnp.zeros(BINS, I32).at[r].add(ok.astype(I32)))
  s1 = pad(suffix(count(hi, jnp.broadcast_to(valid, hi.shape))))
  b1 = jnp.max(jnp.where(s1[:, :BINS] >= k, bin_iota, -1), axis=1)
  above = jnp.take_along_axis(s1, b1[:, None] + 1, axis=1)
  s2 = pad(suffix(count(lo, valid & (hi == b1[:, None]))))
  b2 = jnp.max(jnp.where(above + s2[:, :BINS] >= k, bin_iota, -1), axis=1)
  gt = above[:, 0] + jnp.take_along_axis(s2, b2[:, None] + 1, axis=1)[:, 0]
  v, need = (b1 * BINS + b2)[:, None], (k - gt)[:, None]
  weights = lax.shift_left(jnp.ones((32,), I32), jnp.arange(32, dtype=I32))
  words = lambda m: jnp.sum(m.reshape(t, f // 32, 32).astype(I32) * weights, axis=2, dtype=I32)
  eq = words(valid & (key == v))
  before = jnp.cumsum(_popcount(eq), axis=1) - _popcount(eq)
  return words(valid & (key > v)) | _keep_lowest(eq, jnp.clip(need - before, 0, 32))


def emulate_slots(words: jax.Array, f: int) -> jax.Array:
  """Each channel's output slot as the kernel computes it from the final words (-1 where the
  channel is not selected): the popcounts of the row's earlier words plus its word's lower
  set bits."""
  t = words.shape[0]
  chan = jnp.arange(f, dtype=I32)
  w = words[:, chan >> 5]
  first = jnp.cumsum(_popcount(words), axis=1) - _popcount(words)
  lower = lax.shift_left(jnp.ones_like(chan), chan & 31) - 1
  slot = first[:, chan >> 5] + _popcount(w & lower)
  sel = lax.shift_right_logical(w, jnp.broadcast_to(chan & 31, (t, f))) & 1
  return jnp.where(sel == 1, slot, -1)


def reference_words(g: jax.Array, k: int, num_valid: int | None = None) -> np.ndarray:
  """The selection of the first num_valid channels as words, from `reference.select`."""
  from pallas_kernels import reference

  t, f = g.shape
  idx, _ = reference.select(g[:, : f if num_valid is None else num_valid], k, "moc")
  mask = np.zeros((t, f), bool)
  np.put_along_axis(mask, np.asarray(idx), True, axis=1)
  bits = mask.reshape(t, f // 32, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
  return bits.sum(axis=2).astype(np.uint32).view(np.int32)


def mgpu_topk(t: int, f: int, k: int, ctas: int, interpret: bool = False, aggregate: bool = False):
  """`topk.select(g, k, 'moc')`'s (idx, val) through the compacting kernel."""
  kernel = select_kernel(t, f, k, ctas, compact=True, interpret=interpret, aggregate=aggregate)

  def topk(g):
    _, idx, val_bits = kernel(g)
    return idx, lax.bitcast_convert_type(val_bits, jnp.bfloat16)

  return topk


def _variants(a) -> dict:
  """The Mosaic GPU rows: words and (without padding, K % 8 == 0) the whole top-K, each with
  plain and warp-aggregated histogram atomics."""
  fns = {}
  for agg in (False, True):
    tag = "_agg" if agg else ""
    words = select_kernel(a.t, a.f, a.k, a.ctas, a.num_valid, aggregate=agg)
    fns[f"mgpu_select{tag}"] = jax.jit(lambda g, words=words: words(g)[0])
    if a.num_valid is None and a.k % 8 == 0:  # `topk.select` has no num_valid
      fns[f"mgpu_topk{tag}"] = jax.jit(mgpu_topk(a.t, a.f, a.k, a.ctas, aggregate=agg))
  return fns


def _exact(fn, name: str, g, a) -> bool:
  from pallas_kernels import reference

  if name.startswith("mgpu_select"):
    return bool(np.array_equal(fn(g), reference_words(g, a.k, a.num_valid)))
  (idx, val), (ref_idx, ref_val) = fn(g), reference.select(g, a.k, "moc")
  return bool(np.array_equal(idx, ref_idx) and np.array_equal(val, ref_val))


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--t", type=int, default=16384)
  p.add_argument("--f", type=int, default=5632, help="a multiple of 128, at most 8192")
  p.add_argument("--k", type=int, default=1024, help="a multiple of 8 for the top-K rows")
  p.add_argument("--num_valid", type=int, default=None, help="channels that may be selected")
  p.add_argument("--ctas", type=int, default=1024, help="must divide T")
  p.add_argument("--lower_only", action="store_true", help="lower for CUDA and stop (CPU)")
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  try:
    fns = _variants(a)
  except ValueError as e:
    p.error(str(e))
  g_spec = jax.ShapeDtypeStruct((a.t, a.f), jnp.bfloat16)
  if a.lower_only:
    for name, fn in fns.items():
      text = fn.trace(g_spec).lower(lowering_platforms=("cuda",)).as_text()
      print(f"{name}: lowered for CUDA ({len(text)} characters)")
    return
  normal = lambda seed: jax.random.normal(jax.random.PRNGKey(seed), (a.t, a.f))
  sets = [(normal(seed).astype(jnp.bfloat16),) for seed in (0, 1)]
  ties = jax.random.randint(jax.random.PRNGKey(2), (a.t, a.f), -3, 4).astype(jnp.bfloat16)
  rows: dict = {name: {} for name in fns}
  for name in list(fns):  # a variant that fails or is inexact is reported, never timed
    try:
      for label, g in (("gaussian", sets[0][0]), ("ties", ties)):
        rows[name][f"exact_{label}"] = _exact(fns[name], name, g, a)
    except Exception as e:
      rows[name]["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    if rows[name].get("error") or not all(rows[name].values()):
      del fns[name]
    print(name, rows[name], flush=True)
  from pallas_kernels import moc_train, topk, topk_compact

  cfg = moc_train.forward_config(a.f)
  fns["triton_mask"] = jax.jit(
    lambda g: topk_compact.mask_call(g, a.k, "moc", cfg, False, num_valid=a.num_valid)
  )
  fns["xla_read_max"] = jax.jit(lambda g: jnp.max(g, axis=1))
  if a.num_valid is None:
    fns["triton_topk"] = jax.jit(lambda g: topk.select(g, a.k, "moc"))  # its default config
  samples = common.time_interleaved(fns, sets, inner=10, trials=9)
  for name, us in samples.items():
    row = rows.setdefault(name, {})
    row |= {"median_us": sorted(us)[len(us) // 2], "samples_us": us}
    print(f"{name:14s} {row['median_us']:8.1f} us", flush=True)
  if a.out:
    shape = {"t": a.t, "f": a.f, "k": a.k, "num_valid": a.num_valid, "ctas": a.ctas}
    common.write_json(a.out, {"info": common.run_info(), "shape": shape, "rows": rows})


if __name__ == "__main__":
  main()
