"""The train forward's streaming pass as a Mosaic GPU kernel: from the selection's words and
(G, U) to the zero-filled Z and the compact G_sel, U_sel (and Z_sel, the channels).

Why: the Triton pass (`_apply_gather`) took ~290 µs at the 1B layer shape on an H200, where
its bytes (G and U read, Z and the compact rows written) need ~165 at copy bandwidth, and at
the 60m shape it is launch- and occupancy-bound (~90-100 µs against XLA's 51 for silu(G)·U).
With the selection it is where MoC's forward loses to dense's (NOTES_kernels 2026-12-05e).

One warpgroup per CTA, rows taken in turn by the CTAs. Each CTA's next row of G and U (one
[G | U] row in shared memory) arrives by bulk async copy while it works on the current one,
and the next row's words by plain loads issued a row ahead. Per row:
  1. each word's first slot, an exclusive prefix of the words' popcounts;
  2. Z's row zeroed in shared memory;
  3. every thread takes ceil(K / 128) slots (`_mgpu_compact.compact_balanced`'s search and
     walk): for the key at channel c and slot s it reads g, u from the row, computes
     z = silu(g)·u, and stores z at Z[c] and g, u (z, c) at slot s;
  4. the row's Z and the K-long rows out by TMA.
Only the K selected keys are computed (1 in 5 channels at the 1B shape), not every channel.
Silu is the PTX that Triton 3.6 compiles `moc_train_mask.silu_mul` to for sm_90 (libdevice's
expf range reduction around ex2.approx, a full-range divide, then ·g and ·u in fp32, one
rounding; read with `benchmarks/sass_report.py`'s lowering), so Z should equal the Triton
epilogues' bit for bit; the GPU test checks it against the gathered pass.

Built 2026-12-05n without a GPU: interpret mode (the jnp form of each op) and the PTX's
assembly are checked here, nothing is timed yet. Opt-in as `TopKConfig.apply_mode='mgpu'`.
"""

from __future__ import annotations

import jax
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
from pallas_kernels._mgpu_ops import rows_in_turn
from pallas_kernels._mgpu_ptx import BINS, I32, LANES, _c, _i32, _thread

DTYPES = (jnp.bfloat16, jnp.float16)
SMEM_PER_SM = 227 * 1024  # what an H100 / H200 SM gives its CTAs
MAX_CTAS_PER_SM = 8


def silu_mul_ptx(dtype) -> str:
  """zh = silu(gh)·uh in fp32, rounded once to dtype: Triton's PTX for `silu_mul` (0 - g,
  expf's range reduction and ex2.approx.ftz, 1 + e, div.full, ·g, ·u). Registers: gh, uh, zh
  (16-bit), fx, fy, fn, ft, fh (32-bit)."""
  kind = "bf16" if jnp.dtype(dtype) == jnp.bfloat16 else "f16"
  return (
    f"cvt.f32.{kind} fx, gh; sub.f32 fn, 0f00000000, fx;\n"
    "fma.rn.ftz.f32 ft, fn, 0f3BBB989D, 0f3F000000; cvt.ftz.sat.f32.f32 ft, ft;\n"
    "fma.rm.ftz.f32 ft, ft, 0f437C0000, 0f4B400001; add.f32 fh, ft, 0fCB40007F; neg.f32 fh, fh;\n"
    "fma.rn.ftz.f32 fh, fn, 0f3FB8AA3B, fh; fma.rn.ftz.f32 fh, fn, 0f32A57060, fh;\n"
    "shl.b32 ft, ft, 23; ex2.approx.ftz.f32 fh, fh; fma.rn.f32 fh, fh, ft, 0f3F800000;\n"
    "div.full.f32 fh, 0f3F800000, fh; mul.f32 fh, fh, fx;\n"
    f"cvt.f32.{kind} fy, uh; mul.f32 fh, fh, fy; cvt.rn.{kind}.f32 zh, fh;"
  )


KEY_DECLS = ".reg .pred q; .reg .b16 gh, uh, zh; .reg .b32 fx, fy, fn, ft, fh;"


def forward_key(f: int, dtype, z_sel: bool, idx_bytes: int, num_valid: int | None = None) -> str:
  """`balanced_loop`'s work per selected key (channel c, slot s): g, u from the [G | U] row
  ($4; U 2F bytes on), z = silu(g)·u to Z's row ($5) at c, g, u to G_sel, U_sel ($6, $7) at
  s, then z to Z_sel and c to the channels (the next operands) where asked. Channels from
  num_valid on take G as the selection saw it, the lowest finite value (`as_selected`: 2:8
  can select whole padding groups)."""
  low = "0xFF7F" if jnp.dtype(dtype) == jnp.bfloat16 else "0xFBFF"
  pad = "" if num_valid is None else f" setp.ge.u32 q, c, {num_valid}; @q mov.b16 gh, {low};"
  text = (
    f"mad.lo.u32 a, c, 2, $4; ld.shared.b16 gh, [a]; ld.shared.b16 uh, [a+{2 * f}];{pad}\n"
    f"{silu_mul_ptx(dtype)}\n"
    "mad.lo.u32 a, c, 2, $5; st.shared.b16 [a], zh;\n"
    "mad.lo.u32 a, s, 2, $6; st.shared.b16 [a], gh; mad.lo.u32 a, s, 2, $7; st.shared.b16 [a], uh;"
  )
  n = 8
  if z_sel:
    text += f"\nmad.lo.u32 a, s, 2, ${n}; st.shared.b16 [a], zh;"
    n += 1
  if idx_bytes:
    text += f"\nmad.lo.u32 a, s, {idx_bytes}, ${n}; st.shared.b{8 * idx_bytes} [a], c;"
  return text


def _zero_fill(num_bytes: int):
  """ref[:num_bytes] = 0, 16 bytes a store, thread t the chunks t, t + 128, …"""
  chunks = num_bytes // 16

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
  def fill(ctx, ref):
    del ctx
    thread = _thread()[0]
    base = mgpu_utils.getelementptr(mgpu_utils.memref_ptr(ref), [arith.muli(thread, _c(4))], _i32())
    lines = ["{ .reg .pred p; .reg .b32 z; mov.b32 z, 0;"]
    for i in range(-(-chunks // LANES)):
      store = f"st.shared.v4.b32 [$0+{16 * LANES * i}], {{z, z, z, z}};"
      if LANES * (i + 1) <= chunks:
        lines.append(store)
      else:
        lines.append(f"setp.lt.u32 p, $1, {chunks - LANES * i}; @p {store}")
    lines.append("}")
    ptx._asm("\n".join(lines), [base, thread], "r,r")

  return fill


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
    vec = r_array.registers.flat[0]
    for j in (0, 1):  # word 2t + j of the row, at byte 4 (r nw + 2t + j) of $1
      text = (
        "{ .reg .pred p; .reg .b64 g, o; .reg .b32 i; mov.b32 $0, 0; cvta.to.global.u64 g, $1;"
        f" mad.lo.u32 i, $2, {nw}, $3; mul.wide.u32 o, i, 4; add.u64 g, g, o;"
        f" setp.lt.u32 p, $3, {nw}; @p ld.global.u32 $0, [g+{4 * j}]; }}"
      )
      word = ptx._asm(text, [mgpu_utils.memref_ptr(words_ref), row, pair], "=r,l,r,r", True)
      vec = llvm.insertelement(vec, word, _c(j))
    regs = r_array.registers.copy()
    regs.flat[0] = vec
    return mgpu.FragmentedArray(_registers=regs, _layout=r_array.layout, _is_signed=True)

  return load


def _pairs(bin_layout, store: bool):
  """Thread t's two int32 at [2t, 2t + 1] of a shared 256-word ref: loaded as a bins array,
  or (store) a bins array stored there."""
  if store:

    @plgpu.inline_mgpu(arg_types=(bin_layout, plgpu.RefType()))
    def put(ctx, x, ref):
      del ctx
      a, b = (llvm.extractelement(x.registers.flat[0], _c(j)) for j in (0, 1))
      at = mgpu_utils.getelementptr(
        mgpu_utils.memref_ptr(ref), [arith.muli(_thread()[0], _c(2))], _i32()
      )
      ptx._asm("st.shared.v2.b32 [$0], {$1, $2};", [at, a, b], "r,r,r")

    return put

  @plgpu.inline_mgpu(
    arg_types=(plgpu.RefType(), bin_layout),
    return_type=plgpu.ShapeDtypeStruct((BINS,), I32, layout=bin_layout),
  )
  def get(ctx, ref, like):
    del ctx
    at = mgpu_utils.getelementptr(
      mgpu_utils.memref_ptr(ref), [arith.muli(_thread()[0], _c(2))], _i32()
    )
    vec = like.registers.flat[0]
    for j in (0, 1):
      text = f"ld.shared.u32 $0, [$1+{4 * j}];"
      vec = llvm.insertelement(vec, ptx._asm(text, [at], "=r,r", True), _c(j))
    regs = like.registers.copy()
    regs.flat[0] = vec
    return mgpu.FragmentedArray(_registers=regs, _layout=like.layout, _is_signed=True)

  return get


def smem_bytes(f: int, k: int, z_sel: bool, idx_bytes: int, dtype=jnp.bfloat16) -> int:
  """A CTA's shared memory: two [G | U] rows, two rows of words, Z's row, the K-long rows,
  the first slots and the scan's scratch (plus alignment slack)."""
  e = jnp.dtype(dtype).itemsize
  return 4 * f * e + 2 * BINS * 4 + f * e + k * ((2 + z_sel) * e + idx_bytes) + BINS * 4 + 512


def _ctas(t: int, per_cta_bytes: int, interpret: bool, ctas: int | None) -> int:
  """CTAs for T rows: `ctas` if given, else as many an SM as its shared memory holds (at most
  MAX_CTAS_PER_SM: one round, all resident), 1 in interpret mode; at most T."""
  if interpret:
    return 1
  per_sm = max(1, min(MAX_CTAS_PER_SM, SMEM_PER_SM // (per_cta_bytes + 1024)))
  return min(t, ctas or per_sm * tu.sm_count())


def check(f: int, k: int, dtype, idx_dtype=None) -> None:
  """Raises on what the kernel cannot take."""
  if jnp.dtype(dtype) not in DTYPES:
    raise ValueError(f"the Mosaic GPU forward pass takes bf16 or f16 G and U, got {dtype}")
  if f % LANES or f // 32 > BINS or not 0 < k <= f or k % 8:
    raise ValueError(
      f"the Mosaic GPU forward pass needs F % {LANES} == 0, F <= {32 * BINS} and "
      f"0 < K <= F, K % 8 == 0; got F={f}, K={k}"
    )
  if idx_dtype is not None and jnp.dtype(idx_dtype) not in (jnp.int16, jnp.int32):
    raise ValueError(f"the channels out are int16 or int32, got {idx_dtype}")


def kernel(
  t: int,
  f: int,
  k: int,
  ctas: int,
  dtype,
  *,
  fused: bool,
  idx_dtype=None,
  z_sel: bool = False,
  num_valid: int | None = None,
  interpret: bool = False,
):
  """(T, F/32) int32 words with K set bits a row, and the (T, 2F) [G | U] buffer (fused) or
  (T, F) G and U, to ([idx,] g_sel, u_sel, z[, z_sel]) as `moc_train_mask.apply_call` gives
  them: Z (T, F) zero off the selection, the others (T, K) in channel order."""
  check(f, k, dtype, idx_dtype)
  if not 0 < ctas <= t or (interpret and ctas != 1):
    raise ValueError(f"need 0 < ctas <= T (1 in interpret mode), got {ctas} for T={t}")
  nw = f // 32
  idx_bytes = 0 if idx_dtype is None else jnp.dtype(idx_dtype).itemsize
  bin_layout = plgpu.Layout.WG_STRIDED((BINS,), vec_size=2)
  n_compact = 2 + z_sel + bool(idx_bytes)  # g_sel, u_sel[, z_sel][, idx]: the key's order
  if not interpret:
    key = forward_key(f, dtype, z_sel, idx_bytes, num_valid)
    walk = _mgpu_compact.compact_balanced(bin_layout, k, key, KEY_DECLS, refs=2 + n_compact)
    fill, load_words = _zero_fill(f * jnp.dtype(dtype).itemsize), _load_words(bin_layout, nw, t)
    get_pair, put_pair = _pairs(bin_layout, store=False), _pairs(bin_layout, store=True)
    popcount = ptx.map_bins(bin_layout, ptx.POPC, 1)
    prefix = ptx.exclusive_prefix(bin_layout, 0)
  splat = lambda x: (
    jnp.full((BINS,), x, I32)
    if interpret
    else plgpu.layout_cast(jnp.full((BINS,), x, I32), bin_layout)
  )

  def body(words_gmem, g_gmem, *refs):
    u_gmem, refs = (None, refs) if fused else (refs[0], refs[1:])
    n_out = 3 + z_sel + bool(idx_bytes)
    outs, (rows_ref, words_ref, z_ref, first_ref, tmp_ref, arrived, *compact_refs) = (
      refs[:n_out],
      refs[n_out:],
    )
    idx_out, outs = (outs[0], outs[1:]) if idx_bytes else (None, outs)
    gs_out, us_out, z_out, *zs_out = outs
    copies = [(z_ref, z_out), (compact_refs[0], gs_out), (compact_refs[1], us_out)]
    copies += [(compact_refs[2], zs_out[0])] if z_sel else []
    copies += [(compact_refs[-1], idx_out)] if idx_bytes else []
    pid = 0 if interpret else lax.axis_index("cta")

    def fetch(r, slot) -> None:
      """rows[slot] = [G | U] row r, by bulk async copy (arrival on arrived[slot])."""
      if interpret:
        rows_ref[slot, pl.ds(0, f)] = g_gmem[r, pl.ds(0, f)]
        rows_ref[slot, pl.ds(f, f)] = g_gmem[r, pl.ds(f, f)] if fused else u_gmem[r, pl.ds(0, f)]
        return
      kw = dict(oob_mode=plgpu.OOBFillMode.PROMISE_IN_BOUNDS)  # contiguous: one cp.async.bulk
      bar = arrived.at[slot]
      if fused:
        plgpu.copy_gmem_to_smem(g_gmem.at[r, pl.ds(0, 2 * f)], rows_ref.at[slot], bar, **kw)
        return
      plgpu.copy_gmem_to_smem(g_gmem.at[r, pl.ds(0, f)], rows_ref.at[slot, pl.ds(0, f)], bar, **kw)
      plgpu.copy_gmem_to_smem(u_gmem.at[r, pl.ds(0, f)], rows_ref.at[slot, pl.ds(f, f)], bar, **kw)

    def words_of(r):
      """Row min(r, T - 1)'s words as a bins array (0 past the row): loads, not yet used."""
      if interpret:
        return jnp.zeros((BINS,), I32).at[:nw].set(words_gmem[jnp.minimum(r, t - 1)])
      return load_words(words_gmem, splat(r))

    def put_words(x, slot) -> None:
      if interpret:
        words_ref[slot] = x
      else:
        put_pair(x, words_ref.at[slot])

    def finish_row(r, slot, words) -> None:
      """Z's row and the K-long rows in shared memory, then out by TMA."""
      if interpret:
        _row_in_jnp(rows_ref[slot], words, f, k, dtype, z_sel, num_valid, z_ref, compact_refs)
        for src, dst in copies:
          dst[r] = src[...]
        return
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last row's copies have read
      first = prefix(popcount(words), tmp_ref)  # (its barrier: every thread knows it)
      fill(z_ref)
      walk(first, words_ref.at[slot], first_ref, rows_ref.at[slot], z_ref, *compact_refs)
      plgpu.commit_smem()  # visible to the TMA engine, every thread done (a barrier)
      for src, dst in copies:
        plgpu.copy_smem_to_gmem(src, dst.at[r])

    def one_row(r, i) -> None:
      slot = i % 2
      nxt = r + ctas
      pl.when(nxt < t)(lambda: fetch(nxt, 1 - slot))
      ahead = words_of(nxt)  # in flight while this row is worked on
      if not interpret:
        plgpu.barrier_wait(arrived.at[slot])
      words = words_ref[slot] if interpret else get_pair(words_ref.at[slot], splat(0))
      finish_row(r, slot, words)
      put_words(ahead, 1 - slot)  # its last reader was the last row's walk

    fetch(pid, 0)  # ctas <= T: every CTA has a first row
    put_words(words_of(pid), 0)  # each thread reads back its own pair; the walk after a barrier
    rows_in_turn(t, ctas, pid, one_row)
    if not interpret:
      plgpu.wait_smem_to_gmem(0)

  compact = lambda dt: jax.ShapeDtypeStruct((t, k), dt)
  out_type = [compact(dtype), compact(dtype), jax.ShapeDtypeStruct((t, f), dtype)]
  out_type = ([compact(idx_dtype)] if idx_bytes else []) + out_type
  out_type += [compact(dtype)] if z_sel else []
  arrivals = 1 if fused else 2  # one per copy into a slot
  arrived = (
    plgpu.SMEM((2,), I32) if interpret else plgpu.Barrier(num_arrivals=arrivals, num_barriers=2)
  )
  scratch = [
    plgpu.SMEM((2, 2 * f), dtype),  # two [G | U] rows
    plgpu.SMEM((2, BINS), I32),  # two rows of words (0 past the row)
    plgpu.SMEM((f,), dtype),  # Z's row
    plgpu.SMEM((BINS,), I32),  # each word's first slot (the walk's search)
    plgpu.SMEM((32,), I32),  # the prefix's warp totals
    arrived,
    plgpu.SMEM((k,), dtype),  # g_sel
    plgpu.SMEM((k,), dtype),  # u_sel
  ]
  scratch += [plgpu.SMEM((k,), dtype)] if z_sel else []
  scratch += [plgpu.SMEM((k,), idx_dtype)] if idx_bytes else []
  return plgpu.kernel(
    body,
    out_type=tuple(out_type),
    grid=(ctas,),
    grid_names=("cta",),
    scratch_types=scratch,
    interpret=interpret,
  )


def _row_in_jnp(row, words, f, k, dtype, z_sel, num_valid, z_ref, compact_refs) -> None:
  """What one row's fill and walk write, as jnp on the whole row (interpret mode)."""
  from pallas_kernels.moc_train_mask import as_selected, silu_mul

  chan = jnp.arange(f, dtype=I32)
  g, u = as_selected(row[:f], chan, num_valid), row[f:]
  w = words[chan >> 5]
  sel = lax.shift_right_logical(w, chan & 31) & 1 == 1
  z = jnp.where(sel, silu_mul(g, u, dtype), jnp.zeros((), dtype))
  z_ref[...] = z
  counts = lax.population_count(words)
  below = w & (lax.shift_left(jnp.ones_like(chan), chan & 31) - 1)
  slot = jnp.where(sel, (jnp.cumsum(counts) - counts)[chan >> 5] + lax.population_count(below), k)
  values = [g, u] + ([z] if z_sel else []) + [chan]  # the key's order; chan only with idx
  for ref, value in zip(compact_refs, values, strict=False):
    ref[...] = jnp.zeros_like(ref[...]).at[slot].set(value.astype(ref.dtype), mode="drop")


def apply(
  words_TxW: jax.Array,
  g2: jax.Array,
  u2: jax.Array | None,
  k: int,
  *,
  idx_dtype=None,
  z_sel: bool = False,
  num_valid: int | None = None,
  interpret: bool | None = None,
  ctas: int | None = None,
) -> tuple[jax.Array, ...]:
  """`moc_train_mask.apply_call`'s ([idx,] g_sel, u_sel, z[, z_sel]) by this kernel. u2 None:
  g2 is the (T, 2F) [G | U] buffer of one fused GEMM. Every row's words must hold exactly K
  set bits (the selection's contract)."""
  fused = u2 is None
  t, f = g2.shape[0], g2.shape[1] // 2 if fused else g2.shape[1]
  if not fused and u2.dtype != g2.dtype:
    raise ValueError(
      f"the Mosaic GPU forward pass takes G and U of one dtype, got {g2.dtype}, {u2.dtype}"
    )
  check(f, k, g2.dtype, idx_dtype)
  interpret = tu.default_interpret(interpret)
  idx_bytes = 0 if idx_dtype is None else jnp.dtype(idx_dtype).itemsize
  n = _ctas(t, smem_bytes(f, k, z_sel, idx_bytes, g2.dtype), interpret, ctas)
  kw = dict(fused=fused, idx_dtype=idx_dtype, z_sel=z_sel, num_valid=num_valid)
  kw |= dict(interpret=interpret)
  build = kernel(t, f, k, n, g2.dtype, **kw)
  return tuple(build(words_TxW, g2, *(() if fused else (u2,))))
