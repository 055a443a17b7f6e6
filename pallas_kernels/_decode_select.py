"""Exact MoC selection for a few tokens, one program per token, the whole row on chip.

Same semantics as `reference.select`: the K largest *signed* values of G rounded to x's dtype,
ties to the lower channel index (`moc`), or the top 2 of every 8 consecutive channels
(`moc_2of8`). Values are compared through an order-preserving integer image of their bits (as
`lax.top_k` does: +0 ranks above -0). The K-th largest key is found by radix bisection, a few
bits per step (each step counts the row against 2^r candidates at once); ties at the threshold
are resolved with a prefix count, so no sort is needed. With `chunk`, the search holds the row as
equal chunks whose compare results are summed lane-wise (one block reduction per step), and the
final prefix count re-loads the row as a few wide power-of-two pieces.
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _l2_prefetch, reference, topk
from pallas_kernels import _triton_utils as tu
from pallas_kernels._topk_config import TopKConfig

F32 = jnp.float32
I32 = jnp.int32


def sortable_key(v: jax.Array) -> jax.Array:
  """int32 keys with the same order as v's values (16- or 32-bit floats)."""
  bits = jnp.dtype(v.dtype).itemsize * 8
  int_type = jnp.int16 if bits == 16 else jnp.int32
  b = jax.lax.bitcast_convert_type(v, int_type).astype(I32)
  return jnp.where(b < 0, b ^ ((1 << (bits - 1)) - 1), b)


def count_where(keys: list[jax.Array], pred) -> jax.Array:
  """#pred(key) over all the key vectors, per leading row of pred's result. Equal-width chunks
  are summed lane-wise first (adds in registers), then reduced once; pieces of different widths
  take one block reduction each."""
  ones = [pred(key).astype(I32) for key in keys]
  if len({o.shape for o in ones}) == 1:
    return jnp.sum(functools.reduce(operator.add, ones), axis=-1)
  return sum(jnp.sum(o, axis=-1) for o in ones)


def kth_largest_key(
  keys: jax.Array | list[jax.Array], k: int, num_bits: int, radix_bits: int
) -> jax.Array:
  """The largest tau with #(key >= tau) >= k over all the key vectors, built from the most
  significant bit down (a row may come as power-of-two pieces or as equal chunks)."""
  keys = keys if isinstance(keys, list) else [keys]
  lo = -(1 << (num_bits - 1))  # tau = 0 if k keys are >= 0, else lo (arithmetic, not a select:
  tau = lo - lo * (count_where(keys, lambda key: key >= 0) >= k).astype(I32)  # mis-lowers)
  bit = num_bits - 1
  while bit > 0:
    r = min(radix_bits, bit)
    bit -= r
    cands = tau | (jnp.arange(1 << r, dtype=I32) << bit)  # cands[0] = tau always qualifies

    def ge(key, cands=cands):  # explicit broadcasts: the Triton lowering needs them
      shape = (cands.shape[0], key.shape[0])
      return jnp.broadcast_to(key[None, :], shape) >= jnp.broadcast_to(cands[:, None], shape)

    digit = jnp.sum((count_where(keys, ge) >= k).astype(I32)) - 1
    tau = tau | (digit << bit)
  return tau


def _i(n: int) -> jax.Array:
  """A traced index: interpret mode's discharge rules reject static ints in ref.at[...]."""
  return jnp.int32(n)


def _topk_kernel(
  p_ref, *out_refs, splits, d_ff, chunks, pieces, k, round_dtype, radix_bits, interpret
):
  """chunks: the (offset, width) spans the K-th key is searched on; pieces: the power-of-two
  spans covering the row for the final pass (one of next_pow2(F), or `tu.pow2_chunks` with no
  padded lanes beyond a granule). A piece that is not a chunk is re-loaded (from L1/L2) and
  rounded again: the same keys."""
  t = pl.program_id(0)

  def load(off, w):  # lanes, G rounded like the reference, keys (padding below every real key)
    lane = off + jnp.arange(w, dtype=I32)
    valid = lane < d_ff
    g = plgpu.load(p_ref.at[_i(0), _i(0), t, pl.ds(_i(off), w)], mask=valid, other=0)
    for s in range(1, splits):
      g = g + plgpu.load(p_ref.at[_i(s), _i(0), t, pl.ds(_i(off), w)], mask=valid, other=0)
    g = g.astype(round_dtype)
    return lane, g, jnp.where(valid, sortable_key(g), jnp.iinfo(jnp.int32).min)

  loaded = {span: load(*span) for span in chunks}
  keys = [key for _, _, key in loaded.values()]
  tau = kth_largest_key(keys, k, jnp.dtype(round_dtype).itemsize * 8, radix_bits)
  need = k - count_where(keys, lambda key: key > tau)
  carry = jnp.int32(0)  # both prefix counts of the pieces before, packed like `both`
  for off, w in pieces:
    lane, g, key = loaded.get((off, w)) or load(off, w)
    above, tied = key > tau, key == tau
    # One scan for both prefix counts (each < 2^16): ties kept up to `need`, list slots.
    packed = above.astype(I32) | (tied.astype(I32) << 16)
    both = jnp.cumsum(packed) + carry
    carry = carry + jnp.sum(packed)
    ties_before = both >> 16
    selected = above | (tied & (ties_before <= need))
    if len(out_refs) == 1:
      a = jnp.where(selected, tu.silu(g.astype(F32)), 0.0)
      plgpu.store(out_refs[0].at[t, pl.ds(_i(off), w)], a)
      continue
    # list slot (selected channels stay ascending): the aboves so far plus the ties kept so far
    pos = (both & 0xFFFF) + jnp.minimum(ties_before, need) - 1
    _store_list(out_refs, t, pos, lane, tu.silu(g.astype(F32)), selected, interpret)


def _store_list(out_refs, t, pos, channel, a, selected, interpret):
  """idx_ref[t, pos] = channel and a_ref[t, pos] = a where selected (a scatter)."""
  idx_ref, a_ref = out_refs
  rows = jnp.broadcast_to(t, pos.shape).astype(I32)
  tu.scatter_store(idx_ref, rows, pos, channel, selected, interpret)
  tu.scatter_store(a_ref, rows, pos, a, selected, interpret)


def _group_kernel(p_ref, *out_refs, splits, num_groups, width, round_dtype, interpret):
  t = pl.program_id(0)
  g0 = pl.program_id(1) * width  # this program's first group
  valid = g0 + jnp.arange(width) < num_groups
  rows = pl.ds(g0, width)

  def load(*idx):  # G rounded like the reference, for group rows and the given lanes
    v = plgpu.load(p_ref.at[(_i(0), _i(0), t, rows, *idx)], mask=_bcast(valid, idx), other=0)
    for s in range(1, splits):
      v = v + plgpu.load(p_ref.at[(_i(s), _i(0), t, rows, *idx)], mask=_bcast(valid, idx), other=0)
    return v.astype(round_dtype)

  g = load(slice(None))  # (width, 8)
  key = sortable_key(g)
  lane = jnp.arange(reference.GROUP)[None, :]
  rank = jnp.zeros(key.shape, I32)
  for j in range(reference.GROUP):  # how many lanes of the group beat each lane
    other = sortable_key(load(_i(j)))[:, None]
    rank += ((other > key) | ((other == key) & (j < lane))).astype(I32)
  selected = rank < reference.PER_GROUP
  if len(out_refs) == 1:
    a = jnp.where(selected, tu.silu(g.astype(F32)), 0.0)
    plgpu.store(out_refs[0].at[t, rows, :], a, mask=valid[:, None])
    return
  group = g0 + jnp.arange(width, dtype=I32)[:, None]
  sel = selected.astype(I32)
  pos = reference.PER_GROUP * group + jnp.cumsum(sel, axis=1) - sel  # selected lanes before
  channel = jnp.broadcast_to(group * reference.GROUP + lane, pos.shape)
  ok = selected & valid[:, None]
  _store_list(out_refs, t, pos, channel, tu.silu(g.astype(F32)), ok, interpret)


def _bcast(valid: jax.Array, idx: tuple) -> jax.Array:
  return valid[:, None] if isinstance(idx[0], slice) else valid


def select_scale(
  partials: jax.Array,
  k: int,
  variant: str,
  *,
  d_ff: int,
  round_dtype,
  warps: int = 8,
  radix_bits: int = 2,
  lists: bool = False,
  interpret: bool = False,
  granule: int = 0,
  chunk: int = 0,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """From fp32 G partials (splits, 1, T, W ≥ F, W a power of 2) to the selection.

  lists=False: a_TxW = silu(G) on the selected channels, 0 elsewhere.
  lists=True: (idx_TxK int32 ascending, a_TxK = silu(G) at idx), K = F // 4 for moc_2of8.
  granule: 0 = the `moc` select works on one W-wide block; else on power-of-two pieces covering F
  rounded up to the granule (5464 -> 4096 + 1024 + 512 lanes instead of 8192).
  chunk: 0 = the search works on the pieces above; else on ceil(F / chunk) chunks of `chunk` lanes
  (compare results summed lane-wise: one block reduction per radix step), and the final pass on
  pieces of `granule or 256`.
  """
  splits, _, num_tokens, width = partials.shape
  params = plgpu.CompilerParams(num_warps=warps, num_stages=1)
  if variant == "moc_2of8":
    k = d_ff // reference.GROUP * reference.PER_GROUP
  elif variant != "moc":
    raise ValueError(f"unknown MoC variant {variant!r}; expected 'moc' or 'moc_2of8'")
  if lists:
    out_shape = (
      jax.ShapeDtypeStruct((num_tokens, k), I32),
      jax.ShapeDtypeStruct((num_tokens, k), F32),
    )
  if variant == "moc":
    pieces = ((0, width),)
    if granule or chunk:
      pieces = tuple(tu.pow2_chunks(d_ff, min(granule or 256, width)))
    c = min(chunk, tu.next_pow2(d_ff))
    chunks = tuple((off, c) for off in range(0, d_ff, c)) if chunk else pieces
    kernel = functools.partial(
      _topk_kernel,
      splits=splits,
      d_ff=d_ff,
      chunks=chunks,
      pieces=pieces,
      k=k,
      round_dtype=round_dtype,
      radix_bits=radix_bits,
      interpret=interpret,
    )
    if not lists:
      out_shape = jax.ShapeDtypeStruct((num_tokens, width), F32)
    return pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(num_tokens,),
      compiler_params=params,
      interpret=interpret,
      name="decode_select",
    )(partials)
  group = reference.GROUP
  p8 = partials.reshape(splits, 1, num_tokens, width // group, group)
  kernel = functools.partial(
    _group_kernel,
    splits=splits,
    num_groups=d_ff // group,
    width=width // group,
    round_dtype=round_dtype,
    interpret=interpret,
  )
  if not lists:
    out_shape = jax.ShapeDtypeStruct((num_tokens, width // group, group), F32)
  out = pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=(num_tokens, 1),  # one program per token holds all width // 8 groups
    compiler_params=params,
    interpret=interpret,
    name="decode_select_2of8",
  )(p8)
  return out if lists else out.reshape(num_tokens, width)


# --- the training top-K kernel on the gate GEMV's split partials ----------------------------


def _sum_partials(p_ref, rows_b, cols_b, valid, *, splits: int, t: int, dtype):
  """G = Σ_s partial_s in fp32 (rows s·t … s·t + t - 1 of p_ref), rounded to dtype."""
  parts = [plgpu.load(p_ref.at[rows_b + s * t, cols_b], mask=valid, other=0) for s in range(splits)]
  return functools.reduce(operator.add, parts).astype(dtype)


def topk_call(
  g2: jax.Array, kernel, t: int, k: int, dtype, cfg: TopKConfig, name: str, warm=None
) -> tuple[jax.Array, jax.Array]:
  """The top-K `kernel` over g2's rows; with warm=(weight, DecodeConfig), compiled, in the same
  launch as programs that read the start of that weight into L2 (`_l2_prefetch`)."""
  interpret = kernel.keywords["interpret"]
  if warm is None or interpret:  # the warming changes no value; interpret mode runs without
    return topk.select_call(kernel, t, k, dtype, cfg.rows, cfg, interpret, name)(g2)
  weight, dcfg = warm
  return _l2_prefetch.call(
    kernel,
    (g2,),
    out_shape=(jax.ShapeDtypeStruct((t, k), I32), jax.ShapeDtypeStruct((t, k), dtype)),
    grid=pl.cdiv(t, cfg.rows),
    warm=[(weight, dcfg.warm_bytes)],
    programs=dcfg.warm_programs,
    compiler_params=tu.compiler_params(cfg.num_warps),
    name=name + "_warm",
  )


def topk_from_partials(
  partials_SxTxF: jax.Array,
  k: int,
  d_ff: int,
  dtype,
  cfg: TopKConfig,
  interpret: bool,
  warm=None,
) -> tuple[jax.Array, jax.Array]:
  """`topk.select` ('moc') of G = Σ_s partials_SxTxF[s, :, :d_ff] rounded to dtype: the sum of
  the split partials is done as the select loads them, not by XLA as a launch of its own
  (idx_TxK ascending, G_TxK in dtype). warm: see `topk_call`."""
  splits, t, _ = partials_SxTxF.shape
  load = functools.partial(_sum_partials, splits=splits, t=t, dtype=jnp.dtype(dtype))
  kernel = functools.partial(
    topk._topk_kernel, t=t, f=d_ff, k=k, cfg=cfg, interpret=interpret, load=load, dtype=dtype
  )
  g2 = partials_SxTxF.reshape(splits * t, -1)
  return topk_call(g2, kernel, t, k, dtype, cfg, "moc_select_partials", warm)


def topk_rows(g_TxF: jax.Array, k: int, cfg: TopKConfig, interpret: bool, warm=None):
  """`topk.select` ('moc') of G's rows, G already in its dtype. warm: see `topk_call`."""
  t, f = g_TxF.shape
  kernel = functools.partial(topk._topk_kernel, t=t, f=f, k=k, cfg=cfg, interpret=interpret)
  return topk_call(g_TxF, kernel, t, k, g_TxF.dtype, cfg, "moc_select", warm)
