"""The paper's LLaMA-1b MoC setup (DESIGN.md §4): C4, seq 256, 512 sequences per step."""

from configs.base import base_config


def get_config():
  c = base_config("1b")
  c.train.steps = 100000
  c.train.lr = 6e-4
  return c
