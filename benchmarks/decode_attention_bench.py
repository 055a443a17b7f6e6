"""One decode step's attention and cache update: XLA (the model's `xla` path) vs the Pallas kernel.

Per step: write the new token's k, v at slot pos of a (B, S, H, E) bf16 cache and attend to
slots 0…pos, at the 1b preset's heads (16 × 128). As in the decode loop, STEPS steps run in a
`fori_loop` that carries the caches (so both paths may update them in place; each call copies
its caches once on entry, the same for both). Each figure is the median over trials of R
dispatches of a chain of C such calls, each on its own caches (none shared: L2 holds none of
them at 4096 slots), divided by R·C·STEPS (`decode_timing`). `full` rows end at pos = S - 1,
`half` rows run from pos = S/2, where the kernel reads about half the cache.

  python benchmarks/decode_attention_bench.py [--quick] [--out=benchmarks/results/x.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common
import jax
import jax.numpy as jnp
from decode_timing import chain, rel_err, run_info, time_chain

from moc_jax import decode_ops
from pallas_kernels import decode_attention

HEADS, HEAD_DIM = 16, 128


def xla_step(q, k_new, v_new, k, v, pos):
  """The model's xla decode path for one token (`decode_ops.xla_cache_attention`)."""
  one = lambda a: a[:, None]
  o, k, v = decode_ops.xla_cache_attention(one(q), one(k_new), one(v_new), k, v, one(pos))
  return o[:, 0], k, v


def kernel_step(q, k_new, v_new, k, v, pos, chunk=None):
  return decode_attention.attend(q, k, v, pos, (k_new, v_new), chunk=chunk)


def methods(slots: int) -> dict:
  """xla, the kernel at its default chunk, and the kernel at each fixed chunk below slots."""
  fixed = {f"kernel_c{c}": functools.partial(kernel_step, chunk=c) for c in CHUNKS if c < slots}
  return {"xla": xla_step, "kernel": kernel_step, **fixed}


STEPS = 16
CHUNKS = (128, 256, 512)  # slots per program, also timed as rows of their own


def steps_of(step):
  """fn(q, k_new, v_new, k, v, pos0): the sum of STEPS steps' outputs at pos0, pos0 + 1, …"""

  def run(q, k_new, v_new, k, v, pos0):
    def body(i, carry):
      k, v, acc = carry
      o, k, v = step(q, k_new, v_new, k, v, pos0 + i)
      return k, v, acc + o.astype(jnp.float32)

    return jax.lax.fori_loop(0, STEPS, body, (k, v, jnp.zeros(q.shape, jnp.float32)))[2]

  return run


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="small shapes in interpret mode (CPU)")
  p.add_argument("--calls", type=int, default=8)
  p.add_argument("--reps", type=int, default=4)
  p.add_argument("--trials", type=int, default=5)
  p.add_argument("--out", default="benchmarks/results/decode_attention.json")
  a = p.parse_args()
  batch, heads, head_dim = (1, 2, 16) if a.quick else (1, HEADS, HEAD_DIM)
  slot_counts = (64, 256) if a.quick else (256, 1024, 4096)
  calls = 2 if a.quick else a.calls
  result = {**run_info(), "method": __doc__.split("\n\n")[1], "rows": []}
  for slots in slot_counts:
    for where in ("full", "half"):
      key = jax.random.key(slots)
      pos = jnp.full((batch,), slots - STEPS if where == "full" else slots // 2, jnp.int32)
      xs, sets = [], []
      for c in range(calls):
        ks = jax.random.split(jax.random.fold_in(key, c), 5)
        q, k_new, v_new = (
          jax.random.normal(ks[i], (batch, heads, head_dim), jnp.bfloat16) for i in range(3)
        )
        k, v = (
          jax.random.normal(ks[3 + i], (batch, slots, heads, head_dim), jnp.bfloat16)
          for i in range(2)
        )
        xs.append(q)
        sets.append((k_new, v_new, k, v, pos))
      want = jax.jit(steps_of(xla_step))(xs[0], *sets[0])
      for name, step in methods(slots).items():
        row = {"slots": slots, "first_pos": int(pos[0]), "steps": STEPS, "method": name}
        try:
          run = steps_of(step)
          row["rel_err_vs_xla"] = rel_err(jax.jit(run)(xs[0], *sets[0]), want)
          timing = time_chain(chain(run), (xs, sets), calls * STEPS, a.reps, a.trials)
          row |= {"time_s": timing["median_s"], "trials_s": timing["trials_s"]}
        except Exception as e:  # a failing row is reported, the rest still run
          row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps({k: v for k, v in row.items() if k != "trials_s"}), flush=True)
        result["rows"].append(row)
        common.write_json(a.out, result)  # after every row: a run cut off keeps what it timed


if __name__ == "__main__":
  main()
