"""Warm L2 with a weight that the next kernels will read, from a latency-bound kernel's idle SMs.

Why: at T = 1 the MoC decode's top-K runs one program on one SM for ~7 µs while HBM idles
between the gate GEMV and the rows kernel. More programs in the same launch can read the next
layer's attention weight (q, k and v: 25 MB at the 1b preset), so that its GEMV finds those
lines in L2 (50 MB on the H200). The loads ask L2 to keep their lines (`evict_last`) and feed a
sum stored to a small sink output, so that the compiler keeps them; the sink is never read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BLOCK = 4096  # elements per load step of a warming program


def _warm(w_ref, sink_ref, program, *, n: int, steps: int) -> None:
  """Read this warming program's `steps` blocks of the flat weight; store their sum."""

  def step(i, acc):
    start = (program * steps + i) * BLOCK
    ok = start + jnp.arange(BLOCK) < n
    w = pltriton.load(w_ref.at[pl.ds(start, BLOCK)], mask=ok, other=0, eviction_policy="evict_last")
    return acc + w.astype(jnp.float32)

  acc = lax.fori_loop(0, steps, step, jnp.zeros((BLOCK,), jnp.float32))
  pltriton.store(sink_ref.at[pl.ds(program, 1)], jnp.sum(acc, keepdims=True))


def _plan(warm: jax.Array, max_bytes: int, programs: int) -> tuple[jax.Array, int, int]:
  """(flat weight, elements to read, load steps per warming program)."""
  flat = warm.reshape(-1)
  n = min(flat.size, max_bytes // flat.dtype.itemsize)
  return flat, n, pl.cdiv(n, programs * BLOCK)


def warm_sums(warm: jax.Array, *, max_bytes: int, programs: int, interpret: bool) -> jax.Array:
  """The warming programs alone: per program the fp32 sum of what it read (together, the
  first max_bytes of `warm`). Interpret mode runs them this way, beside the kernel."""
  flat, n, steps = _plan(warm, max_bytes, programs)
  return pl.pallas_call(
    lambda w_ref, sink_ref: _warm(w_ref, sink_ref, pl.program_id(0), n=n, steps=steps),
    out_shape=jax.ShapeDtypeStruct((programs,), jnp.float32),
    grid=(programs,),
    interpret=interpret,
    name="l2_warm",
  )(flat)


def call(
  kernel: Callable,
  inputs: Sequence[jax.Array],
  *,
  out_shape: Sequence[jax.ShapeDtypeStruct],
  grid: int,
  warm: jax.Array,
  max_bytes: int,
  programs: int,
  compiler_params,
  name: str,
) -> tuple[jax.Array, ...]:
  """`kernel(*input_refs, *output_refs)` over a 1-D grid of `grid` programs, in one launch with
  `programs` more that read the first `max_bytes` of `warm` into L2. Returns the kernel's
  outputs only: the same values as its own pallas_call. Compiled only: interpret mode cannot
  branch on the program id (callers run the kernel alone there; `warm_sums` tests the warming
  programs)."""
  flat, n, steps = _plan(warm, max_bytes, programs)
  num_inputs = len(inputs)

  def body(*refs):
    ins, w_ref = refs[:num_inputs], refs[num_inputs]
    outs, sink_ref = refs[num_inputs + 1 : -1], refs[-1]
    pid = pl.program_id(0)

    @pl.when(pid < grid)
    def _main():
      kernel(*ins, *outs)

    @pl.when(pid >= grid)
    def _warming():
      _warm(w_ref, sink_ref, pid - grid, n=n, steps=steps)

  *outs, _ = pl.pallas_call(
    body,
    out_shape=(*out_shape, jax.ShapeDtypeStruct((programs,), jnp.float32)),
    grid=(grid + programs,),
    compiler_params=compiler_params,
    name=name,
  )(*inputs, flat)
  return tuple(outs)
