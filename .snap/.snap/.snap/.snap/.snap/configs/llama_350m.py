"""The paper's LLaMA-350m MoC setup (DESIGN.md §4): C4, seq 256, 512 sequences per step."""

from configs.base import base_config


def get_config():
  c = base_config("350m")
  c.train.steps = 60000
  c.train.lr = 1e-3
  return c
