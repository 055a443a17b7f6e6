"""MoC's selection bitmask for narrow rows (F <= 2048: the 60m and 130m layers), one warp a row.

Why: the warpgroup radix select (`mgpu_select`) spends most of a narrow row's time on work per
row, not per key: at the 60m layer (16384 × 1408) it takes 64 µs on an H100 where one read of
G takes ~16, and neither more CTAs, fewer registers, signed keys nor histogram copies moved it
(NOTES_kernels 2026-12-05g). Here one warp holds a whole row (key i of lane l is element
32 i + l, so the ballot of register i is word i of the row's bitmask), keeps its histograms in
shared memory of its own and orders them with `bar.warp.sync`: no CTA barrier, and each
256-bin scan is eight bins a lane plus one warp scan. Same algorithm as `mgpu_select` (two
8-bit digits of the order-preserving 16-bit keys, then the words of keys above and equal to
the K-th key, ties cut to the lowest channels), same words. The train forward's words where
the Mosaic select is chosen and compiled (`TopKConfig.warp_rows`, `topk_compact.mask_call`).
H100, against the warpgroup select in the same runs: 60m 51.8 vs 63.5 µs (2026-12-05i), 53.8
vs 63.0 and 66.5 vs 65.4 (2026-12-05g); 130m 65.1 vs 70.9 and 63.8 vs 69.6.

The whole row is one inline PTX block (`row_ptx`); Pallas Mosaic GPU only launches the CTAs
(one warpgroup each: four warps, four rows at a time) and allocates shared memory. There is
no interpret-mode form: the CPU tests assemble the PTX with ptxas, the GPU test checks it.
"""

from __future__ import annotations

import re

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import llvm
from jax.experimental.mosaic.gpu import utils as mgpu_utils

from pallas_kernels import _mgpu_ptx as ptx
from pallas_kernels import _triton_utils as tu
from pallas_kernels._mgpu_ptx import BINS, HIST_WORDS, I32, JUNK_BIN
from pallas_kernels._mgpu_stream import silu_mul_ptx

MAX_F = 2048  # 64 keys a lane
WARPS = 4  # a warpgroup: the CTA Mosaic GPU launches
CTAS_PER_SM = 8
_HIST_BYTES = 2 * HIST_WORDS * 4  # per warp: the high digits' histogram, then the low digits'
_STAGE_BYTES = 2 * 64 * 4  # per warp: the words of keys above v, then of keys equal to v
_BIN_LAYOUT = plgpu.Layout.WG_STRIDED((BINS,), vec_size=2)  # how a scalar reaches the asm


def _scan_select(hist: str, base: str, k: int, out_bin: str, out_above: str) -> list[str]:
  """PTX: with S[b] = base + #keys whose digit >= b (the histogram at `hist`, lane l holding
  bins 8 l … 8 l + 7), the one bin b with S[b] >= K > S[b + 1] into out_bin and S[b + 1]
  into out_above, in every lane (the lane holding b found by a ballot)."""
  c = [f"c{j}" for j in range(8)]
  lines = [
    f"mad.lo.u32 a, lane, 32, {hist};",
    f"ld.shared.v4.u32 {{{', '.join(c[:4])}}}, [a];",
    f"ld.shared.v4.u32 {{{', '.join(c[4:])}}}, [a+16];",
  ]
  lines += [f"add.u32 {c[j]}, {c[j]}, {c[j + 1]};" for j in range(6, -1, -1)]  # suffix sums
  lines.append("mov.b32 x, c0;")  # the lane's total; then the sum over the lanes at or above
  lines += [
    f"shfl.sync.down.b32 y|p, x, {d}, 0x1f, 0xffffffff; @p add.u32 x, x, y;"
    for d in (1, 2, 4, 8, 16)
  ]
  lines += ["sub.u32 x, x, c0;", f"add.u32 x, x, {base};"]  # x = S[8 l + 8]
  lines += [f"add.u32 {cj}, {cj}, x;" for cj in c]  # c_j = S[8 l + j]
  lines += ["mov.b32 bl, 0;", "mov.b32 ab, x;"]
  for j in range(8):  # S is non-increasing: the last j with S >= K is the owner's bin
    nxt = c[j + 1] if j < 7 else "x"
    lines.append(f"setp.ge.s32 q, {c[j]}, {k}; @q mov.b32 bl, {j}; @q mov.b32 ab, {nxt};")
  lines += [
    f"setp.ge.s32 q, c0, {k}; setp.lt.s32 e, x, {k}; and.pred q, q, e;",
    "vote.sync.ballot.b32 m, q, 0xffffffff; bfind.u32 m, m;",
    "mad.lo.u32 y, lane, 8, bl;",
    f"shfl.sync.idx.b32 {out_bin}|p, y, m, 0x1f, 0xffffffff;",
    f"shfl.sync.idx.b32 {out_above}|p, ab, m, 0x1f, 0xffffffff;",
  ]
  return lines


def row_ptx(
  t: int, f: int, k: int, num_valid: int, width: int, ctas: int, forward: str = ""
) -> str:
  """One warp's selection in row r = (i · ctas + cta) · 4 + warp of G (T, width) bf16/f16:
  its (F / 32) words to out[r]. Operands: $0 G's address, $1 out's, $2 the CTA's histograms
  (shared), $3 its word staging (shared), $4 i; with `forward` (`forward_ptx`'s lines), $5…
  the forward's outputs."""
  nw, n = f // 32, -(-num_valid // 32)  # words; registers holding valid keys
  rem = num_valid - 32 * (n - 1)  # valid lanes in the last of them
  keys = [f"k{i}" for i in range(n)]
  partial = lambda i: i == n - 1 and rem < 32  # register i holds padding in some lanes
  junk = lambda i: f" @!v mov.b32 d, {JUNK_BIN};" if partial(i) else ""  # their digit
  lines = [
    ".reg .pred p, q, e, z, v, w0, w1;",
    ".reg .b32 lane, warp, r, hb, lb, sa, se, a, d, x, y, m, bl, ab, b1, a1, b2, a2, vk, need;",
    ".reg .b32 c0, c1, c2, c3, c4, c5, c6, c7, g, w, g0, g1, e0, e1, p0, p1, i0, i1, t0, kl;",
    f".reg .b32 {', '.join(keys)};",
    ".reg .b64 ga, oa, o64;",
    "mov.u32 x, %tid.x; and.b32 lane, x, 31; shr.u32 warp, x, 5; mov.u32 y, %ctaid.x;",
    f"mad.lo.u32 r, $4, {ctas}, y; mad.lo.u32 r, r, {WARPS}, warp;",
    f"setp.ge.u32 z, r, {t}; @z bra ROW_DONE;",
    f"mad.lo.u32 hb, warp, {_HIST_BYTES}, $2; add.u32 lb, hb, {HIST_WORDS * 4};",
    f"mad.lo.u32 sa, warp, {_STAGE_BYTES}, $3; add.u32 se, sa, {_STAGE_BYTES // 2};",
    # this lane's eight bins of both histograms zeroed (the last row's reads were its own)
    "mad.lo.u32 a, lane, 32, hb;",
    *(
      f"st.shared.v4.u32 [a+{off}], {{0, 0, 0, 0}};"
      for off in (0, 16, HIST_WORDS * 4, HIST_WORDS * 4 + 16)
    ),
    f"setp.lt.u32 v, lane, {rem};",
    # the row's keys: element 32 i + lane at byte 64 i + 2 lane
    f"cvta.to.global.u64 ga, $0; mul.wide.u32 o64, r, {2 * width}; add.u64 ga, ga, o64;",
    "mul.wide.u32 o64, lane, 2; add.u64 ga, ga, o64;",
    *(f"ld.global.nc.s16 {kk}, [ga+{64 * i}];" for i, kk in enumerate(keys)),
    *(
      f"shr.s32 m, {kk}, 15; and.b32 m, m, 32767; xor.b32 {kk}, {kk}, m; add.u32 {kk}, {kk}, 32768;"
      for kk in keys
    ),
    "bar.warp.sync 0xffffffff;",
    # the high digits' histogram (no predicated shared-memory op: ptxas branches around each)
    *(
      f"shr.u32 d, {kk}, 8;{junk(i)} mad.lo.u32 a, d, 4, hb; red.shared.add.u32 [a], 1;"
      for i, kk in enumerate(keys)
    ),
    "bar.warp.sync 0xffffffff;",
    *_scan_select("hb", "0", k, "b1", "a1"),
    # the low digits' histogram of the keys in bin b1
    "shl.b32 b1, b1, 8;",
  ]
  for i, kk in enumerate(keys):  # keys of other bins (and padding) add into JUNK_BIN
    lines.append(
      f"sub.u32 d, {kk}, b1; min.u32 d, d, {JUNK_BIN};{junk(i)} mad.lo.u32 a, d, 4, lb;"
      " red.shared.add.u32 [a], 1;"
    )
  lines += [
    "bar.warp.sync 0xffffffff;",
    *_scan_select("lb", "a1", k, "b2", "a2"),
    f"add.u32 vk, b1, b2; sub.s32 need, {k}, a2;",  # the K-th key; how many equal to it fit
  ]
  for i, kk in enumerate(keys):  # word i: the keys above vk, and those equal to it
    valid = " and.pred p, p, v; and.pred e, e, v;" if partial(i) else ""
    lines.append(
      f"setp.gt.u32 p, {kk}, vk; setp.eq.u32 e, {kk}, vk;{valid}"
      " vote.sync.ballot.b32 g, p, 0xffffffff; vote.sync.ballot.b32 w, e, 0xffffffff;"
      f" st.shared.u32 [sa+{4 * i}], g; st.shared.u32 [se+{4 * i}], w;"  # all lanes: one word
    )
  for i in range(n, nw):  # words of padding channels only
    lines.append(f"st.shared.u32 [sa+{4 * i}], 0; st.shared.u32 [se+{4 * i}], 0;")
  lines += [
    "bar.warp.sync 0xffffffff;",
    # lane l: words l and 32 + l; the equal keys' popcounts summed over the words before
    f"setp.lt.u32 w0, lane, {nw}; setp.lt.u32 w1, lane, {max(nw - 32, 0)};",
    "mov.b32 g0, 0; mov.b32 e0, 0; mov.b32 g1, 0; mov.b32 e1, 0;",
    "mad.lo.u32 a, lane, 4, sa;",
    "@w0 ld.shared.u32 g0, [a]; @w0 ld.shared.u32 e0, [a+256];",
    "@w1 ld.shared.u32 g1, [a+128]; @w1 ld.shared.u32 e1, [a+384];",
    "popc.b32 p0, e0; popc.b32 p1, e1; mov.b32 i0, p0; mov.b32 i1, p1;",
    *(
      f"shfl.sync.up.b32 y|p, i{h}, {d}, 0x0, 0xffffffff; @p add.u32 i{h}, i{h}, y;"
      for d in (1, 2, 4, 8, 16)
      for h in (0, 1)
    ),
    "shfl.sync.idx.b32 t0|p, i0, 31, 0x1f, 0xffffffff;",  # the first 32 words' total
    "sub.u32 i0, i0, p0; sub.u32 i1, i1, p1; add.u32 i1, i1, t0;",
    *_keep_lowest("e0", "i0", "g0"),
    *_keep_lowest("e1", "i1", "g1"),
    f"cvta.to.global.u64 oa, $1; mul.wide.u32 o64, r, {4 * nw}; add.u64 oa, oa, o64;",
    "mul.wide.u32 o64, lane, 4; add.u64 oa, oa, o64;",
    "@w0 st.global.u32 [oa], g0; @w1 st.global.u32 [oa+128], g1;",
    forward,
    "ROW_DONE:",
  ]
  return "{\n" + "\n".join(lines) + "\n}"


def forward_ptx(f: int, k: int, num_valid: int, dtype, z_sel: bool, reload_g: bool = True) -> str:
  """PTX after a row's words (`row_ptx`'s `forward`): the train forward's outputs of row r
  from the [G | U] row, as `mgpu_apply` computes them. Lane l owns channels 32 i + l: for
  each register i it takes word i by shuffle, and its key's bit there says whether the
  channel is selected; the slot is the set bits before it in the row. z = silu(g)·u is
  computed for every channel (a warp issues it anyway) and stored to Z, 0 where unselected;
  the selected lanes store g, u (and z) at their slots, consecutive within a register.
  reload_g: g loaded again (from L1) rather than turned back from the key: ptxas then lets
  the keys die after the words, 64 registers a thread at 60M (8 CTAs an SM) against 167 (3).
  Operands: $5 Z's address, $6 G_sel's, $7 U_sel's, $8 Z_sel's (z_sel)."""
  nw, n = f // 32, -(-num_valid // 32)
  outs = ["gs", "us"] + ["zs"] * z_sel
  lines = [
    ".reg .pred sl; .reg .b16 gh, uh, zh, zo; .reg .b32 fx, fy, fn, ft, fh, fs, lt, wi, base;",
    f".reg .b64 zp, sp, {', '.join(p + 'p' for p in outs)};",
    f"cvta.to.global.u64 zp, $5; mul.wide.u32 o64, r, {2 * f}; add.u64 zp, zp, o64;",
    "mul.wide.u32 o64, lane, 2; add.u64 zp, zp, o64;",
  ]
  for j, name in enumerate(outs):
    lines.append(
      f"cvta.to.global.u64 {name}p, ${6 + j}; mul.wide.u32 o64, r, {2 * k};"
      f" add.u64 {name}p, {name}p, o64;"
    )
  lines += ["mov.u32 lt, %lanemask_lt;", "mov.b32 base, 0;"]
  stores = [("gh", "gsp"), ("uh", "usp")] + [("zh", "zsp")] * z_sel
  for i in range(n):
    lines += [
      f"shfl.sync.idx.b32 wi|p, g{i // 32}, {i % 32}, 0x1f, 0xffffffff;",
      "shr.b32 x, wi, lane; and.b32 x, x, 1; setp.ne.u32 sl, x, 0;",
      "and.b32 x, wi, lt; popc.b32 x, x; add.u32 y, base, x; popc.b32 x, wi;"
      " add.u32 base, base, x;",  # y: the slot, if selected
      f"ld.global.nc.b16 gh, [ga+{64 * i}];" if reload_g else _key_to_bits(i),
      f"ld.global.nc.b16 uh, [ga+{2 * f + 64 * i}];",
      silu_mul_ptx(dtype),
      f"selp.b16 zo, zh, 0, sl; st.global.b16 [zp+{64 * i}], zo;",
      "mul.wide.u32 o64, y, 2;",
      *(f"add.u64 sp, {ptr}, o64; @sl st.global.b16 [sp], {val};" for val, ptr in stores),
    ]
  lines.append("mov.b16 zo, 0;")
  lines += [f"st.global.b16 [zp+{64 * i}], zo;" for i in range(n, nw)]  # padding channels
  return "\n".join(lines)


def _key_to_bits(i: int) -> str:
  """PTX: key i back to G's 16 bits into gh (`row_ptx`'s order-preserving map, inverted)."""
  return (
    f"sub.u32 x, k{i}, 32768; shr.s32 m, x, 15; and.b32 m, m, 32767; xor.b32 x, x, m;"
    " cvt.u16.u32 gh, x;"
  )


def _keep_lowest(eq: str, before: str, words: str) -> list[str]:
  """PTX: words |= the lowest (need - before) set bits of eq (`_mgpu_ptx.KEEP_LOWEST`, its
  operands $0, $1, $2 bound to kl, eq and that count)."""
  operands = ("kl", eq, "m")
  keep = re.sub(r"\$(\d)", lambda g: operands[int(g.group(1))], ptx.KEEP_LOWEST)
  return [f"sub.s32 m, need, {before};", keep, f"or.b32 {words}, {words}, kl;"]


def kernel(
  t: int,
  f: int,
  k: int,
  ctas: int,
  num_valid: int | None = None,
  width: int = 0,
  *,
  forward_dtype=None,
  z_sel: bool = False,
  reload_g: bool = True,
):
  """(T, width >= F) 16-bit G -> (T, F / 32) int32 words of the first F columns' selection,
  channels >= num_valid never selected; `ctas` CTAs of four warps, one row a warp at a time.
  forward_dtype (the (T, 2F) [G | U] buffer's): also the train forward's (T, K) G_sel, U_sel,
  (T, F) Z[, (T, K) Z_sel] (`forward_ptx`), as `mgpu_apply.in_select` returns them."""
  nv = f if num_valid is None else num_valid
  width = width or f
  if f % 32 or f > MAX_F or f > width or not 0 < k <= nv <= f or ctas < 1:
    raise ValueError(
      f"the warp-per-row select needs F % 32 == 0, F <= {MAX_F}, F <= width, ctas > 0 and "
      f"0 < K <= num_valid <= F; got F={f}, width={width}, K={k}, num_valid={nv}, ctas={ctas}"
    )
  out_type = [jax.ShapeDtypeStruct((t, f // 32), I32)]
  forward = ""
  if forward_dtype is not None:
    if width != 2 * f or jnp.dtype(forward_dtype) not in (jnp.bfloat16, jnp.float16):
      raise ValueError(
        f"the forward reads the (T, 2F) [G | U] buffer of bf16 or f16; got width {width}, "
        f"F={f}, {jnp.dtype(forward_dtype)}"
      )
    forward = forward_ptx(f, k, nv, forward_dtype, z_sel, reload_g)
    shapes = [(t, k), (t, k), (t, f)] + [(t, k)] * z_sel
    out_type += [jax.ShapeDtypeStruct(shape, forward_dtype) for shape in shapes]
  text = row_ptx(t, f, k, nv, width, ctas, forward)
  splat = lambda x: plgpu.layout_cast(jnp.full((BINS,), x, I32), _BIN_LAYOUT)
  n_out = len(out_type)

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * (3 + n_out) + (_BIN_LAYOUT,))
  def row(ctx, g_ref, *refs):
    del ctx
    outs, (hist_ref, stage_ref, i_array) = refs[:n_out], refs[n_out:]
    i64 = ir.IntegerType.get_signless(64)
    address = lambda ref: llvm.ptrtoint(i64, mgpu_utils.memref_ptr(ref))
    smem = [mgpu_utils.memref_ptr(r) for r in (hist_ref, stage_ref)]
    operands = [address(g_ref), address(outs[0]), *smem, ptx._scalar(i_array)]
    if forward:  # $5 Z, $6 G_sel, $7 U_sel[, $8 Z_sel]
      operands += [address(outs[3]), address(outs[1]), address(outs[2]), *map(address, outs[4:])]
    ptx._asm(text, operands, ",".join(["l", "l", "r", "r", "r"] + ["l"] * (n_out - 1)))

  def body(g_ref, *refs):
    def step(i, carry):
      row(g_ref, *refs, splat(i))
      return carry

    lax.fori_loop(0, pl.cdiv(t, WARPS * ctas), step, 0)

  name = "moc_select_warp_forward" if forward else "moc_select_warp"
  return plgpu.kernel(
    ptx.named(body, name),
    out_type=tuple(out_type) if forward else out_type[0],
    grid=(ctas,),
    grid_names=("cta",),
    scratch_types=[
      plgpu.SMEM((WARPS * _HIST_BYTES // 4,), I32),
      plgpu.SMEM((WARPS * _STAGE_BYTES // 4,), I32),
    ],
  )


def words(
  g2: jax.Array,
  k: int,
  *,
  num_valid: int | None = None,
  width: int | None = None,
  ctas: int | None = None,
) -> jax.Array:
  """`mgpu_select.words` for rows of at most 2048 channels (compiled on a Hopper GPU only)."""
  t, f = g2.shape[0], width or g2.shape[1]
  return kernel(t, f, k, _ctas(t, ctas), num_valid, width=g2.shape[1])(g2)


def in_select(
  gu_Tx2F: jax.Array,
  k: int,
  *,
  num_valid: int | None = None,
  z_sel: bool = False,
  ctas: int | None = None,
  reload_g: bool = True,
) -> tuple[jax.Array, ...]:
  """`mgpu_apply.in_select`'s (words, g_sel, u_sel, z[, z_sel]) one warp a row, for rows of
  at most 2048 channels (compiled on a Hopper GPU only). Built 2026-12-05o without a GPU:
  its PTX assembles and it lowers; untimed and unchecked on a GPU (opt-in:
  `TopKConfig.apply_mode='in_select_warp'`)."""
  t, f = gu_Tx2F.shape[0], gu_Tx2F.shape[1] // 2
  kw = dict(width=2 * f, forward_dtype=gu_Tx2F.dtype, z_sel=z_sel, reload_g=reload_g)
  return tuple(kernel(t, f, k, _ctas(t, ctas), num_valid, **kw)(gu_Tx2F))


def _ctas(t: int, ctas: int | None) -> int:
  """The CTAs asked for, else enough for every row's warp, at most CTAS_PER_SM an SM."""
  return ctas or min(pl.cdiv(t, WARPS), CTAS_PER_SM * tu.sm_count())
