"""Train a dense or MoC LLaMA-style model.

  python train.py --config=configs/default.py --workdir=runs/tiny
  python train.py --config=configs/llama_60m.py --config.model.ffn=dense --workdir=runs/60m

Re-running with the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from moc_jax import cli

REPO = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "default.py")  # found from any directory
sys.path.insert(0, REPO)  # configs import configs.base
if __name__ == "__main__":  # before the flags parse: a typo in a key is one clear error line
  cli.check_config_overrides(sys.argv, DEFAULT_CONFIG)

_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and plots.")


def main(argv: list[str]) -> int:
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  why = "checkpoints, metrics and plots go there"
  if (code := cli.bad_invocation(argv, _WORKDIR.value, why)) is not None:
    return code
  if _CONFIG.value.train.deterministic:
    cli.request_deterministic_kernels()
  from moc_jax import trainer

  with cli.user_errors():
    result = trainer.train(_CONFIG.value, _WORKDIR.value)
    if "perplexity" in result:
      print(
        f"final validation perplexity: {result['perplexity']:.3f} "
        f"(loss {result['loss']:.4f} nats/token, step {result['step']})"
      )
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
