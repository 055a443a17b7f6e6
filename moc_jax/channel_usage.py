"""How evenly a trained MoC model uses its FFN channels, on the run's own validation batches.

  python -m moc_jax.channel_usage --workdir=runs/moc [--batches=8] [--out=usage.json]

Per MoC layer, counts how many real (non-padding) tokens select each channel, with the
training selection itself: the FFN input is sown by the model (`FeedForward.capture_input`,
off in training), G is recomputed exactly as `moc.moc_ffn` does (compute dtype, F padded the
same way) and the mask is `pallas_kernels.reference.select_mask`, which every backend matches
bit for bit. F padding is never counted. Writes JSON (default: <workdir>/channel_usage.json)
and prints one summary line per layer.

A dense run has no MoC layers: the JSON then holds `"layers": []` and a `note`, and the
command exits 0, so a driver can run it on every variant of a study.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from moc_jax import cli, evaluate, moc
from moc_jax.model_config import ModelConfig
from pallas_kernels import reference

OUT_FILE = "channel_usage.json"
DENSE_NOTE = "dense FFN: no MoC layers, no channel selection to count"

# --workdir, --config and --batches are evaluate.py's flags (imported above), same meaning.
FLAGS = flags.FLAGS
_OUT = flags.DEFINE_string("out", None, f"Output JSON (default: <workdir>/{OUT_FILE}).")


def channel_counts(
  x_BxLxD: jax.Array, ffn: nnx.Module, weights_BxL: jax.Array, cfg: ModelConfig
) -> jax.Array:
  """(F,) int32: how many tokens with weight > 0 select each real channel of this FFN."""
  d_ff = cfg.d_ff
  f_pad = moc._padded(d_ff, moc._pad_multiple(cfg.pad_to))
  wg, _, _ = moc.cast_and_pad(ffn.w_gate[...], ffn.w_up[...], ffn.w_down[...], x_BxLxD.dtype, f_pad)
  x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
  g_TxF = reference.mask_padding(x_TxD @ wg, d_ff)
  mask_TxF = reference.select_mask(g_TxF, moc.effective_k(cfg.k, f_pad, cfg.ffn), cfg.ffn)
  real_T = weights_BxL.reshape(-1) > 0
  return jnp.sum(mask_TxF[:, :d_ff] & real_T[:, None], axis=0, dtype=jnp.int32)


def forward(model, batch: dict, document_mask: bool) -> jax.Array:
  """The model on one batch, as the trainer calls it (with or without document masking)."""
  if document_mask:
    return model(batch["inputs"], batch["positions"], batch["segment_ids"])
  return model(batch["inputs"])


def make_usage_step(graphdef, cfg: ModelConfig, *, document_mask: bool):
  """A jitted (params, batch) -> (counts NxF int32, real tokens). The graphdef must come from
  a model with `capture_input` set; logits are unused, so XLA drops the output projection."""

  def step(params, batch):
    model = nnx.merge(graphdef, params)
    _, sown = nnx.capture(forward, nnx.Intermediate)(model, batch, document_mask)
    counts = [
      channel_counts(
        sown["blocks"][i]["ffn"]["ffn_input"].get_value()[0], block.ffn, batch["weights"], cfg
      )
      for i, block in enumerate(model.blocks)
    ]
    return jnp.stack(counts), jnp.sum(batch["weights"] > 0, dtype=jnp.int32)

  return jax.jit(step)


def usage_stats(counts_F: np.ndarray, tokens: int, k: int) -> dict:
  """Shares, dead channels and evenness: entropy of usage / log F (1 = uniform), Gini (0)."""
  counts_F = np.asarray(counts_F, np.float64)
  num_channels = counts_F.size
  share_F = counts_F / max(tokens, 1)
  p_F = counts_F / max(counts_F.sum(), 1.0)
  nz = p_F[p_F > 0]
  entropy = float(-(nz * np.log(nz)).sum() / np.log(num_channels)) if num_channels > 1 else 1.0
  ranks = np.arange(1, num_channels + 1)
  gini = float((2 * (ranks * np.sort(p_F)).sum() - (num_channels + 1) * p_F.sum()) / num_channels)
  return {
    "tokens": int(tokens),
    "k": int(k),
    "d_ff": int(num_channels),
    "never_selected": int((counts_F == 0).sum()),
    "share_min": round(float(share_F.min()), 5),
    "share_median": round(float(np.median(share_F)), 5),
    "share_max": round(float(share_F.max()), 5),
    "entropy_norm": round(entropy, 5),
    "gini": round(gini, 5),
    "share": [round(float(s), 5) for s in share_F],
  }


def summary_line(layer: int, s: dict) -> str:
  return (
    f"layer {layer}: {s['tokens']:,} tokens, K={s['k']}/F={s['d_ff']}, "
    f"never selected {s['never_selected']}, share min/median/max "
    f"{s['share_min']:.4f}/{s['share_median']:.4f}/{s['share_max']:.4f} "
    f"(uniform {s['k'] / s['d_ff']:.4f}), entropy {s['entropy_norm']:.4f}, gini {s['gini']:.4f}"
  )


def channel_usage_workdir(
  workdir: str, cfg: ml_collections.ConfigDict, batches: int | None = None
) -> dict:
  """Channel usage of the newest checkpoint in `workdir`; {'layers': []} for a dense run."""
  result = {"workdir": os.path.abspath(workdir), "ffn": cfg.model.ffn, "layers": []}
  if cfg.model.ffn == "dense":
    return {**result, "note": DENSE_NOTE}
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.model.remat = "none"  # same forward values; keeps the sow outside any nnx.remat
  model, tokenizer, step = evaluate.restore_model(cfg, workdir)
  model.set_attributes(capture_input=True)
  graphdef, params = nnx.split(model)
  usage_step = make_usage_step(graphdef, model.cfg, document_mask=cfg.model.document_mask)
  total_NxF, tokens = 0, 0
  eval_batches = evaluate.validation_batches(cfg, tokenizer, batches)
  for batch in eval_batches:
    counts_NxF, n = usage_step(params, batch)
    total_NxF = total_NxF + np.asarray(counts_NxF, np.int64)
    tokens += int(n)
  k = moc.effective_k(model.cfg.k, model.cfg.d_ff, model.cfg.ffn)
  layers = [{"layer": i, **usage_stats(c_F, tokens, k)} for i, c_F in enumerate(total_NxF)]
  return {**result, "step": step, "batches": len(eval_batches), "k": k, "layers": layers}


def write(result: dict, path: str) -> None:
  """Atomic write (a reader never sees half a file)."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f)
  os.replace(tmp, path)


def main(argv: list[str]) -> int:
  logging.set_verbosity(logging.WARNING)
  if (code := cli.bad_invocation(argv, FLAGS.workdir)) is not None:
    return code
  with cli.user_errors():
    cfg = evaluate.load_config(FLAGS.workdir, FLAGS.config)
    result = channel_usage_workdir(FLAGS.workdir, cfg, FLAGS.batches)
  out = _OUT.value or os.path.join(FLAGS.workdir, OUT_FILE)
  write(result, out)
  if not result["layers"]:
    print(f"note: {result['note']}; wrote {out}")
    return 0
  print(f"checkpoint step {result['step']}, {result['batches']} validation batches:")
  for s in result["layers"]:
    print(summary_line(s["layer"], s))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  cli.check_config_overrides(sys.argv, None)
  sys.exit(app.run(main))
