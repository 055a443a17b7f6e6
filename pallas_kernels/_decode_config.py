"""Tuning parameters of the decode kernels and the defaults that fill an H200 at a shape."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """Block sizes (powers of 2), splits and Triton launch parameters for the decode kernels."""

  gemv_block_f: int = 128
  gemv_block_d: int = 64
  # D splits of the gate (and dense up) GEMV; 1 lets dense fuse the SwiGLU epilogue
  gemv_splits: int = 4
  gemv_warps: int = 4
  gemv_stages: int = 3
  select_warps: int = 8
  select_radix_bits: int = 2
  up_block_c: int = 16
  up_block_d: int = 512
  up_warps: int = 4
  up_stages: int = 2
  down_splits: int = 8
  down_block_c: int = 32
  down_block_d: int = 128
  down_warps: int = 4
  down_stages: int = 3


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def pow2_at_least(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def default_config(num_tokens: int, d_model: int, d_ff: int) -> DecodeConfig:
  """A config that gives every SM (132 on an H200) a few programs at the given shape."""
  del num_tokens
  block_f = 128
  splits = max(1, min(16, pow2_at_least(cdiv(264, cdiv(d_ff, block_f)))))
  down_block_d = min(128, pow2_at_least(d_model))
  down_splits = max(1, min(16, pow2_at_least(cdiv(128, cdiv(d_model, down_block_d)))))
  return DecodeConfig(gemv_splits=splits, down_splits=down_splits, down_block_d=down_block_d)
