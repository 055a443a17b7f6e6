"""What the row-streaming Mosaic GPU epilogues share (`mgpu_apply`, the train forward's pass;
`mgpu_backward`, the backward's): the per-row loop over the selection's words, its PTX ops,
and silu / sigmoid as the Triton epilogues compile them.

Per CTA (one warpgroup), rows in turn: the next row's inputs arrive by bulk async copy into
the other half of a two-row buffer (the kernel's `fetch`) and its words by plain loads issued
a row ahead; per row, each word's first slot (a prefix of the popcounts), the output rows
zeroed in shared memory, then every thread walks ceil(K / 128) selected keys
(`_mgpu_compact.compact_balanced` with the kernel's `key`), the rows out by TMA.
"""

from __future__ import annotations

import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir.dialects import arith, llvm
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils

from pallas_kernels import _mgpu_compact
from pallas_kernels import _mgpu_ptx as ptx
from pallas_kernels import _triton_utils as tu
from pallas_kernels._mgpu_ops import SelectOps, rows_in_turn, slots_in_jnp
from pallas_kernels._mgpu_ptx import BINS, I32, LANES, _c, _i32, _thread

DTYPES = (jnp.bfloat16, jnp.float16)
SMEM_PER_SM = 227 * 1024  # what an H100 / H200 SM gives its CTAs
MAX_CTAS_PER_SM = 8
# Registers a `key` may use: 16-bit values (g, u, z, dz and two results), fp32 temporaries.
KEY_DECLS = ".reg .pred q; .reg .b16 gh, uh, zh, dh, xh, yh; .reg .b32 fx, fy, fd, fn, ft, fh, fs;"


def _kind(dtype) -> str:
  return "bf16" if jnp.dtype(dtype) == jnp.bfloat16 else "f16"


def sigmoid_ptx(dtype) -> str:
  """fx = g (gh in fp32), fs = sigmoid(g): Triton 3.6's PTX for `jax.nn.sigmoid` in the
  epilogues (0 - g, libdevice expf's range reduction around ex2.approx.ftz, 1 + e, then
  div.full), read from `benchmarks/sass_report.py`'s lowering of them for sm_90."""
  return (
    f"cvt.f32.{_kind(dtype)} fx, gh; sub.f32 fn, 0f00000000, fx;\n"
    "fma.rn.ftz.f32 ft, fn, 0f3BBB989D, 0f3F000000; cvt.ftz.sat.f32.f32 ft, ft;\n"
    "fma.rm.ftz.f32 ft, ft, 0f437C0000, 0f4B400001; add.f32 fh, ft, 0fCB40007F; neg.f32 fh, fh;\n"
    "fma.rn.ftz.f32 fh, fn, 0f3FB8AA3B, fh; fma.rn.ftz.f32 fh, fn, 0f32A57060, fh;\n"
    "shl.b32 ft, ft, 23; ex2.approx.ftz.f32 fh, fh; fma.rn.f32 fh, fh, ft, 0f3F800000;\n"
    "div.full.f32 fs, 0f3F800000, fh;"
  )


def silu_mul_ptx(dtype) -> str:
  """zh = (sigmoid(g)·g)·u in fp32, rounded once: `moc_train_mask.silu_mul` as Triton
  compiles it (after `sigmoid_ptx`; fy = u)."""
  kind = _kind(dtype)
  return (
    f"{sigmoid_ptx(dtype)}\nmul.f32 fh, fs, fx; cvt.f32.{kind} fy, uh; mul.f32 fh, fh, fy;"
    f" cvt.rn.{kind}.f32 zh, fh;"
  )


def check(what: str, f: int, k: int, dtype, k_multiple: int = 8) -> None:
  """Raises on rows the streaming kernels cannot take."""
  if jnp.dtype(dtype) not in DTYPES:
    raise ValueError(f"the Mosaic GPU {what} takes bf16 or f16 values, got {dtype}")
  if f % LANES or f // 32 > BINS or not 0 < k <= f or k % k_multiple:
    raise ValueError(
      f"the Mosaic GPU {what} needs F % {LANES} == 0, F <= {32 * BINS} and "
      f"0 < K <= F, K % {k_multiple} == 0; got F={f}, K={k}"
    )


def usable(dtype, f: int, k: int, k_multiple: int, interpret: bool) -> bool:
  """Whether an 'auto' mode takes a streaming kernel: where the Mosaic select could run
  (`mgpu_select.usable`: compiled on a Hopper-or-newer GPU, F % 128 == 0, F <= 8192, 16-bit,
  no MOC_SELECTION=triton) and K fits its copies."""
  from pallas_kernels import mgpu_select

  return mgpu_select.usable(dtype, f, interpret) and 0 < k <= f and k % k_multiple == 0


def ctas_for(t: int, per_cta_bytes: int, interpret: bool, ctas: int | None) -> int:
  """CTAs for T rows: `ctas` if given, else as many an SM as its shared memory holds (at most
  MAX_CTAS_PER_SM: one round, all resident), 1 in interpret mode; at most T."""
  if interpret:
    return 1
  per_sm = max(1, min(MAX_CTAS_PER_SM, SMEM_PER_SM // (per_cta_bytes + 1024)))
  return min(t, ctas or per_sm * tu.sm_count())


SMEM_ALIGNMENT = 1024  # Pallas Mosaic GPU starts every scratch buffer on a 1 KB boundary


def smem(*buffer_bytes: int) -> int:
  """A CTA's shared memory for scratch buffers of these sizes, each aligned as Pallas lays
  them out, plus the two-slot barrier's."""
  return sum(-(-b // SMEM_ALIGNMENT) * SMEM_ALIGNMENT for b in (*buffer_bytes, 16))


STREAM_SMEM = (2 * BINS * 4, BINS * 4, 32 * 4)  # `RowStream.scratch`'s buffers


def _zero_fill(num_bytes: int):
  """ref[:num_bytes] = 0, 16 bytes a store, thread t the chunks t, t + 128, …"""
  chunks = num_bytes // 16

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
  def fill(ctx, ref):
    del ctx
    thread = _thread()[0]
    at = mgpu_utils.getelementptr(mgpu_utils.memref_ptr(ref), [arith.muli(thread, _c(4))], _i32())
    lines = ["{ .reg .pred p; .reg .b32 z; mov.b32 z, 0;"]
    for i in range(-(-chunks // LANES)):
      store = f"st.shared.v4.b32 [$0+{16 * LANES * i}], {{z, z, z, z}};"
      if LANES * (i + 1) <= chunks:
        lines.append(store)
      else:
        lines.append(f"setp.lt.u32 p, $1, {chunks - LANES * i}; @p {store}")
    lines.append("}")
    ptx._asm("\n".join(lines), [at, thread], "r,r")

  return fill


def _with_pair(like, words):
  """A bins array like `like` whose thread's two values are `words`."""
  vec = like.registers.flat[0]
  for j, word in enumerate(words):
    vec = llvm.insertelement(vec, word, _c(j))
  regs = like.registers.copy()
  regs.flat[0] = vec
  return mgpu.FragmentedArray(_registers=regs, _layout=like.layout, _is_signed=True)


def _load_words(bin_layout, nw: int, t: int):
  """Row min(r, T - 1) of the (T, nw) int32 words in HBM as a bins array (thread t: words
  2t, 2t + 1; 0 past the row). Arguments: the words' ref, r as a bins array of one value."""

  @plgpu.inline_mgpu(
    arg_types=(plgpu.RefType(), bin_layout),
    return_type=plgpu.ShapeDtypeStruct((BINS,), I32, layout=bin_layout),
  )
  def load(ctx, words_ref, r_array):
    del ctx
    row = arith.minsi(ptx._scalar(r_array), _c(t - 1))
    pair = arith.muli(_thread()[0], _c(2))
    words = []
    for j in (0, 1):  # word 2t + j of the row, at byte 4 (r nw + 2t + j) of $1
      text = (
        "{ .reg .pred p; .reg .b64 g, o; .reg .b32 i; mov.b32 $0, 0; cvta.to.global.u64 g, $1;"
        f" mad.lo.u32 i, $2, {nw}, $3; mul.wide.u32 o, i, 4; add.u64 g, g, o;"
        f" setp.lt.u32 p, $3, {nw}; @p ld.global.u32 $0, [g+{4 * j}]; }}"
      )
      words.append(ptx._asm(text, [mgpu_utils.memref_ptr(words_ref), row, pair], "=r,l,r,r", True))
    return _with_pair(r_array, words)

  return load


def _pair_ptr(ref):
  """This thread's pair [2t, 2t + 1] of a shared 256-word ref."""
  base = mgpu_utils.memref_ptr(ref)
  return mgpu_utils.getelementptr(base, [arith.muli(_thread()[0], _c(2))], _i32())


def _put_pair(bin_layout):
  @plgpu.inline_mgpu(arg_types=(bin_layout, plgpu.RefType()))
  def put(ctx, x, ref):
    del ctx
    a, b = (llvm.extractelement(x.registers.flat[0], _c(j)) for j in (0, 1))
    ptx._asm("st.shared.v2.b32 [$0], {$1, $2};", [_pair_ptr(ref), a, b], "r,r,r")

  return put


def _get_pair(bin_layout):
  @plgpu.inline_mgpu(
    arg_types=(plgpu.RefType(), bin_layout),
    return_type=plgpu.ShapeDtypeStruct((BINS,), I32, layout=bin_layout),
  )
  def get(ctx, ref, like):
    del ctx
    at = _pair_ptr(ref)
    words = [ptx._asm(f"ld.shared.u32 $0, [$1+{4 * j}];", [at], "=r,r", True) for j in (0, 1)]
    return _with_pair(like, words)

  return get


def fill_and_walk(layout, k: int, key: str, refs: int, fill_bytes: int):
  """op(first, words_ref, first_ref, fill_ref, *walk_refs): fill_ref's first fill_bytes zeroed,
  then every thread walks ceil(K / 128) selected keys doing `key` on the `refs` walk refs
  (`_mgpu_compact.compact_balanced`; first: each word's first slot, a bins array)."""
  walk = _mgpu_compact.compact_balanced(layout, k, key, KEY_DECLS, refs=refs)
  fill = _zero_fill(fill_bytes)

  def op(first, words_ref, first_ref, fill_ref, *walk_refs) -> None:
    fill(fill_ref)
    walk(first, words_ref, first_ref, *walk_refs)

  return op


class RowStream:
  """The per-row loop of a streaming epilogue over (T, F/32) words with K set bits a row.

  `key` is the walk's PTX per selected key (`balanced_loop`; channel c, slot s) over `refs`
  shared refs; `fill_bytes` of the fill ref are zeroed before each row's walk. In interpret
  mode the ops are jnp and the kernel's `row_in_jnp` does the fill and walk of a row."""

  def __init__(self, t, f, k, ctas, interpret: bool, key: str, refs: int, fill_bytes: int):
    self.t, self.nw, self.ctas, self.interpret = t, f // 32, ctas, interpret
    self.ops = SelectOps(f, k, f, interpret)  # the select's scans, copies and waits
    self.layout = self.ops.bin_layout
    if interpret:
      return
    self._fill_walk = fill_and_walk(self.layout, k, key, refs, fill_bytes)
    self._load = _load_words(self.layout, self.nw, t)
    self._get, self._put = _get_pair(self.layout), _put_pair(self.layout)

  def copy_in(self, src_ref, dst_ref, arrived, slot) -> None:
    """dst = src (a contiguous row or part of one) by bulk async copy, arrival on
    arrived[slot]; `arrived(copies)` counts one arrival per copy into a slot."""
    if self.interpret:
      dst_ref[...] = src_ref[...]
      return
    kw = dict(oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)  # contiguous: one cp.async.bulk
    plgpu.copy_gmem_to_smem(src_ref, dst_ref, arrived.at[slot], **kw)

  def arrived(self, copies: int):
    """The two slots' arrival barriers, `copies` bulk copies into a slot (a stand-in in
    interpret mode, which copies at once)."""
    if self.interpret:
      return plgpu.SMEM((2,), I32)
    return plgpu.Barrier(num_arrivals=copies, num_barriers=2)

  def kernel(self, body, out_type, scratch: list, name: str):
    """The kernel: `body` on one CTA a grid step, the kernel's scratch then the loop's."""
    return plgpu.kernel(
      ptx.named(body, name),
      out_type=tuple(out_type),
      grid=(self.ctas,),
      grid_names=("cta",),
      scratch_types=[*scratch, *self.scratch()],
      interpret=self.interpret,
    )

  def scratch(self) -> list:
    """The loop's shared memory, after the kernel's own: two rows of words (0 past the row),
    each word's first slot (the walk's search), the prefix's warp totals."""
    return [plgpu.SMEM((2, BINS), I32), plgpu.SMEM((BINS,), I32), plgpu.SMEM((32,), I32)]

  def _words_of(self, words_gmem, r):
    """Row min(r, T - 1)'s words as a bins array: loads, not yet waited for."""
    if self.interpret:
      row = words_gmem[jnp.minimum(r, self.t - 1)]
      return jnp.zeros((BINS,), I32).at[: self.nw].set(row)
    return self._load(words_gmem, self.ops.splat(r))

  def _put_words(self, x, words_ref, slot) -> None:
    if self.interpret:
      words_ref[slot] = x
    else:
      self._put(x, words_ref.at[slot])

  def run(self, words_gmem, scratch, *, fetch, arrived, fill_ref, walk_refs, row_in_jnp, copies):
    """Every row of this CTA: fetch(r, slot) starts row r's bulk copies into `slot` (arrival
    on arrived[slot]); walk_refs(slot) are the walk's refs; row_in_jnp(r, slot, words) is the
    fill and walk in interpret mode; copies: (shared ref, HBM ref) pairs, row r out."""
    words_ref, first_ref, tmp_ref = scratch
    interpret, t, ctas, ops = self.interpret, self.t, self.ctas, self.ops

    def finish(r, slot, words) -> None:
      if interpret:
        row_in_jnp(r, slot, words)
      else:
        ops.wait_read()  # the last row's copies have read
        first = ops.exclusive_prefix(ops.popcount(words), tmp_ref, 0)  # (a barrier: all know)
        self._fill_walk(first, words_ref.at[slot], first_ref, fill_ref, *walk_refs(slot))
      ops.commit()  # visible to the TMA engine, every thread done (a barrier)
      for src, dst in copies:
        ops.copy_out(src, dst.at[r])

    def one_row(r, i) -> None:
      slot = i % 2
      nxt = r + ctas
      pl.when(nxt < t)(lambda: fetch(nxt, 1 - slot))
      ahead = self._words_of(words_gmem, nxt)  # in flight while this row is worked on
      ops.wait_row(arrived, slot)
      words = words_ref[slot] if interpret else self._get(words_ref.at[slot], self.ops.splat(0))
      finish(r, slot, words)
      self._put_words(ahead, words_ref, 1 - slot)  # its last reader was the last row's walk

    pid = 0 if interpret else lax.axis_index("cta")
    fetch(pid, 0)  # ctas <= T: every CTA has a first row
    self._put_words(self._words_of(words_gmem, pid), words_ref, 0)  # read back by its thread
    rows_in_turn(t, ctas, pid, one_row)
    ops.wait()


def words_in_jnp(words, f: int, k: int):
  """(channels, each selected, its slot or K): what a row's walk finds, as jnp (interpret)."""
  counts = lax.population_count(words)
  return slots_in_jnp(words, jnp.cumsum(counts) - counts, f, k)
