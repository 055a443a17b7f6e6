"""MoC decode of one token in one kernel: gate GEMV, exact selection and the selected rows.

Why: the list pipeline is five launches (gate GEMV, the sum of its split partials, a select on
one program, the rows kernel, the sum of its partials); at T = 1, d = 2048 it took ~30 µs where
the bytes need ~7, and the select alone kept one SM busy for ~8 µs while 131 waited. Here each
program of one grid (never more programs than SMs, so all are resident at once):
  1. computes fp32 partials of G = x Wg for its (column block, D split) items and stores them;
  2. counts itself in at a grid barrier (an acq_rel atomic counter) and waits for the others;
  3. loads all of G (summing the split partials from L2; rounded to x's dtype as the reference
     rounds it), finds the K-th key exactly with the training top-K's search (every program
     redundantly, in parallel), and picks out its own entries [p·R, (p+1)·R) of the sorted
     selection from per-chunk counts (a prefix sum only in the chunks those entries sit in);
  4. streams those R rows of Wu^T and Wd and writes its fp32 partial y; XLA sums the partials.
Interpret mode runs programs one after another, so a barrier would never open: there (and with
`DecodeConfig.fused_barrier=False`) phases 1 and 3-4 are two pallas_calls with the same bodies.
Variant `moc` only; `moc_2of8` takes the list pipeline.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _decode_list, topk
from pallas_kernels import _triton_utils as tu
from pallas_kernels._decode_config import DecodeConfig, cdiv, pow2_at_least
from pallas_kernels._decode_gemv import load_x, precision_for, tf_ref
from pallas_kernels._topk_config import TopKConfig
from pallas_kernels._topk_count import packed_sums

F32 = jnp.float32
I32 = jnp.int32
GEMV_ROWS = 16  # the token is padded to 16 rows for tl.dot


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one token's work is spread over `programs` programs."""

  programs: int  # grid size, at most the SM count
  block_f: int  # gate GEMV: columns per item
  splits: int  # gate GEMV: D splits per column block (an item is one block x one split)
  d_split: int  # rows per split, whole GEMV steps
  items: int
  entries: int  # selection entries (rows of Wu^T and Wd) per program, a power of two
  row_programs: int  # programs with entries: cdiv(k, entries)


def plan(d_model: int, d_ff: int, k: int, max_programs: int, cfg: DecodeConfig) -> Plan:
  """The (block, split) tiling of the gate GEMV with the least work on the busiest program,
  counting each program's re-read of the split partials (from L2) at a quarter of a weight
  byte; then as few list entries per program as fill the grid."""
  step = min(cfg.fused_block_d, pow2_at_least(d_model))
  steps = cdiv(d_model, step)
  best = None
  for block_f in (64, 128):
    blocks = cdiv(d_ff, block_f)
    for splits in range(1, min(8, steps) + 1):
      items = blocks * splits
      rows = cdiv(steps, splits) * step
      cost = cdiv(items, max_programs) * rows * block_f * 2 + splits * d_ff
      if best is None or (cost, items) < best[:2]:
        best = (cost, items, block_f, splits, rows)
  _, items, block_f, splits, d_split = best
  entries = pow2_at_least(cdiv(k, max_programs))
  row_programs = cdiv(k, entries)
  programs = max(min(items, max_programs), row_programs)
  return Plan(programs, block_f, splits, d_split, items, entries, row_programs)


def sm_count() -> int | None:
  """SMs of the default GPU (all programs of a barrier grid must be resident), or None."""
  dev = jax.devices()[0]
  return getattr(dev, "core_count", None) if dev.platform == "gpu" else None


# --- phase 1: split partials of G --------------------------------------------------------------


def _gate_partials(x_ref, wg_ref, gp_ref, *, pl_: Plan, d_model, d_ff, block_d, precision):
  p = pl.program_id(0)

  def item(j, carry):
    it = p + j * pl_.programs
    live = it < pl_.items
    fb, si = it // pl_.splits, it % pl_.splits
    f0 = fb * pl_.block_f
    f_mask = (f0 + jnp.arange(pl_.block_f) < d_ff) & live
    d_end = jnp.minimum((si + 1) * pl_.d_split, d_model)

    def body(i, acc):
      d0 = si * pl_.d_split + i * block_d
      d_mask = d0 + jnp.arange(block_d) < d_end
      xk = load_x(x_ref, d0, block_d, 1, GEMV_ROWS, d_model)
      w = plgpu.load(
        wg_ref.at[pl.ds(d0, block_d), pl.ds(f0, pl_.block_f)],
        mask=d_mask[:, None] & f_mask[None, :],
        other=0,
      )
      return acc + jnp.dot(xk, w, preferred_element_type=F32, precision=precision)

    acc = jnp.zeros((GEMV_ROWS, pl_.block_f), F32)
    acc = lax.fori_loop(0, pl_.d_split // block_d, body, acc)
    mask = (jnp.arange(GEMV_ROWS) < 1)[:, None] & f_mask[None, :]
    plgpu.store(tf_ref(gp_ref, GEMV_ROWS, f0, pl_.block_f, (si,)), acc, mask=mask)
    return carry

  lax.fori_loop(0, cdiv(pl_.items, pl_.programs), item, 0)


# --- phase 3: the K-th key, this program's list entries, their rows ---------------------------


def _scatter_chunk(found, c, above, eq, carry, w0, n: int, p, lst_ref, interpret: bool) -> None:
  """Chunk c's entries in [w0, w0 + n): slots from a packed prefix sum (above in the low 16
  bits, equal in the high), stored to program p's rows of lst_ref."""
  programs = lst_ref.shape[0] // 2
  cum = jnp.cumsum(above + jnp.left_shift(eq, 16), axis=1) + carry
  rows_b, cols_b, valid = found.locate(*found.chunks[c])
  sel, pos = topk.selected_slots(cum, above > 0, eq > 0, valid, found.need)
  slot = pos - w0
  keep = sel & (slot >= 0) & (slot < n)
  for j, val in enumerate((cols_b, found.ckeys[c].astype(I32))):
    row = jnp.full(rows_b.shape, j * programs + p, I32)
    tu.scatter_store(lst_ref, row, slot, val, keep, interpret)


def _place_entries(found: topk.Found, k: int, w0, n: int, lst_ref, interpret: bool) -> None:
  """Write the channels and keys of entries [w0, w0 + n) of the sorted selection to rows p and
  P + p of lst_ref ((2P, n) int32; entries past k are not written). Per-chunk counts (packed, two
  chunks per block reduction) place the entries; only chunks holding some of them run a prefix
  sum, behind a branch. Without ties to cut (the common case) a key is selected iff >= v and
  the counts are of those; else the counts are of keys > v and == v, ties to the lowest."""
  v, need = found.v, found.need
  bits = max(w for _, w in found.chunks).bit_length()
  ge = [(ck >= v).astype(I32) for ck in found.ckeys]
  ge_counts = packed_sums(ge, bits)
  n_eq = sum(ge_counts) - (k - need)  # keys equal to v
  p = pl.program_id(0)  # here: interpret mode has no program_id inside a branch

  def place(above: list, equal: list | None, counts: list) -> None:
    n_chunks = len(above)
    eq_counts = counts[n_chunks:] if equal else [jnp.zeros_like(need)] * n_chunks
    before_a, before_e = jnp.zeros_like(need), jnp.zeros_like(need)
    for c in range(len(found.chunks)):
      first = before_a + jnp.minimum(before_e, need)  # rank of the chunk's first pick
      count = counts[c] + jnp.clip(need - before_e, 0, eq_counts[c])
      hit = (first < w0 + n) & (first + count > w0)
      eq = equal[c] if equal else jnp.zeros_like(above[c])
      carry = before_a + jnp.left_shift(before_e, 16)
      pick = functools.partial(
        _scatter_chunk, found, c, above[c], eq, carry, w0, n, p, lst_ref, interpret
      )
      pl.when(jnp.max(hit.astype(I32)) > 0)(pick)
      before_a, before_e = before_a + counts[c], before_e + eq_counts[c]

  cut = jnp.max((n_eq > need).astype(I32)) > 0
  pl.when(jnp.logical_not(cut))(lambda: place(ge, None, ge_counts))

  @pl.when(cut)
  def _():
    gt = [(ck > v).astype(I32) for ck in found.ckeys]
    eq = [(ck == v).astype(I32) for ck in found.ckeys]
    place(gt, eq, packed_sums(gt + eq, bits))

  if not interpret:
    plgpu.debug_barrier()  # the list's stores before this program's threads read it


def _rows_phase(
  x_ref,
  gp_ref,
  wu_ref,
  wd_ref,
  y_ref,
  lst_ref,
  *,
  pl_: Plan,
  k,
  d_model,
  d_ff,
  topk_cfg,
  rows,
  block_d,
  interpret,
  ablate,
):
  p = pl.program_id(0)
  dtype = x_ref.dtype
  blocks = _decode_list.column_blocks(d_model, block_d)
  ys = tuple(jnp.zeros((w,), F32) for _, w in blocks)
  if ablate == "gate":  # timing only: phases 1-2
    _decode_list.store_y_blocks(y_ref, (p,), ys, blocks, d_model)
    return

  def load(rows_b, cols_b, valid):  # G = the sum of the split partials, in x's dtype
    g = jnp.zeros(cols_b.shape, F32)
    for s in range(pl_.splits):
      s_b = jnp.full(cols_b.shape, s, I32)
      g = g + plgpu.load(gp_ref.at[s_b, rows_b, cols_b], mask=valid, other=0)
    return g.astype(dtype)

  row_r1 = jnp.zeros((1, 1), I32)
  found = topk.search_rows(load, row_r1, dtype, t=1, f=d_ff, k=k, cfg=topk_cfg, interpret=interpret)
  if ablate == "search":  # timing only: phases 1-3 up to the K-th key
    v = jnp.sum(found.v.astype(F32) + found.need.astype(F32))
    ys = tuple(y + v for y in ys)
    _decode_list.store_y_blocks(y_ref, (p,), ys, blocks, d_model)
    return
  _place_entries(found, k, p * pl_.entries, pl_.entries, lst_ref, interpret)
  xs = _decode_list.load_x_blocks(x_ref, jnp.int32(0), blocks, d_model)
  step = functools.partial(_decode_list.rows_step, blocks=blocks, d_model=d_model, z_dtype=dtype)
  for j in range(pl_.entries // rows):
    ok = p * pl_.entries + j * rows + jnp.arange(rows, dtype=I32) < k
    idx = plgpu.load(lst_ref.at[p, pl.ds(j * rows, rows)], mask=ok, other=0)
    key = plgpu.load(lst_ref.at[pl_.row_programs + p, pl.ds(j * rows, rows)], mask=ok, other=0)
    g = tu.key_to_value(key, dtype).astype(F32)
    if ablate == "entries":  # timing only: phase 3 without the rows
      ys = tuple(y + jnp.sum(idx.astype(F32) + g) for y in ys)
      continue
    ys = step(idx, tu.silu(g), ok, xs, ys, wu_ref, wd_ref)
  _decode_list.store_y_blocks(y_ref, (p,), ys, blocks, d_model)


# --- the kernels ------------------------------------------------------------------------------


def _arrive(cnt_ref, slot: int) -> None:
  plgpu.debug_barrier()  # every thread's stores of this program precede its count
  plgpu.atomic_add(cnt_ref, (jnp.int32(slot),), jnp.int32(1))


def _wait(cnt_ref, slot: int, count: int) -> None:
  """Spin until `count` programs arrived at counter `slot` (acq_rel atomics: their stores are
  visible after it)."""

  def poll(seen):
    del seen
    return plgpu.atomic_add(cnt_ref, (jnp.int32(slot),), jnp.int32(0))

  lax.while_loop(lambda seen: seen < count, poll, jnp.int32(0))


def _sum_partials(y_parts_ref, y_ref, *, parts: int, width: int, d_model: int) -> None:
  """y[cols] = the fp32 sum over `parts` partial rows, in index order, for this program's
  `width` columns; cast to y's dtype."""
  c0 = pl.program_id(0) * width
  cols = c0 + jnp.arange(width, dtype=I32)
  rows = jnp.arange(pow2_at_least(parts), dtype=I32)
  r_b = jnp.broadcast_to(rows[:, None], (rows.shape[0], width))
  c_b = jnp.broadcast_to(cols[None, :], r_b.shape)
  part = plgpu.load(y_parts_ref.at[r_b, c_b], mask=(r_b < parts) & (c_b < d_model), other=0)
  plgpu.store(
    y_ref.at[jnp.int32(0), pl.ds(c0, width)],
    jnp.sum(part, axis=0).astype(y_ref.dtype),
    mask=cols < d_model,
  )


def _fused_kernel(
  x_ref,
  wg_ref,
  wu_ref,
  wd_ref,
  cnt_in,
  gp_ref,
  y_parts_ref,
  lst_ref,
  cnt_ref,
  *y_out,
  gate,
  rows,
  reduce,
):
  del cnt_in  # aliased to cnt_ref (zeros)
  pl_ = gate["pl_"]
  p = pl.program_id(0)
  _gate_partials(x_ref, wg_ref, gp_ref, **gate)
  arrivals = min(pl_.items, pl_.programs)  # programs with gate items
  pl.when(p < arrivals)(lambda: _arrive(cnt_ref, 0))

  @pl.when(p < pl_.row_programs)
  def _():
    _wait(cnt_ref, 0, arrivals)
    _rows_phase(x_ref, gp_ref, wu_ref, wd_ref, y_parts_ref, lst_ref, **rows)
    if reduce:
      _arrive(cnt_ref, 1)

  if reduce:

    @pl.when(p * reduce["width"] < reduce["d_model"])
    def _():
      _wait(cnt_ref, 1, pl_.row_programs)
      _sum_partials(y_parts_ref, y_out[0], parts=pl_.row_programs, **reduce)


def _gate_kernel(x_ref, wg_ref, gp_ref, *, gate):
  _gate_partials(x_ref, wg_ref, gp_ref, **gate)


def _rows_kernel(x_ref, gp_ref, wu_ref, wd_ref, y_ref, lst_ref, *, rows):
  _rows_phase(x_ref, gp_ref, wu_ref, wd_ref, y_ref, lst_ref, **rows)


def fused_ffn(
  x_1xD: jax.Array,
  w_gate_DxF: jax.Array,
  w_up_FxD: jax.Array,
  w_down_FxD: jax.Array,
  k: int,
  cfg: DecodeConfig,
  *,
  interpret: bool,
) -> jax.Array:
  """y_1xD of MoC for one token, the semantics of `reference.decode_ffn` (variant `moc`).

  The grid is bounded by `cfg.fused_programs`, else the GPU's SM count (132 in interpret mode).
  The barrier kernel needs every program resident, so without a known SM count (or with
  `cfg.fused_barrier=False`, or in interpret mode) the phases run as two kernels."""
  d_model = x_1xD.shape[1]
  d_ff = w_gate_DxF.shape[1]
  sms = sm_count()
  barrier = cfg.fused_barrier and not interpret and sms is not None
  bound = min(cfg.fused_programs or sms or 132, sms or 1 << 30)
  pl_ = plan(d_model, d_ff, k, bound, cfg)
  block_d = min(cfg.fused_block_d, pow2_at_least(d_model))
  topk_cfg = cfg.topk or TopKConfig(chunk=1024, fan=2, gauss_margin=0.1)
  topk_cfg = dataclasses.replace(topk_cfg, rows=1, strided=topk_cfg.strided and not interpret)
  gate = dict(
    pl_=pl_, d_model=d_model, d_ff=d_ff, block_d=block_d, precision=precision_for(x_1xD.dtype)
  )
  rows = dict(
    pl_=pl_,
    k=k,
    d_model=d_model,
    d_ff=d_ff,
    topk_cfg=topk_cfg,
    rows=min(cfg.list_rows, pl_.entries),
    block_d=min(cfg.list_block_d, pow2_at_least(d_model)),
    interpret=interpret,
    ablate=cfg.fused_ablate,
  )
  gp_shape = jax.ShapeDtypeStruct((pl_.splits, 1, cdiv(d_ff, pl_.block_f) * pl_.block_f), F32)
  y_shape = jax.ShapeDtypeStruct((pl_.row_programs, d_model), F32)
  lst_shape = jax.ShapeDtypeStruct((2 * pl_.row_programs, pl_.entries), I32)  # channels, keys
  params = None if interpret else tu.compiler_params(cfg.fused_warps, cfg.fused_stages)
  if barrier:
    width = pow2_at_least(cdiv(d_model, pl_.programs))  # columns each program sums
    reduce = dict(width=width, d_model=d_model) if cfg.fused_reduce else None
    out_shape = [gp_shape, y_shape, lst_shape, jax.ShapeDtypeStruct((2,), I32)]
    if reduce:
      out_shape.append(jax.ShapeDtypeStruct(x_1xD.shape, x_1xD.dtype))
    out = pl.pallas_call(
      functools.partial(_fused_kernel, gate=gate, rows=rows, reduce=reduce),
      out_shape=tuple(out_shape),
      grid=(max(pl_.programs, cdiv(d_model, width) if reduce else 0),),
      input_output_aliases={4: 3},
      compiler_params=params,
      interpret=interpret,
      name="decode_fused",
    )(x_1xD, w_gate_DxF, w_up_FxD, w_down_FxD, jnp.zeros((2,), I32))
    if reduce:
      return out[4]
    y_parts = out[1]
  else:
    gp = pl.pallas_call(
      functools.partial(_gate_kernel, gate=gate),
      out_shape=gp_shape,
      grid=(min(pl_.items, pl_.programs),),
      compiler_params=params,
      interpret=interpret,
      name="decode_fused_gate",
    )(x_1xD, w_gate_DxF)
    y_parts, _ = pl.pallas_call(
      functools.partial(_rows_kernel, rows=rows),
      out_shape=(y_shape, lst_shape),
      grid=(pl_.row_programs,),
      compiler_params=params,
      interpret=interpret,
      name="decode_fused_rows",
    )(x_1xD, gp, w_up_FxD, w_down_FxD)
  return jnp.sum(y_parts, axis=0).astype(x_1xD.dtype)
