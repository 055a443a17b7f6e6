"""How well the top-K search's Gaussian guess (`TopKConfig.gauss_margin`) brackets the K-th gate
value on a trained model's real gate rows, not only on the Gaussian rows the GPU benchmarks use.

  python benchmarks/gauss_guess.py --workdir=runs/tiny [--out=benchmarks/results/x.json]

Per MoC layer, on the run's validation batches: G = x Wg in the compute dtype for every real
token, then the kernel's own `gauss_bracket` / `bracket_state` (plain jnp here) and the share of
rows whose K-th key falls in the inner bracket (+-m std), the outer one (+-5m) or an open side,
and the bisection passes left (log2 of the interval's width in keys) against 16 for the whole
range. G is rounded to --dtype (bf16 by default, as on the GPU; the tiny CPU run computes in
fp32). CPU is enough; nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from benchmarks import common
from moc_jax import channel_usage, evaluate, moc
from pallas_kernels import _triton_utils as tu
from pallas_kernels._topk_count import bracket_state, gauss_bracket


def bracket_stats(g_TxF: jax.Array, k: int, margin: float) -> dict:
  """Where the K-th key of each row lands among the guess's intervals, and passes left."""
  key_TxF = tu.order_keys(g_TxF)
  kth_T1 = jnp.sort(key_TxF, axis=1)[:, -k][:, None]
  x = g_TxF.astype(jnp.float32)
  s1, s2 = jnp.sum(x, 1, keepdims=True), jnp.sum(x * x, 1, keepdims=True)
  thrs = gauss_bracket(s1, s2, g_TxF.shape[1], k, margin, g_TxF.dtype)
  counts = [jnp.sum(key_TxF >= t, axis=1, keepdims=True) for t in thrs]
  lo, hi, _ = bracket_state(thrs, counts, k, g_TxF.dtype)
  assert bool(jnp.all((lo <= kth_T1) & (kth_T1 <= hi))), "bracket_state lost the K-th key"
  inner = (thrs[1] <= kth_T1) & (kth_T1 < thrs[2])
  outer = (thrs[0] <= kth_T1) & (kth_T1 < thrs[3]) & ~inner
  passes = np.ceil(np.log2(np.asarray(hi - lo + 1, np.float64)))
  return {
    "rows": int(g_TxF.shape[0]),
    "inner": float(jnp.mean(inner)),
    "outer": float(jnp.mean(outer)),
    "open": float(jnp.mean(~(inner | outer))),
    "passes_mean": float(passes.mean()),
    "passes_max": int(passes.max()),
  }


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--margin", type=float, default=0.1)
  p.add_argument("--batches", type=int, default=2)
  p.add_argument("--dtype", default="bfloat16", help="G's dtype (bf16: what the GPU runs)")
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  cfg = ml_collections.ConfigDict(evaluate.load_config(args.workdir, None).to_dict())
  cfg.model.remat = "none"
  model, tokenizer, step = evaluate.restore_model(cfg, args.workdir)
  if model.cfg.ffn != "moc":
    p.error(f"{args.workdir} trained ffn={model.cfg.ffn!r}; the guess is for 'moc'")
  model.set_attributes(capture_input=True)
  k = moc.effective_k(model.cfg.k, model.cfg.d_ff, model.cfg.ffn)
  layers: list[list] = [[] for _ in model.blocks]
  for batch in evaluate.validation_batches(cfg, tokenizer, args.batches):
    _, sown = nnx.capture(channel_usage.forward, nnx.Intermediate)(
      model, batch, cfg.model.document_mask
    )
    real = np.asarray(batch["weights"]).reshape(-1) > 0
    for i, block in enumerate(model.blocks):
      x = sown["blocks"][i]["ffn"]["ffn_input"].get_value()[0]
      x_TxD = x.reshape(-1, x.shape[-1])[real].astype(model.cfg.compute_dtype)
      layers[i].append(x_TxD @ block.ffn.w_gate[...].astype(model.cfg.compute_dtype))
  result = {"info": common.run_info(), "workdir": os.path.abspath(args.workdir), "step": step}
  result.update(margin=args.margin, dtype=args.dtype, k=k, d_ff=model.cfg.d_ff, layers=[])
  for i, gs in enumerate(layers):
    g_TxF = jnp.concatenate(gs).astype(args.dtype)
    row = {"layer": i, **bracket_stats(g_TxF, k, args.margin)}
    result["layers"].append(row)
    print(json.dumps(row), flush=True)
  if args.out:
    common.write_json(args.out, result)


if __name__ == "__main__":
  main()
