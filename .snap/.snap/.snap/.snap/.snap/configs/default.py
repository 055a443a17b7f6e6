"""The tiny MoC model on the embedded corpus: trains on 2 CPU cores in a few minutes."""

from configs.base import base_config


def get_config():
  c = base_config("tiny")
  c.model.dtype = "float32"  # bf16 matmuls are slow on CPU
  c.train.steps = 400
  c.train.batch_size = 16
  c.train.seq_len = 128
  c.train.lr = 3e-3
  c.train.log_every = 25
  c.eval.every = 100
  c.eval.batches = 8
  c.checkpoint.every = 200
  return c
