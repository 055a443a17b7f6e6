"""PTX builders for the Mosaic GPU radix select (`mgpu_select`), which Pallas does not express.

Pallas Mosaic GPU works on whole arrays in fixed layouts; a radix select also needs lanes that
add into shared-memory bins of their own, warp ballots, warp scans and bit instructions
(`popc`, `fns`). Each builder returns a `plgpu.inline_mgpu` op that emits that PTX per
register. The row is in `WG_STRIDED` order with one element per register: element
c = 128 i + 32 warp + lane sits in register i, so the 32 lanes of a warp hold one 32-bit word
of the row's bitmask and a ballot is that word. The 256 bins are two per thread (bins 2t,
2t + 1), so a warp holds 64 consecutive bins. `_mgpu_ops.SelectOps` calls these on the GPU and
jnp equivalents in interpret mode.
"""

from __future__ import annotations

import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
import numpy as np
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils

I32 = jnp.int32
BINS = 256
LANES = 128  # threads per warpgroup
_VOID = "!llvm.void"


def named(body, name: str):
  """`body`, renamed: Mosaic GPU names a kernel after its body function, and a profile should
  tell this project's kernels apart (`moc_` names: step_profile's 'pallas' kind)."""
  body.__name__ = name
  return body


def _i32():
  return ir.IntegerType.get_signless(32)


def _c(v: int):
  return arith.constant(_i32(), v)


def _asm(text: str, operands: list, constraints: str, result: bool = False):
  """One inline PTX block; returns its one 32-bit result if `result`."""
  ty = _i32() if result else ir.Type.parse(_VOID)
  return llvm.inline_asm(ty, operands, text, constraints, has_side_effects=True)


def _thread():
  """(thread in the warpgroup, its warp, its lane), int32."""
  t = arith.remui(mgpu_utils.thread_idx(), _c(LANES))
  return t, arith.shrui(t, _c(5)), arith.andi(t, _c(31))


def _elements(array):
  """(register i, element j, value) for each element of a WG_STRIDED array."""
  for (i,), vec in np.ndenumerate(array.registers):
    for j in range(ir.VectorType(vec.type).shape[0]):
      yield i, j, llvm.extractelement(vec, _c(j))


def _valid(thread, i: int, num_valid: int):
  """Row element 128 i + thread < num_valid (vec 1): None when the whole register is."""
  if LANES * (i + 1) <= num_valid:
    return None
  return arith.cmpi(arith.CmpIPredicate.slt, thread, _c(num_valid - LANES * i))


def _scalar(array):
  """The first element of an array that holds one value everywhere."""
  return llvm.extractelement(array.registers.flat[0], _c(0))


def _keys(key, num_valid: int):
  """[(register i, key, validity flag: an int32, or None where the whole register is valid)]."""
  thread = _thread()[0]
  out = []
  for i, _, k in _elements(key):
    ok = _valid(thread, i, num_valid)
    out.append((i, k, None if ok is None else arith.extui(_i32(), ok)))
  return out


def _blocks(keys, fixed: list, element, decls: str, chunk: int = 8, tail: str = "") -> None:
  """One inline PTX block per `chunk` keys: `fixed` operands first ($0…), then each key and
  its flag; element(key operand, flag operand or None, register i) is that key's PTX, `tail`
  ends each block."""
  for start in range(0, len(keys), chunk):
    operands, lines = list(fixed), []
    for i, k, flag in keys[start : start + chunk]:
      operands.append(k)
      k_op = f"${len(operands) - 1}"
      f_op = None
      if flag is not None:
        operands.append(flag)
        f_op = f"${len(operands) - 1}"
      lines.append(element(k_op, f_op, i))
    text = "{\n" + decls + "\n" + "\n".join(lines) + tail + "\n}"
    _asm(text, operands, ",".join(["r"] * len(operands)))


JUNK_BIN = BINS  # where keys outside a pass add (never read)
HIST_WORDS = BINS + 8  # a histogram in shared memory: the bins, then JUNK_BIN (16-byte rows)


def count(row_layout, bin_layout, num_valid: int, low: bool):
  """ref[digit(key)] += 1 for the row's valid keys: the high byte, or (low) the low byte of
  the keys whose high byte is `high` (a bins-layout array of that one value). Per key: two
  or three ALU ops and one shared-memory reduction. Keys outside the pass (other high
  bytes, padding) add into JUNK_BIN: ptxas turns a predicated shared-memory reduction into
  a branch around it (BSSY, BRA, BSYNC per key in the SASS), which cost the 1B layer's
  words 10-11% and the top-K at T = 1 17% on an H100 (NOTES_kernels 2026-12-05g)."""
  args = (row_layout, bin_layout, plgpu.RefType()) if low else (row_layout, plgpu.RefType())

  def element(k, flag, i):
    del i
    digit = f"sub.s32 d, {k}, $2; min.u32 d, d, {JUNK_BIN};" if low else f"shr.u32 d, {k}, 8;"
    if flag is not None:
      digit += f" setp.eq.s32 p, {flag}, 0; @p mov.b32 d, {JUNK_BIN};"
    return digit + " mad.lo.u32 a, d, 4, $0; red.shared::cta.add.u32 [a], $1;"

  @plgpu.inline_mgpu(arg_types=args)
  def count(ctx, key, *rest):
    del ctx
    fixed = [mgpu_utils.memref_ptr(rest[-1]), _c(1)]
    if low:
      fixed.append(arith.muli(_scalar(rest[0]), _c(BINS)))
    decls = ".reg .pred p; .reg .b32 a, d;"
    _blocks(_keys(key, num_valid), fixed, element, decls)

  return count


def _lane_stores(n: int) -> str:
  """`ballot_words(lanes=True)`'s end: lane j stores the words of registers j and 32 + j
  (a0, z0 and a1, z1) where the row has them; word 4 i + warp is 16 i bytes past $0 / $1."""
  text = "\nmad.lo.u32 t, l, 16, $0; mad.lo.u32 u, l, 16, $1;"
  for half in range(-(-n // 32)):
    text += (
      f"\nsetp.lt.u32 q, l, {min(32, n - 32 * half)};"
      f" @q st.shared.b32 [t+{512 * half}], a{half}; @q st.shared.b32 [u+{512 * half}], z{half};"
    )
  return text


def ballot_words(row_layout, bin_layout, num_valid: int, lanes: bool = False):
  """above[w] / equal[w]: the bits of the row's valid keys > v / == v in word w, one ballot
  per register and warp (every word of the row is written). Register i of warp w holds word
  4 i + w: an immediate offset from the warp's first word. Every lane stores the word (one
  address, one value): stores by lane 0 alone were a branch around each pair in the SASS.
  lanes: lane i % 32 keeps register i's two words (a select each) and each lane stores its
  words once at the end: 4 shared-memory stores a thread, not two per register (the
  ballots' stores were 28% of the 1B words' shared-memory wavefronts, the profile of
  2026-12-05m), for one more ALU op per register."""

  def element(k, flag, i):
    both = (
      "" if flag is None else f" setp.ne.and.s32 p, {flag}, 0, p; setp.ne.and.s32 e, {flag}, 0, e;"
    )
    keep = (
      f" setp.eq.u32 q, l, {i % 32}; @q mov.b32 a{i // 32}, g; @q mov.b32 z{i // 32}, w;"
      if lanes
      else f" st.shared.b32 [$0+{16 * i}], g; st.shared.b32 [$1+{16 * i}], w;"
    )
    return (
      f"setp.gt.s32 p, {k}, $2; setp.eq.s32 e, {k}, $2;{both}"
      " vote.sync.ballot.b32 g, p, 0xffffffff; vote.sync.ballot.b32 w, e, 0xffffffff;" + keep
    )

  @plgpu.inline_mgpu(arg_types=(row_layout, bin_layout, plgpu.RefType(), plgpu.RefType()))
  def ballot(ctx, key, v_array, above_ref, equal_ref):
    del ctx
    warp = _thread()[1]
    ptrs = [
      mgpu_utils.getelementptr(mgpu_utils.memref_ptr(r), [warp], _i32())
      for r in (above_ref, equal_ref)
    ]
    fixed, decls = [*ptrs, _scalar(v_array)], ".reg .pred p, e; .reg .b32 g, w;"
    keys, kw = _keys(key, num_valid), {}
    if lanes:  # one block: the lanes' words live across all the registers
      decls += " .reg .pred q; .reg .b32 l, t, u, a0, a1, z0, z1; mov.u32 l, %laneid;"
      kw = dict(chunk=len(keys), tail=_lane_stores(len(keys)))
    _blocks(keys, fixed, element, decls, **kw)

  return ballot


def _warp_scan(x, suffix: bool):
  """Inclusive sum over the lanes at or above (suffix) / at or below each lane."""
  step = (
    "shfl.sync.down.b32 y|p, $0, {d}, 0x1f, 0xffffffff;"
    if suffix
    else "shfl.sync.up.b32 y|p, $0, {d}, 0x0, 0xffffffff;"
  )
  body = " ".join(step.format(d=d) + " @p add.s32 $0, $0, y;" for d in (1, 2, 4, 8, 16))
  return _asm(f"{{ .reg .pred p; .reg .b32 y; mov.b32 $0, $1; {body} }}", [x], "=r,r", True)


def _store_if(ptr, value, ok) -> None:
  flag = arith.extui(_i32(), ok)
  _asm(
    "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p st.shared.b32 [$0], $1; }",
    [ptr, value, flag],
    "r,r,r",
  )


def _block_scan(bins, tmp_ref, slot: int, suffix: bool):
  """(a0, a1, inclusive sum of the pairs over the threads at or above / at or below this
  one, thread): warp scans, each warp's total through tmp[slot : slot + 4], one barrier."""
  vec = bins.registers.flat[0]
  a0, a1 = (llvm.extractelement(vec, _c(j)) for j in (0, 1))
  pair = arith.addi(a0, a1)
  x = _warp_scan(pair, suffix)
  thread, warp, lane = _thread()
  base = mgpu_utils.memref_ptr(tmp_ref)
  last = arith.cmpi(arith.CmpIPredicate.eq, lane, _c(0 if suffix else 31))
  _store_if(mgpu_utils.getelementptr(base, [arith.addi(warp, _c(slot))], _i32()), x, last)
  mgpu_utils.warpgroup_barrier()
  before = arith.CmpIPredicate.ugt if suffix else arith.CmpIPredicate.ult
  for w in range(4):
    total = llvm.load(_i32(), mgpu_utils.getelementptr(base, [slot + w], _i32()))
    counts = arith.cmpi(before, _c(w), warp)
    x = arith.addi(x, arith.select(counts, total, _c(0)))
  return a0, a1, x, thread


def select_bin(bin_layout, k: int, slot: int):
  """With S[b] = base + Σ_{j >= b} h[j]: the one bin b with S[b] >= K > S[b + 1], written
  to tmp[slot + 4] with S[b + 1] to tmp[slot + 5] by the thread holding it; then a barrier.
  h and base (one value everywhere) in the bins layout; S[256] = base < K. The fourth
  argument, the histogram h was loaded from, gets its two bins zeroed by each thread (it
  alone loads them, and the next adds come after this op's barriers)."""

  @plgpu.inline_mgpu(arg_types=(bin_layout, bin_layout, plgpu.RefType(), plgpu.RefType()))
  def select_bin(ctx, h, base_array, tmp_ref, hist_ref):
    del ctx
    pair = mgpu_utils.getelementptr(
      mgpu_utils.memref_ptr(hist_ref), [arith.muli(_thread()[0], _c(2))], _i32()
    )
    _asm("st.shared.v2.b32 [$0], {$1, $1};", [pair, _c(0)], "r,r")
    a0, a1, incl, thread = _block_scan(h, tmp_ref, slot, suffix=True)
    s0 = arith.addi(incl, _scalar(base_array))  # S[2t]
    s1, s2 = arith.subi(s0, a0), arith.subi(arith.subi(s0, a0), a1)  # S[2t + 1], S[2t + 2]
    ge = lambda s: arith.cmpi(arith.CmpIPredicate.sge, s, _c(k))
    lt = lambda s: arith.cmpi(arith.CmpIPredicate.slt, s, _c(k))
    odd = arith.andi(ge(s1), lt(s2))  # b = 2t + 1
    here = arith.ori(odd, arith.andi(ge(s0), lt(s1)))
    b = arith.addi(arith.muli(thread, _c(2)), arith.extui(_i32(), odd))
    above = arith.select(odd, s2, s1)
    base = mgpu_utils.memref_ptr(tmp_ref)
    _store_if(mgpu_utils.getelementptr(base, [slot + 4], _i32()), b, here)
    _store_if(mgpu_utils.getelementptr(base, [slot + 5], _i32()), above, here)
    mgpu_utils.warpgroup_barrier()

  return select_bin


def exclusive_prefix(bin_layout, slot: int):
  """x[b] -> Σ_{j < b} x[j] over the 256 bins (tmp[slot : slot + 4] for the warp totals)."""

  @plgpu.inline_mgpu(
    arg_types=(bin_layout, plgpu.RefType()),
    return_type=plgpu.ShapeDtypeStruct((BINS,), I32, layout=bin_layout),
  )
  def prefix(ctx, x, tmp_ref):
    del ctx
    a0, a1, incl, _ = _block_scan(x, tmp_ref, slot, suffix=False)
    first = arith.subi(arith.subi(incl, a1), a0)
    vec = x.registers.flat[0]
    vec = llvm.insertelement(vec, first, _c(0))
    vec = llvm.insertelement(vec, arith.addi(first, a0), _c(1))
    regs = np.empty_like(x.registers)
    regs.flat[0] = vec
    return mgpu.FragmentedArray(_registers=regs, _layout=x.layout, _is_signed=True)

  return prefix


def stash_row(row_layout, f: int):
  """row[c] = the low 16 bits of element c of a row-layout array (the row's value bits, for
  the compaction to read by channel): one store per register, at an immediate offset from
  this thread's first element (element 128 i + thread sits 256 i bytes past it)."""

  def element(k, flag, i):
    del flag  # every column of the row is stored
    return f"st.shared.b16 [$0+{2 * LANES * i}], {k};"

  @plgpu.inline_mgpu(arg_types=(row_layout, plgpu.RefType()))
  def stash(ctx, bits, row_ref):
    del ctx
    i16 = ir.IntegerType.get_signless(16)
    base = mgpu_utils.getelementptr(mgpu_utils.memref_ptr(row_ref), [_thread()[0]], i16)
    _blocks(_keys(bits, f), [base], element, "")

  return stash


# Per 32-bit word: its set bits; its lowest m set bits (fns: the position p of the m-th set bit
# from bit 0, 0xffffffff if there are fewer; 2 << p - 1 keeps bits 0…p, and a shift clamped at
# 32 keeps them all; m < 1 keeps none).
POPC = "popc.b32 $0, $1;"
KEEP_LOWEST = (
  "{ .reg .pred z; .reg .b32 p, t; setp.lt.s32 z, $2, 1; fns.b32 p, $1, 0, $2; mov.b32 t, 2;"
  " shl.b32 t, t, p; sub.s32 t, t, 1; and.b32 $0, $1, t; @z mov.b32 $0, 0; }"
)


def map_bins(bin_layout, text: str, arity: int):
  """An elementwise int32 op over bins arrays: `text` with $0 the result, $1… the inputs."""

  @plgpu.inline_mgpu(
    arg_types=(bin_layout,) * arity,
    return_type=plgpu.ShapeDtypeStruct((BINS,), I32, layout=bin_layout),
  )
  def op(ctx, *arrays):
    del ctx
    out = np.empty_like(arrays[0].registers)
    constraints = ",".join(["=r"] + ["r"] * arity)
    for pos, vec in np.ndenumerate(arrays[0].registers):
      for j in range(ir.VectorType(vec.type).shape[0]):
        ins = [llvm.extractelement(a.registers[pos], _c(j)) for a in arrays]
        vec = llvm.insertelement(vec, _asm(text, ins, constraints, True), _c(j))
      out[pos] = vec
    return mgpu.FragmentedArray(_registers=out, _layout=arrays[0].layout, _is_signed=True)

  return op


def prefetch_share(num_bytes: tuple[int, ...], chunks: tuple[int, ...], first_cta: int):
  """Warming CTA j = ctaid - first_cta asks L2 for bytes [j c, min(B, (j + 1) c)) of each
  weight (B, c: num_bytes, chunks; multiples of 16), one `cp.async.bulk.prefetch` each,
  evict-last, issued by thread 0. Many CTAs, one chunk each: CTA 0 issuing all of a 16 MB
  warming through its one TMA unit made the select wait 66 µs (NOTES_decode 2026-12-05d).
  Arguments: the weights' refs."""

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * len(num_bytes))
  def prefetch(ctx, *refs):
    del ctx
    lines = [
      "{ .reg .pred p, z; .reg .b64 g, a, pol; .reg .b32 j, lo, sz, t;",
      "mov.u32 t, %tid.x; setp.eq.u32 z, t, 0;",
      f"mov.u32 j, %ctaid.x; sub.u32 j, j, {first_cta};",
      "createpolicy.fractional.L2::evict_last.b64 pol, 1.0;",
    ]
    for i, (total, chunk) in enumerate(zip(num_bytes, chunks, strict=True)):
      lines += [
        f"cvta.to.global.u64 g, ${i}; mul.lo.u32 lo, j, {chunk};",
        f"setp.lt.u32 p, lo, {total}; and.pred p, p, z;",
        f"sub.u32 sz, {total}, lo; min.u32 sz, sz, {chunk};",
        "cvt.u64.u32 a, lo; add.u64 a, a, g;",
        "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [a], sz, pol;",
      ]
    lines.append("}")
    ptrs = [mgpu_utils.memref_ptr(r) for r in refs]
    _asm("\n".join(lines), ptrs, ",".join(["l"] * len(ptrs)))

  return prefetch


@plgpu.inline_mgpu()
def barrier(ctx):
  del ctx
  mgpu_utils.warpgroup_barrier()
