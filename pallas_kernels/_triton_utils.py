"""Small helpers shared by the Pallas-Triton kernels: compiler params, keys, row chunks.

Kept apart so `topk.py` and `moc_train.py` share one definition of the order-preserving
key, which is what makes their selections identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

KEY_BITS = {jnp.dtype(jnp.bfloat16): 16, jnp.dtype(jnp.float16): 16, jnp.dtype(jnp.float32): 32}


def compiler_params(num_warps: int, num_stages: int = 1):
  """Triton compiler params under either name (jax 0.10/0.11: `CompilerParams`)."""
  from jax.experimental.pallas import triton as pltriton

  cls = getattr(pltriton, "CompilerParams", None)
  if cls is None:  # older jax spelled it plgpu.TritonCompilerParams
    from jax.experimental.pallas import gpu as plgpu  # type: ignore[attr-defined]

    cls = plgpu.TritonCompilerParams
  return cls(num_warps=num_warps, num_stages=num_stages)


def default_interpret(interpret: bool | None = None) -> bool:
  """`interpret` if given; else compile for the GPU when there is one, or run the kernel body
  in interpret mode."""
  return jax.default_backend() != "gpu" if interpret is None else interpret


def sm_count() -> int:
  """Streaming multiprocessors of the first device (132 on an H100 / H200, and where the
  device does not say: CPUs, interpret mode), for grids sized by residency."""
  return getattr(jax.devices()[0], "core_count", None) or 132


def silu(v: jax.Array) -> jax.Array:
  """v · sigmoid(v), spelled so that the Triton lowering takes it as is."""
  return v / (1.0 + jnp.exp(-v))


def program_ids(grid: tuple[int, ...], flat: bool) -> tuple:
  """This program's index on each axis of `grid`: read from the grid, or (flat: the programs
  launched as one axis of prod(grid), as beside `_l2_prefetch`'s warming programs)
  unravelled from program 0's axis, the last axis fastest."""
  if not flat:
    return tuple(pl.program_id(axis) for axis in range(len(grid)))
  pid, ids = pl.program_id(0), []
  for size in reversed(grid[1:]):
    ids.append(pid % size)
    pid = pid // size
  return (pid, *reversed(ids))


def fori_prefetched(steps, load, update, init, *, prefetch: bool, first=None):
  """`lax.fori_loop(0, steps, lambda i, c: update(i, c, load(i)), init)`; with prefetch, step
  i + 1's `load` is issued before step i's `update` and carried (`first`: load(0), if the
  caller issued it earlier). Why: Triton software-pipelines only loops around tl.dot, so in a
  multiply-reduce loop each step otherwise waits a whole memory round trip for its own loads.
  The loads past the last step must be masked (they then move no bytes)."""
  if not prefetch:
    return lax.fori_loop(0, steps, lambda i, carry: update(i, carry, load(i)), init)

  def body(i, carry):
    state, step = carry
    ahead = load(i + 1)  # traced first, so issued before this step's arithmetic
    return update(i, state, step), ahead

  out, _ = lax.fori_loop(0, steps, body, (init, load(0) if first is None else first))
  return out


def key_bits(dtype) -> int:
  """Width of the order-preserving integer key for a float dtype."""
  try:
    return KEY_BITS[jnp.dtype(dtype)]
  except KeyError:
    raise TypeError(f"top-K supports bf16, f16 and f32, got {dtype}") from None


def order_keys(x: jax.Array) -> jax.Array:
  """int32 keys whose signed order is the floats' order (-0 < +0; NaNs at the ends).

  16-bit floats give keys in [-32768, 32767], so they are exact in fp32 as well.
  """
  bits = key_bits(x.dtype)
  if bits == 32:
    b = lax.bitcast_convert_type(x, jnp.int32)
    return b ^ ((b >> 31) & 0x7FFFFFFF)
  b = lax.bitcast_convert_type(x, jnp.int16).astype(jnp.int32)
  return b ^ ((b >> 15) & 0x7FFF)


def key_to_value(key: jax.Array, dtype) -> jax.Array:
  """The inverse of `order_keys`: int32 keys back to floats of `dtype`, bit-exact."""
  bits = key_bits(dtype)
  if bits == 32:
    return lax.bitcast_convert_type(key ^ ((key >> 31) & 0x7FFFFFFF), dtype)
  b = (key ^ ((key >> 15) & 0x7FFF)).astype(jnp.int16)
  return lax.bitcast_convert_type(b, dtype)


def key_range(dtype) -> tuple[int, int]:
  """(smallest, largest) key a real element can have."""
  bits = key_bits(dtype)
  return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def pow2_chunks(num: int, granule: int) -> list[tuple[int, int]]:
  """Cover [0, num) with power-of-two (offset, width) pieces, none narrower than `granule`.

  Triton blocks must be powers of two; one block of next_pow2(F) wastes up to half its
  lanes (5632 -> 8192), while 4096 + 1024 + 512 wastes none.
  """
  total = -(-num // granule) * granule
  chunks, offset = [], 0
  width = 1 << (total.bit_length() - 1)
  while offset < total:
    while width > total - offset:
      width //= 2
    chunks.append((offset, width))
    offset += width
  return chunks


def lane_iota(off: int, w: int, interpret: bool, hide: bool = True) -> jax.Array:
  """off + arange(w), hidden from Triton's contiguity analysis (an inline-PTX identity).

  A load through provably contiguous indices gets a vectorized layout: each thread owns 8
  neighbouring bf16 columns, so the 32 lanes of a warp sit 8 columns apart. Scattered
  stores at per-column slots (top-K) or gathers at selected channels (backward) then touch
  a different 32-byte sector from almost every lane. With the contiguity hidden, Triton uses
  one element per thread per repetition: lane i owns column i (+ 32 j), loads stay
  coalesced (64 B per warp instruction) and neighbouring lanes write neighbouring slots.
  """
  x = off + jnp.arange(w, dtype=jnp.int32)
  return hide_contiguity(x, interpret) if hide else x


def hide_contiguity(x: jax.Array, interpret: bool) -> jax.Array:
  """int32 identity (inline PTX) that Triton's contiguity analysis cannot see through."""
  if interpret:
    return x
  from jax.experimental.pallas import triton as pltriton

  return pltriton.elementwise_inline_asm(
    "mov.b32 $0, $1;",
    args=[x],
    constraints="=r,r",
    pack=1,
    result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.int32)],
  )[0]


def next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def scatter_store(ref, rows, cols, val, mask, interpret: bool) -> None:
  """Masked store at (rows, cols) index arrays.

  Interpret mode discharges a masked store as `ref.at[idx].set(where(mask, val, old))`,
  so a masked-off lane that shares a slot with a real one can clobber it; sending
  masked-off lanes past the end (dropped by the scatter) keeps it exact. On the GPU the
  mask alone suffices.
  """
  from jax.experimental.pallas import triton as pltriton

  if interpret:
    cols = jnp.where(mask, cols, ref.shape[-1])
  pltriton.store(ref.at[rows, cols], val, mask=mask)
