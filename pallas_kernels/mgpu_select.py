"""MoC's exact top-K as a Mosaic GPU radix select with shared-memory histograms.

Why: the Triton selection is instruction-bound (~270 µs at 16384 × 5504, NOTES_kernels.md);
counting keys into shared-memory histograms, one atomic per key and 8-bit digit, is how fast
GPU top-K kernels work, and Pallas-Triton cannot express those atomics. The selection bitmask
of the shipped defaults on Hopper (`TopKConfig.selection='auto'`, `usable`): 166-180 µs against
263-290 for the Triton pass at the 1B shapes (NOTES_kernels.md, 2026-12-04f).

Per row, one warpgroup per CTA, rows taken in turn by the CTAs; keys are the order-preserving
16-bit images of the values (0…65535), one per register (`_mgpu_ptx` has the lane layout):
  1. histogram of each key's high byte; a warp-scan suffix sum finds the bin b1 holding the
     K-th key (S1[b1] >= K > S1[b1 + 1]) and above = S1[b1 + 1];
  2. the same over the low byte of the keys whose high byte is b1: the K-th key
     v = 256 b1 + b2, `need` = K - #keys above v;
  3. words of keys above v and of keys equal to v, one warp ballot each; the equal words keep
     only their first `need` bits in channel order (an exclusive prefix of their popcounts,
     then per word the lowest bits that fit); the row's (F/32) words go to HBM by TMA, and
     the next row waits only for that copy to have read them;
  4. (`select`) each thread walks the set bits of its two words, lowest first: the channel
     and its value (the row's bits in shared memory) go to slot (the word's first slot, an
     exclusive prefix of the popcounts) + the bits already seen; the K-long rows out by TMA.
     Work per selected key (2026-12-05d: a predicated store per key was 15% slower).
The first version's history (255 registers, spilling): NOTES_kernels 2026-12-04.
"""

from __future__ import annotations

import functools
import operator
import os

import jax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _mgpu_ptx as ptx
from pallas_kernels import _triton_utils as tu
from pallas_kernels._mgpu_ops import SelectOps, rows_in_turn
from pallas_kernels._mgpu_ptx import BINS, HIST_WORDS, I32, LANES

# CTAs per SM by default: 4 are resident (108 registers a thread), and two full rounds timed
# as fast as one (169.2 / 169.7 us at 8 / 4 per SM, 177.1 at 1024 CTAs; 5-7 per SM leave a
# ragged round: up to 226.6; 16384 x 5504 in mgpu_select_1b_h200_20261204c.json; again on
# an H100 with rows one ahead: mgpu_select_1b_ctas_h100_20261205m.json)
CTAS_PER_SM = 8
# The whole top-K with `ballot_lanes` on rows wider than LANES_MIN_F: 80 registers (not 108)
# and ~33 KB of shared memory a CTA, so 6 resident per SM, one round of them: 167.8 vs 183.2
# us at 16384 x 5632 on an H100 (mgpu_select_lanes_h100_20261205m.json; 172.9 at 5 a SM,
# 193.1 at 8, a ragged second round). The words alone tie at 1B and lose 6-9% at 350m.
LANES_MIN_F = 4096
LANES_CTAS_PER_SM = 6
KEY_DTYPES = (jnp.bfloat16, jnp.float16)


# The K-long outputs of the top-K (`kernel(compact=True)`): channels and their values' bits.
TOPK_DTYPES = (I32, jnp.int16)


def kernel(
  t: int,
  f: int,
  k: int,
  ctas: int,
  num_valid: int | None = None,
  compact: bool = False,
  interpret: bool = False,
  splits: int = 0,
  round_dtype=jnp.bfloat16,
  async_rows: bool = False,
  warm_bytes: tuple[int, ...] = (),
  warm_ctas: int = 0,
  ballot_lanes: bool = False,
  balanced_walk: bool = False,
  forward: bool = False,
  z_sel: bool = False,
):
  """The kernel for (T, W >= F) 16-bit inputs, selecting among each row's first F columns:
  (T, F/32) int32 words; channels >= num_valid never selected. compact: also (T, K)
  int32 channels (ascending) and (T, K) int16 bits of their values, `topk.select`'s outputs.
  splits > 0: the input is (splits · T, W) fp32 split-K partials of G (a decode gate GEMV's),
  row r's G their sum in split order rounded to round_dtype as the row loads.
  async_rows (16-bit G, not with splits; `words` and `select` default to it): each CTA's next row
  arrives by bulk async copy into the other half of a two-row buffer in shared memory while
  it selects in the current one, so the row's HBM latency is not exposed at each row's start
  (the ablation of 2026-12-05g: ~60 of the 1B words' 150 µs are outside the per-key passes);
  no registers held for it, unlike the register prefetch that lost in 2026-12-05. The input's
  dtype is round_dtype then.
  warm_bytes (compiled only; opt-in: end to end on an H100 it cut device time per token, 1.198
  vs 1.222 ms, but not wall time, 851 vs 886 tokens/s, decode_e2e_mgpusw_h100_20261205i):
  the kernel takes one more input
  per entry, a flat weight the next kernels read (decode: the next layer's q, k, v), and
  `warm_ctas` more CTAs ask L2 for its first warm_bytes[i] bytes, a chunk each
  (`_mgpu_ptx.prefetch_share`), beside the select's CTAs. The Triton top-K's launch warms
  that way with loads (`_l2_prefetch`); a bulk prefetch needs no registers or waits.
  ballot_lanes: each lane keeps the ballot words of one register and stores them once
  (`_mgpu_ptx.ballot_words(lanes=True)`); `select`'s default on rows wider than 4096.
  balanced_walk (compact; built 2026-12-05m, not yet timed): every thread compacts
  ceil(K / 128) selected keys, found by a search over the words' first slots
  (`_mgpu_compact.compact_balanced`), not the ~12-20 of its own 64 channels: a third of the
  whole top-K was the walk and the wait for its busiest thread (NOTES_kernels 2026-12-05m).
  forward (async_rows; `mgpu_apply.in_select`, the train forward's default): the input is
  the (T, 2F) [G | U] buffer, each row fetched whole, and after its words the kernel writes
  the train forward's outputs too, (T, K) G_sel, U_sel, (T, F) Z[, (T, K) Z_sel]
  (`moc_train_mask.apply_call`'s), by `mgpu_apply`'s walk: the select is instruction-bound
  and that pass memory-bound, so one kernel hides one behind the other (selection and pass
  275 vs 461 µs at the 1B layer, H100), and G is read once, not twice.

  Forms timed and removed (loading the next row before selecting in the current one, SWAR
  tie cuts, signed keys, reloading the row per pass, histogram copies per lane group, keys
  kept in shared memory, no barrier after the compaction): NOTES_kernels 2026-12-05,
  2026-12-05g and 2026-12-05m, NOTES_decode 2026-12-05."""
  nv = f if num_valid is None else num_valid
  if f % LANES or f // 32 > BINS or not 0 < ctas <= t or not 0 < k <= nv <= f:
    raise ValueError(
      f"the Mosaic GPU select needs F % {LANES} == 0, F <= {32 * BINS}, 0 < ctas <= T and "
      f"0 < K <= num_valid <= F; got T={t}, F={f}, ctas={ctas}, K={k}, num_valid={nv}"
    )
  if splits and jnp.dtype(round_dtype) not in KEY_DTYPES:
    raise ValueError(f"the Mosaic GPU select rounds G to bf16 or f16, got {round_dtype}")
  if compact and k % 8:
    raise ValueError(f"the Mosaic GPU top-K copies K-long rows by TMA: K % 8 == 0, got {k}")
  if interpret and ctas != 1:
    raise ValueError("interpret mode binds no CTA axis: use ctas=1")
  if async_rows and (splits or jnp.dtype(round_dtype) not in KEY_DTYPES):
    raise ValueError("async_rows copies 16-bit rows as stored: no splits")
  if forward and (compact or not async_rows or k % 8 or warm_ctas):
    raise ValueError(f"forward needs async_rows, K % 8 == 0, no compact or warming; got K={k}")
  if (warm_ctas > 0) != bool(warm_bytes) or (interpret and warm_ctas):
    raise ValueError(
      f"warming needs both warm_bytes and warm_ctas, compiled: got {warm_bytes}, {warm_ctas}"
    )
  chunks = [-(-b // warm_ctas // 16) * 16 if warm_ctas else 0 for b in warm_bytes]
  nw = f // 32
  ops = SelectOps(f, k, nv, interpret, ballot_lanes, balanced_walk, (1 + forward) * f)
  bin_layout = ops.bin_layout
  if forward:  # the train forward's per-row step, after the row's words (`mgpu_apply`)
    from pallas_kernels import mgpu_apply

    forward_row = mgpu_apply.select_forward_row(ops, f, k, round_dtype, z_sel, num_valid)

  def compact_row(r, final, tmp_ref, stash_ref, outs, out_refs, words_ref, first_ref) -> None:
    """Each selected channel's slot (the popcounts of the earlier words plus its word's lower
    bits); the channel and its stashed value stored there, the K-long rows copied out."""
    first = ops.exclusive_prefix(ops.popcount(final), tmp_ref, 24)
    idx_ref, val_ref = outs
    ops.compact(final, first, stash_ref, val_ref, idx_ref, words_ref, first_ref)
    ops.commit()
    for src, dst in zip(outs, out_refs, strict=True):
      ops.copy_out(src, dst.at[r])

  def load_bits(g_ref, r):
    """Row r of G as 16-bit patterns in int32: as stored, or (splits) the sum of its fp32
    partials, rounded."""
    if not splits:
      row = ops.load_row(g_ref, r)
    else:
      parts = [ops.load_row(g_ref, s * t + r) for s in range(splits)]
      row = functools.reduce(operator.add, parts).astype(round_dtype)
    return lax.bitcast_convert_type(row, jnp.int16).astype(I32)

  def body(g_ref, *refs):
    warm_refs, refs = refs[: len(warm_bytes)], refs[len(warm_bytes) :]
    n_out = len(TOPK_DTYPES) if compact else (3 + z_sel) * forward  # beside the words
    out_ref, out_refs, refs = refs[0], refs[1 : 1 + n_out], refs[1 + n_out :]
    high_ref, low_ref, above_ref, equal_ref, tmp_ref, *rest = refs
    if async_rows:  # the two-row buffer and its two barriers come last
      *rest, rows_ref, arrived = rest
    stash_ref, *outs = rest or (None,)  # the row's value bits, then the K-long rows
    pid = 0 if interpret else lax.axis_index("cta")  # interpret mode: one CTA (ctas=1)
    in_row = ops.cast(lax.broadcasted_iota(I32, (BINS,), 0), bin_layout) < nw

    bins = lambda ref: ops.cast(ref[pl.ds(0, BINS)], bin_layout)  # JUNK_BIN's word not read

    def clear_histograms() -> None:
      high_ref[pl.ds(0, BINS)] = ops.splat(0)
      low_ref[pl.ds(0, BINS)] = ops.splat(0)
      ops.barrier()

    def one_row(r, i) -> None:
      if async_rows:  # the next row into the other half; its last reader passed barriers since
        pl.when(r + ctas < t)(lambda: ops.fetch_row(g_ref, r + ctas, rows_ref, 1 - i % 2, arrived))
        ops.wait_row(arrived, i % 2)
        bits = lax.bitcast_convert_type(ops.load_row(rows_ref, i % 2), jnp.int16).astype(I32)
      else:
        bits = load_bits(g_ref, r)
      stash = rows_ref.at[i % 2] if async_rows else stash_ref  # the row's values by channel
      if compact and not async_rows:  # (the last row's were read before its final barrier)
        ops.stash_row(bits, stash_ref)
      key = jnp.where(bits < 0, bits ^ 0x7FFF, bits) + 32768
      ops.count_high(key, high_ref)
      ops.barrier()
      ops.select_bin(bins(high_ref), ops.splat(0), tmp_ref, 0, high_ref)
      b1, above = tmp_ref[4], tmp_ref[5]
      ops.count_low(key, ops.splat(b1), low_ref)
      ops.wait_read()  # the last row's words have left shared memory before new ones land
      ops.barrier()
      ops.select_bin(bins(low_ref), ops.splat(above), tmp_ref, 8, low_ref)
      v, need = b1 * BINS + tmp_ref[12], k - tmp_ref[13]
      ops.ballot_words(key, ops.splat(v), above_ref, equal_ref)
      ops.barrier()
      eq = jnp.where(in_row, ops.cast(equal_ref[...], bin_layout), 0)
      before = ops.exclusive_prefix(ops.popcount(eq), tmp_ref, 16)
      final = ops.cast(above_ref[...], bin_layout) | ops.keep_lowest(eq, need - before)
      above_ref[...] = final
      if compact:  # words past the row are stale shared memory: none of the top-K's
        words = jnp.where(in_row, final, 0)  # (equal_ref is free: eq was read before)
        compact_row(r, words, tmp_ref, stash, outs, out_refs, above_ref, equal_ref)
      if forward:
        words = jnp.where(in_row, final, 0)
        forward_row(r, words, stash, tmp_ref, above_ref, equal_ref, outs, out_refs)
      ops.commit()  # the words, visible to the TMA engine
      ops.copy_out(above_ref.at[pl.ds(0, nw)], out_ref.at[r])

    def select_rows() -> None:
      if async_rows:
        ops.fetch_row(g_ref, pid, rows_ref, 0, arrived)  # ctas <= T: each CTA has a first row
      clear_histograms()  # once: each later row's readers clear what they read (`select_bin`)
      rows_in_turn(t, ctas, pid, one_row)
      ops.wait()

    if not warm_ctas:
      select_rows()
      return
    pl.when(pid < ctas)(select_rows)
    pl.when(pid >= ctas)(lambda: ops.prefetch(warm_refs, warm_bytes, chunks, ctas))

  out_type = [jax.ShapeDtypeStruct((t, nw), I32)]
  scratch = [
    plgpu.SMEM((HIST_WORDS,), I32),  # the high bytes' histogram, JUNK_BIN after it
    plgpu.SMEM((HIST_WORDS,), I32),  # the low bytes' (keys in the K-th key's high-byte bin)
    plgpu.SMEM((BINS,), I32),  # words of keys above v, then the row's words
    plgpu.SMEM((BINS,), I32),  # words of keys equal to v
    plgpu.SMEM((32,), I32),  # per scan: 4 warp totals, then the bin found and the count above
  ]
  if compact:  # the row's value bits (`stash_row`), then the K-long outputs
    out_type += [jax.ShapeDtypeStruct((t, k), dtype) for dtype in TOPK_DTYPES]
    stash_words = 8 if async_rows else f  # async_rows: the row buffer is the stash
    scratch += [plgpu.SMEM((stash_words,), jnp.int16)]
    scratch += [plgpu.SMEM((k,), d) for d in TOPK_DTYPES]
  if forward:  # a stash stand-in (the row buffer is it), then G_sel, U_sel, Z[, Z_sel]
    shapes = [(k,), (k,), (f,)] + [(k,)] * z_sel
    out_type += [jax.ShapeDtypeStruct((t, *shape), round_dtype) for shape in shapes]
    scratch += [plgpu.SMEM((8,), jnp.int16)]
    scratch += [plgpu.SMEM(shape, round_dtype) for shape in shapes]
  if async_rows:  # interpret mode has no barriers (it copies at once): a stand-in
    arrived = plgpu.SMEM((2,), I32) if interpret else plgpu.Barrier(num_arrivals=1, num_barriers=2)
    scratch += [plgpu.SMEM((2, (1 + forward) * f), round_dtype), arrived]
  name = "moc_select_forward" if forward else "moc_topk" if compact else "moc_select_words"
  return plgpu.kernel(
    ptx.named(body, name),
    out_type=tuple(out_type),
    grid=(ctas + warm_ctas,),
    grid_names=("cta",),
    scratch_types=scratch,
    interpret=interpret,
  )


def _ctas(t: int, interpret: bool, ctas: int | None, per_sm: int = CTAS_PER_SM) -> int:
  """CTAs for T rows: `ctas` if given, else per_sm per SM of the device (1 in interpret
  mode), at most T."""
  if interpret:
    return 1
  return min(t, ctas or per_sm * tu.sm_count())


SELECTION_ENV = "MOC_SELECTION"  # 'triton': 'auto' never takes this kernel


def usable(dtype, f: int, interpret: bool) -> bool:
  """Whether `selection='auto'` takes this kernel for rows of F 16-bit values: compiled (not
  interpret mode) on a GPU of compute capability 9.0 or newer (Mosaic GPU's), F % 128 == 0,
  F <= 8192, unless MOC_SELECTION=triton (an escape hatch, should a JAX release break Mosaic
  GPU's lowering of it)."""
  choice = os.environ.get(SELECTION_ENV, "auto")
  if choice not in ("auto", "triton"):
    raise ValueError(f"{SELECTION_ENV} must be 'auto' or 'triton', got {choice!r}")
  if choice == "triton" or interpret or dtype not in KEY_DTYPES or f % LANES or f // 32 > BINS:
    return False
  device = jax.devices()[0]
  try:
    return device.platform == "gpu" and float(device.compute_capability) >= 9.0
  except (AttributeError, ValueError):
    return False


def chosen(selection: str, dtype, f: int, interpret: bool) -> bool:
  """Whether a `TopKConfig.selection` takes this kernel for rows of F values: 'mgpu' always
  (it raises there on what it cannot take), 'auto' where `usable`, 'triton' never."""
  return selection == "mgpu" or (selection == "auto" and usable(dtype, f, interpret))


def row_width(f: int) -> int:
  """The columns the kernel reads for rows of F channels: F rounded up to whole warpgroups."""
  return -(-f // LANES) * LANES


def _check_dtype(g: jax.Array) -> None:
  if g.dtype not in KEY_DTYPES:
    raise ValueError(f"the Mosaic GPU select takes 16-bit floats (bf16, f16), got {g.dtype}")


def words(
  g2: jax.Array,
  k: int,
  *,
  num_valid: int | None = None,
  width: int | None = None,
  interpret: bool | None = None,
  ctas: int | None = None,
  async_rows: bool = True,
  ballot_lanes: bool = False,
) -> jax.Array:
  """`topk_compact.mask_call`'s (T, F/32) int32 words for the first `width` columns of g2
  (default: all of them; the [G | U] buffer of a fused GEMM passes F). async_rows: `kernel`'s
  (faster at every width timed, `TopKConfig.async_rows`); ballot_lanes: `kernel`'s, off (the
  words tie at 1B and lose 6-9% at 350m with it, NOTES_kernels 2026-12-05m)."""
  _check_dtype(g2)
  interpret = tu.default_interpret(interpret)
  t, f = g2.shape[0], width or g2.shape[1]
  kw = dict(interpret=interpret, async_rows=async_rows, round_dtype=g2.dtype)
  build = kernel(t, f, k, _ctas(t, interpret, ctas), num_valid, ballot_lanes=ballot_lanes, **kw)
  return build(g2)[0]


def select(
  g_TxF: jax.Array,
  k: int,
  *,
  interpret: bool | None = None,
  ctas: int | None = None,
  async_rows: bool = True,
  ballot_lanes: bool = True,
  balanced_walk: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """`topk.select(g, k, 'moc')` for a (T, F) 16-bit G: (idx ascending, values). async_rows:
  `kernel`'s; ballot_lanes: `kernel`'s on rows wider than LANES_MIN_F, LANES_CTAS_PER_SM
  CTAs a SM then; balanced_walk: `kernel`'s. Rows of F not a multiple of 128 are padded to
  one (a copy of G; the bulk copies need 16-byte aligned rows), the padding never selected."""
  _check_dtype(g_TxF)
  interpret = tu.default_interpret(interpret)
  t, num_valid = g_TxF.shape
  f = row_width(num_valid)
  g_TxW = jnp.pad(g_TxF, ((0, 0), (0, f - num_valid))) if f > num_valid else g_TxF
  lanes = ballot_lanes and f > LANES_MIN_F
  forms = dict(async_rows=async_rows, ballot_lanes=lanes, balanced_walk=balanced_walk)
  kw = dict(compact=True, interpret=interpret, round_dtype=g_TxF.dtype, **forms)
  per_sm = LANES_CTAS_PER_SM if lanes else CTAS_PER_SM
  build = kernel(t, f, k, _ctas(t, interpret, ctas, per_sm), num_valid, **kw)
  _, idx, val_bits = build(g_TxW)
  return idx, lax.bitcast_convert_type(val_bits, g_TxF.dtype)


def select_partials(
  partials_SxTxW: jax.Array,
  k: int,
  d_ff: int,
  dtype,
  *,
  interpret: bool | None = None,
  ctas: int | None = None,
  warm: tuple[jax.Array, int] | None = None,
  warm_ctas: int = 264,
) -> tuple[jax.Array, jax.Array]:
  """`topk.select(g, k, 'moc')` of G = Σ_s partials[s, :, :d_ff] (fp32, summed in split order)
  rounded to dtype, the sum done as each row loads: the decode gate GEMV's split-K partials,
  as `_decode_select.topk_from_partials` takes them. (idx_TxK ascending, G values in dtype).
  The rows' first d_ff rounded up to a multiple of 128 columns are read; the partials' padding
  columns there are never selected. Needs K % 8 == 0 and d_ff <= 8192. warm = (weight,
  bytes): `warm_ctas` more CTAs ask L2 for the weight's first bytes (`kernel`'s warm_bytes;
  nothing in interpret mode)."""
  splits, t, width = partials_SxTxW.shape
  f = row_width(d_ff)
  if partials_SxTxW.dtype != jnp.float32 or f > width:
    raise ValueError(
      f"select_partials takes fp32 partials at least {f} wide for d_ff={d_ff}, got "
      f"{partials_SxTxW.dtype} of width {width}"
    )
  interpret = tu.default_interpret(interpret)
  kw = dict(compact=True, interpret=interpret, splits=splits, round_dtype=dtype)
  weights = []
  if warm is not None and not interpret:
    flat = warm[0].reshape(-1)
    size = min(flat.size * flat.dtype.itemsize, warm[1]) // 16 * 16
    weights = [flat] if size else []
    kw |= dict(warm_bytes=(size,), warm_ctas=warm_ctas) if size else {}
  build = kernel(t, f, k, _ctas(t, interpret, ctas), num_valid=d_ff, **kw)
  _, idx, val_bits = build(partials_SxTxW.reshape(splits * t, width), *weights)
  return idx, lax.bitcast_convert_type(val_bits, dtype)
