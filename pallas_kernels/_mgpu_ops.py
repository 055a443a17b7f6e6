"""The Mosaic GPU radix select's ops (`mgpu_select`): PTX on the GPU (`_mgpu_ptx`), jnp in
interpret mode (CPU tests), where each op is its jnp equivalent on the whole array, barriers
and waits are no-ops and TMA copies assignments.
"""

from __future__ import annotations

import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _mgpu_compact
from pallas_kernels import _mgpu_ptx as ptx
from pallas_kernels._mgpu_ptx import BINS, I32


def keep_lowest(x, m):
  """The lowest m set bits of each int32 x (0 <= m <= 32): x masked below the smallest bit
  position p with m set bits under it, p found by a 6-step binary search (the jnp form of the
  kernel's PTX `fns`)."""
  lo, hi = jnp.zeros_like(x), jnp.full_like(x, 32)
  below = lambda p: jnp.where(p >= 32, -1, lax.shift_left(jnp.ones_like(x), p) - 1)
  for _ in range(6):
    mid = lax.shift_right_logical(lo + hi, 1)
    enough = lax.population_count(x & below(mid)) >= m
    lo, hi = jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)
  return x & below(hi)


def _pack_words(bits_F):
  """A row's booleans as (F / 32) int32 words, bit c % 32 of word c // 32."""
  weights = lax.shift_left(jnp.ones((32,), I32), jnp.arange(32, dtype=I32))
  return jnp.sum(bits_F.reshape(-1, 32).astype(I32) * weights, axis=1, dtype=I32)


class SelectOps:
  """The select kernel's warp-level ops: inline PTX on the GPU, jnp in interpret mode (one
  CTA's program as one array program; barriers and waits are no-ops there).

  Row arrays (F keys, one per register) and bins arrays (256, two per thread):
    count_high(key, ref) / count_low(key, high, ref): ref[digit] += 1 per valid key;
    ballot_words(key, v, above_ref, equal_ref): the words of keys > v / == v;
    select_bin(h, base, tmp_ref, slot): tmp[slot + 4 : slot + 6] = (b, S[b + 1]);
    exclusive_prefix(x, tmp_ref, slot); popcount(x); keep_lowest(x, m); stash_row(bits,
    row_ref) and compact(words, first, row_ref, idx_ref, val_ref) for the whole top-K;
    splat(x): a traced scalar as a bins array; barrier, commit, copy_out, wait_read, wait.
  Scalars (high, v, base) are bins arrays of one value (`splat`). popcount and keep_lowest
  are PTX `popc` and `fns` on the GPU. ballot_lanes: `_mgpu_ptx.ballot_words`'s lanes (the
  same words, fewer stores); balanced_walk: `compact` by `_mgpu_compact.compact_balanced` (the
  same slots, every thread walking as many keys; both PTX only)."""

  def __init__(
    self,
    f: int,
    k: int,
    num_valid: int,
    interpret: bool,
    ballot_lanes: bool = False,
    balanced_walk: bool = False,
    fetch_width: int | None = None,
  ):
    self.row_layout = plgpu.Layout.WG_STRIDED((f,), vec_size=1)
    self.bin_layout = plgpu.Layout.WG_STRIDED((BINS,), vec_size=2)
    self._f, self._k, self._nv, self.interpret = f, k, num_valid, interpret
    self._fetch = fetch_width or f  # `fetch_row`'s columns (the select reads the first F)
    self._ballot_lanes, self._balanced_walk = ballot_lanes, balanced_walk
    self._built: dict = {}
    if interpret:
      self.barrier = self.commit = self.wait_read = self.wait = lambda: None
      self.copy_out = _assign
      self.cast = lambda x, layout: x
      return
    self.cast = plgpu.layout_cast
    self.barrier = ptx.barrier
    self.commit = plgpu.commit_smem
    self.copy_out = plgpu.copy_smem_to_gmem  # TMA: a bulk copy of the contiguous row
    self.wait_read = lambda: plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    self.wait = lambda: plgpu.wait_smem_to_gmem(0)

  def _op(self, name: str, make, *args):
    if name not in self._built:
      self._built[name] = make(*args)
    return self._built[name]

  def load_row(self, ref, r):
    """ref[r, :F], one element per register."""
    if self.interpret:
      return ref[r, pl.ds(0, self._f)]
    return plgpu.load(ref, (r, pl.ds(0, self._f)), layout=self.row_layout)

  def fetch_row(self, src_ref, r, rows_ref, slot, barriers) -> None:
    """rows[slot] = src[r, :fetch_width] by bulk async copy (arrival on barriers[slot])."""
    if self.interpret:
      rows_ref[slot] = src_ref[r, pl.ds(0, self._fetch)]
      return
    src = src_ref.at[r, pl.ds(0, self._fetch)]
    promise = plgpu.OOBFillMode.PROMISE_IN_BOUNDS  # a contiguous row: one cp.async.bulk
    plgpu.copy_gmem_to_smem(src, rows_ref.at[slot], barriers.at[slot], oob_mode=promise)

  def wait_row(self, barriers, slot) -> None:
    if not self.interpret:
      plgpu.barrier_wait(barriers.at[slot])

  def prefetch(self, warm_refs, num_bytes, chunks, first_cta: int) -> None:
    """A warming CTA's share of each weight, asked of L2 (`_mgpu_ptx.prefetch_share`)."""
    op = self._op("prefetch", ptx.prefetch_share, tuple(num_bytes), tuple(chunks), first_cta)
    op(*warm_refs)

  def splat(self, x):
    return self.cast(jnp.full((BINS,), x, I32), self.bin_layout)

  def _valid_key(self, key):
    return jnp.arange(self._f) < self._nv

  def count_high(self, key, ref) -> None:
    if self.interpret:
      return _scatter_add(ref, key >> 8, self._valid_key(key))
    rl, bl, nv = self.row_layout, self.bin_layout, self._nv
    self._op("count_high", ptx.count, rl, bl, nv, False)(key, ref)

  def count_low(self, key, high, ref) -> None:
    if self.interpret:
      return _scatter_add(ref, key & 0xFF, self._valid_key(key) & (key >> 8 == high[0]))
    rl, bl, nv = self.row_layout, self.bin_layout, self._nv
    self._op("count_low", ptx.count, rl, bl, nv, True)(key, high, ref)

  def ballot_words(self, key, v, above_ref, equal_ref) -> None:
    if self.interpret:
      nw, valid = self._f // 32, self._valid_key(key)
      zeros = jnp.zeros((BINS,), I32)
      above_ref[...] = zeros.at[:nw].set(_pack_words(valid & (key > v[0])))
      equal_ref[...] = zeros.at[:nw].set(_pack_words(valid & (key == v[0])))
      return
    rl, bl, nv = self.row_layout, self.bin_layout, self._nv
    op = self._op("ballot", ptx.ballot_words, rl, bl, nv, self._ballot_lanes)
    op(key, v, above_ref, equal_ref)

  def popcount(self, x):
    if self.interpret:
      return lax.population_count(x)
    return self._op("popc", ptx.map_bins, self.bin_layout, ptx.POPC, 1)(x)

  def keep_lowest(self, x, m):
    """The lowest m set bits of each word (m < 1: none; m > 32: all)."""
    if self.interpret:
      return keep_lowest(x, jnp.clip(m, 0, 32))
    return self._op("keep_lowest", ptx.map_bins, self.bin_layout, ptx.KEEP_LOWEST, 2)(x, m)

  def select_bin(self, h, base, tmp_ref, slot: int, clear_ref) -> None:
    """clear_ref: the histogram h came from, zeroed for the next row (each thread its own two
    bins; the next adds come after this op's barriers)."""
    if self.interpret:
      clear_ref[...] = jnp.zeros_like(clear_ref[...])
      s = jnp.cumsum(h[::-1])[::-1] + base[0]
      b = jnp.max(jnp.where(s >= self._k, jnp.arange(BINS), -1))
      tmp_ref[slot + 4] = b
      tmp_ref[slot + 5] = jnp.concatenate([s, base[:1]])[b + 1]
      return
    op = self._op(f"select_bin{slot}", ptx.select_bin, self.bin_layout, self._k, slot)
    op(h, base, tmp_ref, clear_ref)

  def exclusive_prefix(self, x, tmp_ref, slot: int):
    if self.interpret:
      return jnp.cumsum(x) - x
    return self._op(f"prefix{slot}", ptx.exclusive_prefix, self.bin_layout, slot)(x, tmp_ref)

  def stash_row(self, bits, row_ref) -> None:
    """row[c] = element c's 16 bits: the row's values, for `compact` to read by channel."""
    if self.interpret:
      row_ref[...] = bits.astype(row_ref.dtype)
      return
    self._op("stash", ptx.stash_row, self.row_layout, self._f)(bits, row_ref)

  def compact(self, words, first, row_ref, out_ref, idx_ref, words_ref, first_ref) -> None:
    """out[slot] = row[c] and idx[slot] = c for each selected channel c, a set bit of the
    row's words (bins arrays, words past the row zero; first: each word's first slot), slot
    its word's first slot plus the set bits below it. words_ref: the row's words in shared
    memory, first_ref: 256 int32 of scratch (balanced_walk reads them)."""
    if self.interpret:
      chan, _, slot = slots_in_jnp(words, first, self._f, self._k)
      bits = lax.bitcast_convert_type(row_ref[...], out_ref.dtype)  # bf16 rows: their bits
      for values, ref in ((bits, out_ref), (chan, idx_ref)):
        ref[...] = ref[...].at[slot].set(values, mode="drop")  # slot K: dropped
      return
    if self._balanced_walk:
      op = self._op("balanced", _mgpu_compact.compact_balanced, self.bin_layout, self._k)
      return op(first, words_ref, first_ref, row_ref, out_ref, idx_ref)
    op = self._op("compact", _mgpu_compact.compact, self.bin_layout)
    op(words, first, row_ref, out_ref, idx_ref)


def slots_in_jnp(words, first, f: int, k: int):
  """(channels, each selected, its slot or K) for a row's words (bins arrays) and each word's
  first slot: a compaction's walk as jnp (interpret mode)."""
  chan = jnp.arange(f, dtype=I32)
  w = words[chan >> 5]
  sel = lax.shift_right_logical(w, chan & 31) & 1 == 1
  below = w & (lax.shift_left(jnp.ones_like(chan), chan & 31) - 1)
  return chan, sel, jnp.where(sel, first[chan >> 5] + lax.population_count(below), k)


def rows_in_turn(t: int, ctas: int, pid, one_row) -> None:
  """one_row(r, i) for this CTA's rows r = pid + i · ctas < T, in turn (CTAs take rows
  round-robin; the last round has rows for only some CTAs when ctas does not divide T)."""

  def row(i, carry):
    r = pid + i * ctas
    if t % ctas:
      pl.when(r < t)(lambda: one_row(r, i))
    else:
      one_row(r, i)
    return carry

  lax.fori_loop(0, pl.cdiv(t, ctas), row, 0)


def _scatter_add(ref, index, where) -> None:
  cur = ref[...]
  ref[...] = cur.at[jnp.where(where, index, cur.shape[0])].add(1, mode="drop")


def _assign(src_ref, dst_ref) -> None:
  dst_ref[...] = src_ref[...]
