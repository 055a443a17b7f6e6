"""MoC train epilogues that keep the selection as a bitmask: one bit per channel, not an index.

Why: with the selection as (T, ceil(F/32)) int32 words (`topk_compact.mask_call`), both epilogues
become streaming passes over contiguous row blocks. A channel's slot in the compact residuals
is the popcount of the set bits before it (`topk_compact.word_blocks`), so the backward reads
dZ and writes dG, dU and Z densely, instead of zero-filling them and then scattering at the
indices. The words are also smaller than the indices they replace (F/8 bytes per token vs 2K:
688 vs 2048 at the 1B shape).

Forward: (G, U) -> (words, G_sel, U_sel, zero-filled Z[, Z_sel]); the streaming pass is shared
with `moc_train.train_forward_epilogue`'s two-kernel form, which writes indices instead of words.
Backward: (dZ, words, G_sel, U_sel[, Z_sel]) -> zero-filled dG, dU and Z, the same values as
`reference.train_backward_epilogue` at the indices the words hold.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import _triton_utils as tu
from pallas_kernels import topk_compact
from pallas_kernels._topk_config import TopKConfig
from pallas_kernels.reference import GROUP, PER_GROUP

STREAM_MODES = ("row", "block", "mgpu", "auto")


@dataclasses.dataclass(frozen=True)
class StreamConfig:
  """How a streaming pass walks the bitmask: `words` per block (32 channels each; 0: the
  row's power-of-two pieces, row modes only), `warps` per program, and `mode`:
  'row' (one program per row, each block loaded, computed and stored in turn), 'block' (one
  program per block: grid (T, blocks)) or, for the backward, 'mgpu' (`mgpu_backward`, a Mosaic
  GPU kernel computing only the selected keys) or 'auto' (the default: 'mgpu' where it can
  run, else the Triton walk `_triton_walk` picks by width). Walks that
  lost on the H200 and were removed: every block's loads first ('prefetch', code at 3b714b8)
  and the next block's loads ahead of this block's stores ('pipeline': forward 319 vs 305 us
  for 'row', backward 370 vs 345 for 'block', stream_sweep_h200_20261203b.json; code at
  3c9c317)."""

  words: int = 32
  warps: int = 4
  mode: str = "row"

  def __post_init__(self):
    if self.mode not in STREAM_MODES:
      raise ValueError(f"stream mode must be one of {STREAM_MODES}, got {self.mode!r}")
    if self.words < 0 or self.words & (self.words - 1) or (self.mode == "block" and not self.words):
      raise ValueError(f"words={self.words}: a power of two (or 0 in the row modes)")

  def grid(self, t: int, f: int) -> tuple[int, ...]:
    return (t, topk_compact.num_word_blocks(f, self.words)) if self.mode == "block" else (t,)

  def blocks(self, m_ref, *, t: int, f: int):
    """This program's (rows_b, cols_b, ok, sel, slot) blocks, in order."""
    if self.mode == "block":
      return [topk_compact.row_block(m_ref, t=t, f=f, words=self.words)]
    return topk_compact.word_blocks(m_ref, t=t, f=f, rows=1, max_words=self.words)

  def run(self, m_ref, *, t: int, f: int, load, finish) -> None:
    """finish(block, load(block)) for each block, in order. Blocks are made as they are
    needed: making them all first (a list) kept every block's indices live, and the row walk
    ran 489 us instead of 321 (stream_sweep_h200_20261203.json)."""
    for block in self.blocks(m_ref, t=t, f=f):
      finish(block, load(block))


# The H200 at the 1B layer shape (stream_sweep_h200_20261203b.json): one program per 512 channels,
# 345 us vs 369 for one program per row (GCP: 335 vs 371); the forward pass is fastest per row
# (305 us vs 354-437 for the block walks).
TRITON_BACKWARD = StreamConfig(words=16, mode="block")
# 'auto': the Mosaic backward (`mgpu_backward`) where it runs (K % 64), else the Triton walks.
# In the layer on an H100 (ffn_layer_h100_20261205o2.json), with the select writing the forward:
# fwd+bwd / dense 1.047 / 1.030 / 1.029 / 1.040 against 1.075 / 1.064 / 1.060 / 1.079 with
# the Triton walk, at the 60M / 130M / 350M / 1B shapes.
BACKWARD_DEFAULT = StreamConfig(mode="auto")
ROW_WALK_BELOW = 2048  # rows of fewer channels: the backward walks one row per program


def backward_config(f: int) -> StreamConfig:
  """The backward pass's walk for rows of F channels: BACKWARD_DEFAULT, or the forward's row
  walk below ROW_WALK_BELOW channels. At the 60M shape (F = 1408) the row walk took 91 / 97 /
  99 us where the block walk took 121 / 103 / 101 in three runs (GCP 95 / 101 / 104 vs 100 /
  102 / 101; stream_sweep_h200_20261203{i,j}.json, _20261202.json); at 130M the block walk
  wins (134-141 vs 142-153)."""
  if f >= ROW_WALK_BELOW or BACKWARD_DEFAULT.mode in ("mgpu", "auto"):
    return BACKWARD_DEFAULT
  return _triton_walk(f)


def _triton_walk(f: int) -> StreamConfig:
  """'auto''s backward where the Mosaic kernel cannot run: the block walk, or the row walk
  below ROW_WALK_BELOW channels."""
  return TRITON_BACKWARD if f >= ROW_WALK_BELOW else StreamConfig(words=32, mode="row")


def silu_mul(g, u, out_dtype):
  """silu(g) * u in fp32, rounded once: the one routine every Pallas epilogue uses for Z, so
  Z kept in the forward and Z recomputed in the backward (GCP) are bit-identical."""
  g32 = g.astype(jnp.float32)
  return (g32 * jax.nn.sigmoid(g32) * u.astype(jnp.float32)).astype(out_dtype)


def as_selected(g, cols, num_valid):
  """G as the selection saw it: the lowest finite value past num_valid (2:8 keeps whole
  padding groups, so a padding channel can be selected and stored)."""
  if num_valid is None:
    return g
  return jnp.where(cols < num_valid, g, jnp.array(jnp.finfo(g.dtype).min, g.dtype))


def load_gu(g_ref, u_ref, u_off: int, rows_b, cols_b, ok, num_valid):
  """(G as the selection saw it, U) at a block of channels; U at columns + u_off. ok None:
  every channel is in bounds (the lowering takes no fill value without a mask)."""
  kw = {} if ok is None else dict(mask=ok, other=0)
  g = as_selected(pltriton.load(g_ref.at[rows_b, cols_b], **kw), cols_b, num_valid)
  return g, pltriton.load(u_ref.at[rows_b, cols_b + u_off], **kw)


def store_z(z_ref, rows_b, cols_b, ok, sel, g, u):
  """Z = silu(G)·U stored densely (zero off the selection); returns Z."""
  z = silu_mul(g, u, z_ref.dtype)
  pltriton.store(z_ref.at[rows_b, cols_b], jnp.where(sel, z, jnp.zeros((), z.dtype)), mask=ok)
  return z


def _apply_kernel(m_ref, g_ref, *refs, t, f, num_valid, sc, has_idx, fused, interpret):
  """Z densely; G_sel, U_sel (and the indices or Z_sel) at each selected channel's slot.
  fused: U is g_ref's columns [f, 2f) (one [G | U] buffer), else the next operand."""
  u_ref, out_refs, u_off = (g_ref, refs, f) if fused else (refs[0], refs[1:], 0)
  idx_ref = out_refs[0] if has_idx else None
  gs_ref, us_ref, z_ref, *zs_ref = out_refs[1:] if has_idx else out_refs

  def load(block):
    rows_b, cols_b, ok, _, _ = block
    return load_gu(g_ref, u_ref, u_off, rows_b, cols_b, ok, num_valid)

  def finish(block, loaded):
    rows_b, cols_b, ok, sel, slot = block
    g, u = loaded
    z = store_z(z_ref, rows_b, cols_b, ok, sel, g, u)
    if has_idx:
      tu.scatter_store(idx_ref, rows_b, slot, cols_b.astype(idx_ref.dtype), sel, interpret)
    tu.scatter_store(gs_ref, rows_b, slot, g, sel, interpret)
    tu.scatter_store(us_ref, rows_b, slot, u, sel, interpret)
    if zs_ref:
      tu.scatter_store(zs_ref[0], rows_b, slot, z, sel, interpret)

  sc.run(m_ref, t=t, f=f, load=load, finish=finish)


def stream_config(cfg: TopKConfig) -> StreamConfig:
  """The forward streaming pass's walk, from a `TopKConfig`'s apply_* fields."""
  return StreamConfig(words=cfg.apply_words, warps=cfg.apply_warps, mode=cfg.apply_mode)


def apply_call(
  mask,
  g2,
  u2,
  k: int,
  *,
  num_valid,
  cfg: TopKConfig,
  interpret: bool,
  idx_dtype=None,
  z_sel: bool = False,
) -> tuple[jax.Array, ...]:
  """The streaming pass: ([idx,] g_sel, u_sel, z[, z_sel]); idx only when idx_dtype is given.
  u2 None: g2 is the (T, 2F) [G | U] buffer of one fused GEMM."""
  fused = u2 is None
  t, f = g2.shape[0], g2.shape[1] // 2 if fused else g2.shape[1]
  u_dtype = g2.dtype if fused else u2.dtype
  compact = lambda dtype: jax.ShapeDtypeStruct((t, k), dtype)
  out_shape = [compact(g2.dtype), compact(u_dtype), jax.ShapeDtypeStruct((t, f), u_dtype)]
  if idx_dtype is not None:
    out_shape.insert(0, compact(idx_dtype))
  if z_sel:
    out_shape.append(compact(u_dtype))
  if cfg.apply_mode in ("mgpu", "auto"):
    from pallas_kernels import _mgpu_stream, mgpu_apply

    # 'auto' on the fused buffer only: split G, U (tensor parallelism, FUSE_GATE_UP off) are
    # checked in interpret mode, not yet compiled on a GPU (`test_mgpu_apply_gpu_*` now is)
    runs = fused and _mgpu_stream.usable(g2.dtype, f, k, 8, interpret)
    if cfg.apply_mode == "mgpu" or runs:
      kw = dict(idx_dtype=idx_dtype, z_sel=z_sel, num_valid=num_valid, interpret=interpret)
      return mgpu_apply.apply(mask, g2, u2, k, **kw)
    cfg = dataclasses.replace(cfg, apply_mode="gather")  # 'auto' where it cannot run
  if cfg.apply_mode == "gather":  # slots filled in order by a search, not scattered
    from pallas_kernels._apply_gather import gather_call

    has_idx = idx_dtype is not None
    kw = dict(has_idx=has_idx, z_sel=z_sel, num_valid=num_valid, cfg=cfg, interpret=interpret)
    return gather_call(mask, g2, u2, out_shape, **kw)
  sc = stream_config(cfg)
  kernel = functools.partial(
    _apply_kernel,
    t=t,
    f=f,
    num_valid=num_valid,
    sc=sc,
    has_idx=idx_dtype is not None,
    fused=fused,
    interpret=interpret,
  )
  return pl.pallas_call(
    kernel,
    out_shape=tuple(out_shape),
    grid=sc.grid(t, f),
    interpret=interpret,
    compiler_params=None if interpret else tu.compiler_params(sc.warps),
    name="moc_train_fwd_apply",
  )(mask, g2, *(() if fused else (u2,)))


def checked_selection(
  f: int, k: int, variant: str, num_valid: int | None
) -> tuple[int, int | None]:
  """(K as the kernels use it, num_valid or None when no channel is padding) for a row of F
  channels; raises on a variant, K or F the forward epilogues cannot take."""
  nv = None if num_valid is None or num_valid >= f else int(num_valid)
  if variant == "moc_2of8":
    if f % GROUP:
      raise ValueError(f"moc_2of8 needs F divisible by {GROUP}, got F={f}")
    return f // GROUP * PER_GROUP, nv
  if variant != "moc":
    raise ValueError(f"unknown MoC variant {variant!r}; expected 'moc' or 'moc_2of8'")
  if not 0 < k <= (f if nv is None else nv) or f >= 32768:  # 16-bit packed prefix counts
    raise ValueError(f"need 0 < k <= num_valid <= F < 32768, got k={k}, F={f}, nv={nv}")
  return k, nv


def train_forward_bitmask(
  g_TxF: jax.Array,
  u_TxF: jax.Array | None,
  k: int,
  variant: str = "moc",
  *,
  num_valid: int | None = None,
  config: TopKConfig | None = None,
  interpret: bool | None = None,
  z_sel: bool = False,
) -> tuple[jax.Array, ...]:
  """(words_TxW int32, g_sel_TxK, u_sel_TxK, z_TxF[, z_sel_TxK]) for (T, F) inputs, F >= 32.

  Bit j of word w is channel 32 w + j; G_sel, U_sel, Z_sel are in channel order, as the
  reference's indices would give them. `config` is any `TopKConfig` (always run as two kernels;
  default `moc_train.forward_config(F)`). With u_TxF None, g_TxF is the (T, 2F) output [G | U]
  of one fused gate-and-up GEMM, read in place (no XLA slice copies). The default config is
  picked here, outside the jit (see `topk.select`).
  """
  from pallas_kernels import moc_train

  f = g_TxF.shape[-1] // 2 if u_TxF is None else g_TxF.shape[-1]
  cfg = dataclasses.replace(config or moc_train.forward_config(f), compact=False)
  kw = dict(num_valid=num_valid, cfg=cfg, interpret=interpret, z_sel=z_sel)
  return _train_forward_bitmask(g_TxF, u_TxF, k, variant, **kw)


@functools.partial(
  jax.jit, static_argnames=("k", "variant", "num_valid", "cfg", "interpret", "z_sel")
)
def _train_forward_bitmask(g_TxF, u_TxF, k, variant, *, num_valid, cfg, interpret, z_sel):
  f = g_TxF.shape[-1] // 2 if u_TxF is None else g_TxF.shape[-1]
  if f < topk_compact.WORD:
    raise ValueError(f"the bitmask epilogue needs F >= {topk_compact.WORD}, got F={f}")
  k, nv = checked_selection(f, k, variant, num_valid)
  interpret = tu.default_interpret(interpret)
  if _takes_in_select(cfg, u_TxF is None, variant, g_TxF.dtype, f, k, interpret):
    from pallas_kernels import mgpu_apply, mgpu_select_warp

    warp = cfg.apply_mode == "in_select_warp" and f <= mgpu_select_warp.MAX_F
    if warp:  # opt-in, untimed: one warp a row (wider rows: the warpgroup in_select)
      if interpret:
        raise ValueError("apply_mode='in_select_warp' has no interpret mode (PTX a row)")
      return mgpu_select_warp.in_select(g_TxF, k, num_valid=nv, z_sel=z_sel)
    return mgpu_apply.in_select(g_TxF, k, num_valid=nv, z_sel=z_sel, interpret=interpret)
  words = topk_compact.mask_call(g_TxF, k, variant, cfg, interpret, num_valid=nv, width=f)
  outs = apply_call(words, g_TxF, u_TxF, k, num_valid=nv, cfg=cfg, interpret=interpret, z_sel=z_sel)
  return (words, *outs)


def _takes_in_select(cfg: TopKConfig, fused: bool, variant: str, dtype, f, k, interpret) -> bool:
  """Whether the select writes the forward pass's outputs itself (`mgpu_apply.in_select`):
  always for 'in_select', and for 'auto' where the Mosaic select runs on the fused buffer.
  On an H100, 16384 rows (mgpu_stream_h100_20261205o.json): selection and pass 274.7 vs
  460.6 us at the 1B layer, 142.8 vs 255.4 at 350M, 94.0 vs 126.2 at 60M; exact."""
  if cfg.apply_mode in ("in_select", "in_select_warp"):
    if not fused or variant != "moc":
      raise ValueError(f"apply_mode={cfg.apply_mode!r} takes the fused [G | U] buffer and 'moc'")
    return True
  from pallas_kernels import _mgpu_stream

  runs = cfg.selection != "triton" and _mgpu_stream.usable(dtype, f, k, 8, interpret)
  return cfg.apply_mode == "auto" and fused and variant == "moc" and runs


def _backward_kernel(dz_ref, m_ref, gs_ref, us_ref, *rest, t, f, sc, has_z, fused, interpret):
  zs_ref, outs = (rest[0], rest[1:]) if has_z else (None, rest)
  # fused: dG and dU as one (T, 2F) [dG | dU] output, for one GEMM over [Wg | Wu] after it
  (dg_ref, z_ref), du_ref, du_off = (outs, outs[0], f) if fused else (outs[::2], outs[1], 0)
  del interpret  # every store is dense: no masked-off lane can clobber another's element

  def load(block):
    rows_b, cols_b, ok, sel, slot = block
    gathered = [pltriton.load(r.at[rows_b, slot], mask=sel, other=0) for r in (gs_ref, us_ref)]
    if has_z:
      gathered.append(pltriton.load(zs_ref.at[rows_b, slot], mask=sel, other=0))
    return pltriton.load(dz_ref.at[rows_b, cols_b], mask=ok, other=0), *gathered

  def finish(block, loaded):
    rows_b, cols_b, ok, sel, _ = block
    dz, g_raw, u_raw, *z = loaded
    dg, du, z = backward_values(dz, g_raw, u_raw, z[0] if has_z else None, z_ref.dtype)
    for ref, val, off in ((dg_ref, dg, 0), (du_ref, du, du_off), (z_ref, z, 0)):
      val = jnp.where(sel, val.astype(ref.dtype), jnp.zeros((), ref.dtype))
      pltriton.store(ref.at[rows_b, cols_b + off], val, mask=ok)

  sc.run(m_ref, t=t, f=f, load=load, finish=finish)


def backward_values(dz, g_raw, u_raw, z, z_dtype):
  """(dG, dU in fp32, Z) at selected channels from dZ, G_sel, U_sel and Z_sel (None: silu(G)·U
  recomputed, GCP): the one formula every backward pass uses (`mgpu_backward` in PTX)."""
  z = silu_mul(g_raw, u_raw, z_dtype) if z is None else z
  dz, g, u = (v.astype(jnp.float32) for v in (dz, g_raw, u_raw))
  s = jax.nn.sigmoid(g)
  return dz * u * (s * (1.0 + g * (1.0 - s))), dz * (g * s), z


def train_backward_bitmask(
  dz_TxF: jax.Array,
  words_TxW: jax.Array,
  g_sel_TxK: jax.Array,
  u_sel_TxK: jax.Array,
  z_sel_TxK: jax.Array | None = None,
  *,
  config: StreamConfig | None = None,
  interpret: bool | None = None,
  fused: bool = False,
) -> tuple[jax.Array, ...]:
  """(dg_TxF, du_TxF in dz's dtype, z_TxF in z_sel's / u_sel's dtype), zero off the selection;
  fused: (dgu_Tx2F = [dG | dU], z_TxF). The default walk is picked outside the jit."""
  f = dz_TxF.shape[-1]
  sc = config or backward_config(f)
  if sc.mode == "auto":
    from pallas_kernels import _mgpu_stream, mgpu_backward

    k, same = g_sel_TxK.shape[1], len({a.dtype for a in (dz_TxF, g_sel_TxK, u_sel_TxK)}) == 1
    ok = same and _mgpu_stream.usable(
      dz_TxF.dtype, f, k, mgpu_backward.K_MULTIPLE, tu.default_interpret(interpret)
    )
    sc = dataclasses.replace(sc, mode="mgpu") if ok else _triton_walk(f)
  kw = dict(sc=sc, interpret=interpret, fused=fused)
  return _train_backward_bitmask(dz_TxF, words_TxW, g_sel_TxK, u_sel_TxK, z_sel_TxK, **kw)


@functools.partial(jax.jit, static_argnames=("sc", "interpret", "fused"))
def _train_backward_bitmask(
  dz_TxF, words_TxW, g_sel_TxK, u_sel_TxK, z_sel_TxK, *, sc, interpret, fused
):
  interpret = tu.default_interpret(interpret)
  if sc.mode == "mgpu":
    from pallas_kernels import mgpu_backward

    kw = dict(fused=fused, interpret=interpret)
    return mgpu_backward.backward(dz_TxF, words_TxW, g_sel_TxK, u_sel_TxK, z_sel_TxK, **kw)
  t, f = dz_TxF.shape
  has_z = z_sel_TxK is not None
  z_dtype = (z_sel_TxK if has_z else u_sel_TxK).dtype
  kernel = functools.partial(
    _backward_kernel, t=t, f=f, sc=sc, has_z=has_z, fused=fused, interpret=interpret
  )
  operands = (dz_TxF, words_TxW, g_sel_TxK, u_sel_TxK) + ((z_sel_TxK,) if has_z else ())
  grads = (
    [jax.ShapeDtypeStruct((t, 2 * f), dz_TxF.dtype)]
    if fused
    else [jax.ShapeDtypeStruct((t, f), dz_TxF.dtype)] * 2
  )
  return pl.pallas_call(
    kernel,
    out_shape=(*grads, jax.ShapeDtypeStruct((t, f), z_dtype)),
    grid=sc.grid(t, f),
    interpret=interpret,
    compiler_params=None if interpret else tu.compiler_params(sc.warps),
    name="moc_train_bwd_bitmask",
  )(*operands)
