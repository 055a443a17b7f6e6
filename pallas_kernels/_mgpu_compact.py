"""PTX builders for the whole Mosaic GPU top-K's compaction (`mgpu_select.kernel(compact=True)`):
each selected channel and its value to its slot while the row is still in shared memory.

Two walks over the row's final words: `compact`, each thread the set bits of its own two
words; `compact_balanced`, each thread the same number of selected keys, found by a search
over the words' first slots. The helpers and the lane layout are `_mgpu_ptx`'s.
"""

from __future__ import annotations

import jax.experimental.pallas.mosaic_gpu as plgpu
from jax._src.lib.mlir.dialects import arith, llvm
from jax.experimental.mosaic.gpu import utils as mgpu_utils

from pallas_kernels import _mgpu_ptx as ptx  # ptx._asm looked up per call (tests record it)
from pallas_kernels._mgpu_ptx import LANES, _c, _i32, _thread


def compact_loop() -> str:
  """Thread t's two words of the row's bitmask (2t, 2t + 1) as one 64-bit mask m, walked
  lowest bit first: its channel c = 64 t + the bit's position (brev, then the shift that
  brings the top bit up); out[s] = row[c] (the stashed value) and idx[s] = c; then s += 1 and
  the bit cleared. Work per selected key, not per key, and no step waits on another thread.
  Operands: $0, $1 the words, $2 the first slot, $3 64 t, then the shared addresses of the
  stashed row, of out and of idx. PTX labels are local to their { } block."""
  body = (
    "mad.lo.u32 a, c, 2, $4; ld.shared.u16 v, [a]; mad.lo.u32 a, s, 2, $5; st.shared.b16 [a], v;"
    "\nmad.lo.u32 a, s, 4, $6; st.shared.b32 [a], c;"
  )
  return (
    "{\n.reg .pred p; .reg .b64 m, x; .reg .b32 s, b, c, a, v;\n"
    "mov.b64 m, {$0, $1}; mov.b32 s, $2;\n"
    "COMPACT_NEXT:\nsetp.eq.b64 p, m, 0;\n@p bra COMPACT_DONE;\n"
    "brev.b64 x, m; bfind.shiftamt.u64 b, x; add.u32 c, $3, b;\n"
    f"{body}\n"
    "add.u32 s, s, 1; sub.u64 x, m, 1; and.b64 m, m, x;\nbra COMPACT_NEXT;\n"
    "COMPACT_DONE:\n}"
  )


def compact(bin_layout):
  """Each selected channel's stashed value and the channel to its slot, from the row's final
  words and each word's first slot (bins-layout arrays: thread t holds words 2t and 2t + 1):
  `compact_loop` per thread. Arguments: words, first, then the refs of the stashed row, of
  the values out and of the channels out."""
  refs = (plgpu.RefType(),) * 3

  @plgpu.inline_mgpu(arg_types=(bin_layout, bin_layout, *refs))
  def compact(ctx, words, first, *refs):
    del ctx
    w0, w1 = (llvm.extractelement(words.registers.flat[0], _c(j)) for j in (0, 1))
    s0 = llvm.extractelement(first.registers.flat[0], _c(0))
    ch0 = arith.muli(_thread()[0], _c(64))
    operands = [w0, w1, s0, ch0, *(mgpu_utils.memref_ptr(r) for r in refs)]
    ptx._asm(compact_loop(), operands, ",".join(["r"] * len(operands)))

  return compact


# `balanced_loop`'s work per selected key for the top-K: its value from the stashed row ($4) to
# slot s of the values out ($5), its channel c to slot s of the channels out ($6).
TOPK_KEY = (
  "mad.lo.u32 a, c, 2, $4; ld.shared.u16 v, [a]; mad.lo.u32 a, s, 2, $5; st.shared.b16 [a], v;\n"
  "mad.lo.u32 a, s, 4, $6; st.shared.b32 [a], c;"
)


def balanced_loop(key: str = TOPK_KEY, decls: str = "") -> str:
  """The compaction with every thread walking the same number of selected keys: thread t
  takes slots s0 = $0 … s0 + $1 - 1. It finds the word holding slot s0 (the largest w with
  first[w] <= s0, 8 steps over the 256 words' first slots at $3), drops that word's set bits
  below the slot (fns: the position of the j-th set bit), then walks set bits (and words,
  loading the next at $2 when one runs out) as `compact_loop` does. A thread's own 64
  channels hold ~12 selected keys but the busiest of 128 ~20, and a warp runs as long as its
  busiest lane. Operands: $0 s0, $1 the count, $2 the words, $3 the first slots (shared
  addresses), then `key`'s ($4 on: for the top-K the stashed row, out and idx). `key` is the
  PTX for one selected key, channel c going to slot s (registers a and v are free there);
  `decls` declares the registers of its own."""
  search = "".join(
    f"add.u32 y, w, {step}; mad.lo.u32 a, y, 4, $3; ld.shared.u32 v, [a];"
    " setp.le.u32 p, v, $0; @p mov.b32 w, y;\n"
    for step in (128, 64, 32, 16, 8, 4, 2, 1)
  )
  return (
    f"{{\n.reg .pred p; .reg .b32 w, y, a, v, m, j, b, e, c, s, n; {decls}\n"
    f"mov.b32 w, 0;\n{search}"
    "mad.lo.u32 a, w, 4, $3; ld.shared.u32 v, [a]; mad.lo.u32 a, w, 4, $2; ld.shared.u32 m, [a];\n"
    "sub.u32 j, $0, v; setp.ne.u32 p, j, 0; @p fns.b32 b, m, 0, j; @p mov.b32 e, 2;\n"
    "@p shl.b32 e, e, b; @p sub.u32 e, e, 1; @p not.b32 e, e; @p and.b32 m, m, e;\n"
    "mov.b32 s, $0; mov.b32 n, $1; setp.eq.u32 p, n, 0; @p bra BALANCED_DONE;\n"
    "BALANCED_NEXT:\nsetp.ne.u32 p, m, 0; @p bra BALANCED_HAVE;\n"
    "add.u32 w, w, 1; mad.lo.u32 a, w, 4, $2; ld.shared.u32 m, [a]; bra BALANCED_NEXT;\n"
    "BALANCED_HAVE:\nbrev.b32 e, m; bfind.shiftamt.u32 b, e; mad.lo.u32 c, w, 32, b;\n"
    f"{key}\n"
    "add.u32 s, s, 1; sub.u32 e, m, 1; and.b32 m, m, e; sub.u32 n, n, 1;\n"
    "setp.ne.u32 p, n, 0; @p bra BALANCED_NEXT;\nBALANCED_DONE:\n}"
  )


def compact_balanced(bin_layout, k: int, key: str = TOPK_KEY, decls: str = "", refs: int = 3):
  """`compact` by `balanced_loop(key, decls)`: each thread's two first slots go to
  `first_ref` (words past the row have first slot K), a barrier, then every thread walks
  ceil(K / 128) slots. Arguments: first, then the refs of the row's words, of first's
  scratch (256 int32), then `refs` refs for `key` (the top-K's: the stashed row, the values
  out and the channels out)."""
  per_thread = -(-k // LANES)

  @plgpu.inline_mgpu(arg_types=(bin_layout, *(plgpu.RefType(),) * (2 + refs)))
  def compact(ctx, first, words_ref, first_ref, *refs):
    del ctx
    f0, f1 = (llvm.extractelement(first.registers.flat[0], _c(j)) for j in (0, 1))
    thread = _thread()[0]
    ptr = mgpu_utils.memref_ptr
    pair = mgpu_utils.getelementptr(ptr(first_ref), [arith.muli(thread, _c(2))], _i32())
    ptx._asm("st.shared.v2.b32 [$0], {$1, $2};", [pair, f0, f1], "r,r,r")
    mgpu_utils.warpgroup_barrier()
    s0 = arith.muli(thread, _c(per_thread))
    left = arith.maxsi(arith.subi(_c(k), s0), _c(0))
    n = arith.minsi(left, _c(per_thread))
    operands = [s0, n, ptr(words_ref), ptr(first_ref), *(ptr(r) for r in refs)]
    ptx._asm(balanced_loop(key, decls), operands, ",".join(["r"] * len(operands)))

  return compact
