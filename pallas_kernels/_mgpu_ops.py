"""Lane-level shared-memory ops for Mosaic GPU kernels, which Pallas does not express.

Pallas Mosaic GPU works on whole arrays in fixed layouts; a radix select needs each lane to add
to, OR into, load from or store to a shared-memory address of its own. These helpers emit that
PTX per register element through `plgpu.inline_mgpu`. In interpret mode (CPU tests) they are
jnp scatters and gathers on the whole ref, the barriers no-ops and TMA copies assignments.
"""

from __future__ import annotations

import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils

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


def _red(layout, op: str, aggregate: bool, with_value: bool, with_where: bool):
  """In-kernel: ref[index[i]] op= value[i] (1 without `value`) for every element i where
  where[i] != 0 (everywhere without `where`): `red.shared::cta.{op}` per element; int32 arrays
  of one layout, then a shared int32 ref. aggregate (counting): one atomic per bin and warp."""
  arrays = 1 + with_value + with_where

  @plgpu.inline_mgpu(arg_types=(layout,) * arrays + (plgpu.RefType(),))
  def red(ctx, index, *rest):
    del ctx
    value = rest[0] if with_value else None
    where = rest[with_value] if with_where else None
    i32 = ir.IntegerType.get_signless(32)
    base, one = mgpu_utils.memref_ptr(rest[-1]), arith.constant(i32, 1)
    ptx_op = f"red.shared::cta.{op}." + ("u32" if op == "add" else "b32")
    for pos, idx_v in np.ndenumerate(index.registers):
      for j in range(ir.VectorType(idx_v.type).shape[0]):
        lane = arith.constant(i32, j)
        index_j = llvm.extractelement(idx_v, lane)
        ptr = mgpu_utils.getelementptr(base, [index_j], i32)
        val = llvm.extractelement(value.registers[pos], lane) if with_value else one
        ok = llvm.extractelement(where.registers[pos], lane) if with_where else one
        if aggregate:
          asm, operands = AGGREGATED_ADD, [ptr, index_j, ok]
        elif with_where:
          asm = f"{{ .reg .pred p; setp.ne.s32 p, $2, 0; @p {ptx_op} [$0], $1; }}"
          operands = [ptr, val, ok]
        else:
          asm, operands = f"{ptx_op} [$0], $1;", [ptr, val]
        constraints = ",".join(["r"] * len(operands))
        llvm.inline_asm(
          ir.Type.parse("!llvm.void"), operands, asm, constraints, has_side_effects=True
        )

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
  """Interpret mode's stand-in for the inline shared-memory ops, on the whole ref at once
  (value None: 1; where None: everywhere)."""
  cur = ref[...]
  size = cur.shape[0]
  value = jnp.ones_like(index) if value is None else value
  where = jnp.ones_like(index) if where is None else where
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


class LaneOps:
  """The kernel's lane-level shared-memory ops: inline PTX on the GPU, jnp in interpret mode
  (which runs each CTA's program as one array program, so barriers are no-ops there).

  count(index, where, ref): ref[index] += 1 where `where` (None: everywhere), aggregated per
  warp with `aggregate`; bit_or / bit_or_bins(index, value, where, ref): ref[index] |= value,
  over the row's / the 256 bins' layout; lds(index, ref): ref[index]; sts32 / sts16(index,
  value, where, ref): ref[index] = value; barrier, commit, copy_out(src, dst), wait; cast."""

  def __init__(self, row_layout, bin_layout, f: int, interpret: bool, aggregate: bool):
    self._interpret = interpret
    if interpret:
      self.lds = lambda i, ref: ref[...][i]
      self.barrier = self.commit = self.wait = lambda: None
      self.copy_out = _assign
      self.cast = lambda x, layout: x
      return
    self._layouts = {"row": row_layout, "bins": bin_layout}
    self._aggregate = aggregate
    self._built: dict = {}
    self.cast = plgpu.layout_cast
    self.lds = _lds(row_layout, f)
    self._sts = {32: _sts(row_layout, 32), 16: _sts(row_layout, 16)}
    self.barrier = _barrier_gpu
    self.commit = plgpu.commit_smem
    self.copy_out = plgpu.copy_smem_to_gmem  # TMA: a bulk copy of the contiguous row
    self.wait = lambda: plgpu.wait_smem_to_gmem(0)

  def _red(self, layout: str, op: str, index, value, where, ref) -> None:
    if self._interpret:
      return _scatter(ref, index, value, where, op)
    key = (layout, op, value is not None, where is not None)
    if key not in self._built:
      aggregate = self._aggregate and op == "add"
      self._built[key] = _red(self._layouts[layout], op, aggregate, *key[2:])
    args = [a for a in (value, where) if a is not None]
    self._built[key](index, *args, ref)

  def count(self, index, where, ref) -> None:
    self._red("row", "add", index, None, where, ref)

  def bit_or(self, index, value, where, ref) -> None:
    self._red("row", "or", index, value, where, ref)

  def bit_or_bins(self, index, value, where, ref) -> None:
    self._red("bins", "or", index, value, where, ref)

  def sts32(self, index, value, where, ref) -> None:
    self._store(32, index, value, where, ref)

  def sts16(self, index, value, where, ref) -> None:
    self._store(16, index, value, where, ref)

  def _store(self, bits: int, index, value, where, ref) -> None:
    if self._interpret:
      return _scatter(ref, index, value, where, "set")
    self._sts[bits](index, value, where, ref)
