"""Warm L2 with weights that the next kernels will read, from a latency-bound kernel's idle SMs.

Why: at T = 1 several decode kernels keep a few SMs busy for microseconds while HBM idles: the
MoC top-K (one program on one SM, ~7 µs) and the attention (one program per head: 16 SMs of
132 at the 1b preset, ~7 µs). More programs in the same launch can read the weights read next
(the next layer's q, k and v; the output projection and the FFN's first weights), so that
their GEMVs find those lines in L2 (50 MB on the H200). The loads ask L2 to keep their lines
(`evict_last`) and feed a sum stored to a small sink output, so that the compiler keeps them;
the sink is never read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BLOCK = 4096  # elements per load step of a warming program
Warm = tuple[jax.Array, int]  # a weight and how many of its first bytes to read


def _warm(w_ref, sink_ref, program, sink_at, *, n: int, steps: int) -> None:
  """Read this warming program's `steps` blocks of the flat weight; store their sum."""

  def step(i, acc):
    start = (program * steps + i) * BLOCK
    ok = start + jnp.arange(BLOCK) < n
    w = pltriton.load(w_ref.at[pl.ds(start, BLOCK)], mask=ok, other=0, eviction_policy="evict_last")
    return acc + w.astype(jnp.float32)

  acc = lax.fori_loop(0, steps, step, jnp.zeros((BLOCK,), jnp.float32))
  pltriton.store(sink_ref.at[pl.ds(sink_at, 1)], jnp.sum(acc, keepdims=True))


def _plan(warm: Sequence[Warm], programs: int) -> list[tuple[jax.Array, int, int, int]]:
  """Per weight with bytes to read: (flat weight, elements to read, its first warming program,
  its number of programs). Programs are shared in proportion to bytes, at least one each."""
  parts = []
  for w, max_bytes in warm:
    flat = w.reshape(-1)
    n = min(flat.size, max(0, max_bytes) // flat.dtype.itemsize)
    if n:
      parts.append((flat, n))
  if len(parts) > programs:
    raise ValueError(f"{len(parts)} weights to warm need at least as many programs, got {programs}")
  total = sum(n * f.dtype.itemsize for f, n in parts)
  plan, first = [], 0
  for i, (flat, n) in enumerate(parts):
    left = len(parts) - i - 1  # programs the weights after this one still need
    share = round(programs * n * flat.dtype.itemsize / total) if left else programs - first
    count = max(1, min(share, programs - first - left))
    plan.append((flat, n, first, count))
    first += count
  return plan


def _warm_any(w_refs, sink_ref, program, plan) -> None:
  """Warming program `program` (0 … programs - 1) reads its share of the weight it is given."""
  for w_ref, (_, n, first, count) in zip(w_refs, plan, strict=True):
    steps = pl.cdiv(n, count * BLOCK)
    mine = (program >= first) & (program < first + count)
    run = lambda w_ref=w_ref, first=first, n=n, steps=steps: _warm(
      w_ref, sink_ref, program - first, program, n=n, steps=steps
    )
    pl.when(mine)(run)


def warm_sums(warm: Sequence[Warm], *, programs: int, interpret: bool) -> jax.Array:
  """The warming programs alone: per program the fp32 sum of what it read (together, the
  first bytes of each weight that `warm` asks for). Interpret mode runs them this way, beside
  the kernel."""
  plan = _plan(warm, programs)
  return pl.pallas_call(
    lambda *refs: _warm_any(refs[:-1], refs[-1], pl.program_id(0), plan),
    out_shape=jax.ShapeDtypeStruct((programs,), jnp.float32),
    grid=(programs,),
    interpret=interpret,
    name="l2_warm",
  )(*(flat for flat, *_ in plan))


def call(
  kernel: Callable,
  inputs: Sequence[jax.Array],
  *,
  out_shape: Sequence[jax.ShapeDtypeStruct],
  grid: int,
  warm: Sequence[Warm],
  programs: int,
  compiler_params,
  name: str,
  input_output_aliases: dict[int, int] | None = None,
) -> tuple[jax.Array, ...]:
  """`kernel(*input_refs, *output_refs)` over a 1-D grid of `grid` programs, in one launch with
  `programs` more that read the first bytes of each weight in `warm` into L2. Returns the
  kernel's outputs only: the same values as its own pallas_call (input_output_aliases as
  there; the weights and the sink come after the kernel's inputs and outputs). Compiled only:
  interpret mode cannot branch on the program id (callers run the kernel alone there;
  `warm_sums` tests the warming programs)."""
  plan = _plan(warm, programs)
  num_inputs, num_weights = len(inputs), len(plan)

  def body(*refs):
    ins, w_refs = refs[:num_inputs], refs[num_inputs : num_inputs + num_weights]
    outs, sink_ref = refs[num_inputs + num_weights : -1], refs[-1]
    pid = pl.program_id(0)

    @pl.when(pid < grid)
    def _main():
      kernel(*ins, *outs)

    @pl.when(pid >= grid)
    def _warming():
      _warm_any(w_refs, sink_ref, pid - grid, plan)

  *outs, _ = pl.pallas_call(
    body,
    out_shape=(*out_shape, jax.ShapeDtypeStruct((programs,), jnp.float32)),
    grid=(grid + programs,),
    compiler_params=compiler_params,
    name=name,
    input_output_aliases=input_output_aliases or {},
  )(*inputs, *(flat for flat, *_ in plan))
  return tuple(outs)
