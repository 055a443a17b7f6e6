"""Validation perplexity of the latest checkpoint in a workdir.

  python -m moc_jax.evaluate --workdir=runs/tiny [--batches=50]
  python -m moc_jax.evaluate --workdir=runs/tiny --config=configs/default.py --config.data.path=...

The config saved in the workdir is used unless --config is given (then its overrides apply).
Perplexity = exp(total NLL / total non-pad target tokens).
"""

from __future__ import annotations

import sys

import ml_collections
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from moc_jax import checkpoint, cli, data, train_lib
from moc_jax.model import Transformer

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Optional config overriding the workdir's config.json."
)
_BATCHES = flags.DEFINE_integer("batches", None, "Validation batches (default: eval.batches).")


def load_config(
  workdir: str, override: ml_collections.ConfigDict | None
) -> ml_collections.ConfigDict:
  if override is not None:
    return override
  saved = checkpoint.read_config(workdir)
  if saved is None:
    raise checkpoint.CheckpointError(
      f"{workdir} has no {checkpoint.CONFIG_FILE}; is it a moc-jax training workdir?"
    )
  saved["model"] = {
    k: v
    for k, v in saved["model"].items()
    if k not in ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads")
  }
  return ml_collections.ConfigDict(saved)


def restore_model(cfg: ml_collections.ConfigDict, workdir: str):
  """(model, step) from the newest readable checkpoint."""
  tokenizer = data.make_tokenizer(cfg.data)
  model_cfg = train_lib.build_model_config(cfg.model, tokenizer.vocab_size)
  model = Transformer(model_cfg, nnx.Rngs(cfg.seed))
  tx = train_lib.make_optimizer(cfg.train)
  graphdef, state = train_lib.init_state(model, tx, cfg.seed)
  manager = checkpoint.make_manager(workdir, every=1, keep=1, read_only=True)
  try:
    restored = checkpoint.restore_latest(manager, checkpoint.abstract_like(state))
  finally:
    manager.close()
  if restored is None:
    raise checkpoint.CheckpointError(f"no checkpoint found in {checkpoint.checkpoint_dir(workdir)}")
  step, state, _ = restored
  return nnx.merge(graphdef, state["params"]), tokenizer, step


def validation_batches(
  cfg: ml_collections.ConfigDict, tokenizer, batches: int | None = None
) -> list[dict]:
  """The run's own fixed validation batches (the trainer's eval set when batches is None)."""
  return data.make_eval_batches(
    cfg.data,
    tokenizer=tokenizer,
    seq_len=cfg.train.seq_len,
    batch_size=cfg.eval.batch_size or cfg.train.batch_size // cfg.train.grad_accum,
    max_batches=batches or cfg.eval.batches,
  )


def evaluate_workdir(
  workdir: str, cfg: ml_collections.ConfigDict, batches: int | None = None
) -> dict:
  model, tokenizer, step = restore_model(cfg, workdir)
  graphdef, params = nnx.split(model)
  eval_batches = validation_batches(cfg, tokenizer, batches)
  eval_step = train_lib.make_eval_step(graphdef, document_mask=cfg.model.document_mask)
  return {**train_lib.evaluate(eval_step, params, eval_batches), "step": step}


def main(argv: list[str]) -> int:
  logging.set_verbosity(logging.WARNING)
  if (code := cli.bad_invocation(argv, _WORKDIR.value)) is not None:
    return code
  with cli.user_errors():
    cfg = load_config(_WORKDIR.value, _CONFIG.value)
    result = evaluate_workdir(_WORKDIR.value, cfg, _BATCHES.value)
    print(
      f"checkpoint step {result['step']}: validation loss {result['loss']:.4f} nats/token, "
      f"perplexity {result['perplexity']:.3f} over {result['tokens']:,.0f} tokens"
    )
  return 0


if __name__ == "__main__":
  cli.check_config_overrides(sys.argv, None)
  sys.exit(app.run(main))
