"""The paper's LLaMA-60m MoC setup (DESIGN.md §4): C4, seq 256, 512 sequences per step."""

from configs.base import base_config


def get_config():
  c = base_config("60m")
  c.train.steps = 10000
  c.train.lr = 2.5e-3
  return c
