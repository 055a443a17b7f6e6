"""Model hyper-parameters, the paper's presets (DESIGN.md §4) and their validation."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from moc_jax import moc
from pallas_kernels import backends

# name: (d_model, d_ff, num_layers, num_heads, k). vocab 32000 is the paper's T5 tokenizer;
# the trainer overrides vocab_size with the tokenizer's own.
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
  "tiny": (128, 344, 4, 4, 64),
  "60m": (512, 1376, 8, 8, 256),
  "130m": (768, 2048, 12, 12, 384),
  "350m": (1024, 2736, 24, 16, 512),
  "1b": (2048, 5461, 24, 32, 1024),
}
REMAT_POLICIES = ("none", "ffn", "full")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
KERNEL_BACKENDS = ("auto", "xla", "pallas")
DECODE_ATTENTION = ("auto", "xla", "pallas", "fused")
DECODE_GEMVS = ("auto", "splitk", "rowdot")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A bad configuration value; the message names the key and the valid choices."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that shapes the network; hashable so it can be static under jit."""

  vocab_size: int = 32000
  d_model: int = 128
  d_ff: int = 344
  num_layers: int = 4
  num_heads: int = 4
  ffn: str = "moc"  # dense | moc | moc_2of8
  k: int | None = 64  # channels kept per token (moc); None means d_model // 2
  gcp: bool = False  # keep only idx, G_sel, U_sel; recompute Z_sel in the backward
  # MoC: hold each layer's compute-dtype FFN weights from its forward to its backward (as dense
  # autodiff does) instead of casting them again; None: unless gcp or an `fsdp` mesh axis
  # (`moc.moc_ffn`; F split over a `tensor` mesh axis always casts again)
  ffn_keep_weights: bool | None = None
  dtype: str = "bfloat16"  # compute dtype
  param_dtype: str = "float32"
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  attention: str = "auto"  # auto (cudnn on GPU, xla elsewhere) | xla | cudnn
  kernel_backend: str = "auto"  # MoC kernels: auto (pallas on GPU) | xla | pallas
  # decode steps of one token per row: auto (fused where the kernel backend resolves to
  # pallas, i.e. on GPU) | xla (dot_product_attention over every cache slot) | pallas
  # (`pallas_kernels.decode_attention`: one kernel, only the filled slots) | fused (that
  # kernel also applies RoPE to the q, k, v GEMV's output and splits it: `attend_qkv`)
  decode_attention: str = "auto"
  # the decode GEMVs (T <= 16 tokens on the Pallas backend): auto (rowdot where the kernel
  # backend resolves to pallas) | splitk (weights D x N, D split over programs, partials summed
  # by XLA) | rowdot (weights stored N x D once when prepared for decode, whole rows per
  # program, no partials, the block's norms and residual adds inside)
  decode_gemv: str = "auto"
  # MB of the weights read right after the fused decode attention (the output projection,
  # then the FFN's first weights) that its launch reads into L2 on the SMs its one program per
  # head leaves idle (`decode_attention.attend_qkv(warm=...)`); 0: off. End to end on an H100
  # (1b, batch 1, with decode_prefetch; decode_e2e_h100_20261205g.json, paired rounds) 16 MB
  # gained dense 2.3%; MoC gained more (the H200's 1.253 → 1.144 ms per token of 2026-12-05c
  # came with it); 32 MB cost MoC 8% against 16.
  decode_attention_warm_mb: int = 16
  # decode kernels loading one step ahead: the attention's K and V blocks, and the narrow
  # one-token GEMVs (q, k, v, the output projection, MoC's gate) on a resident grid
  # (`_decode_rowdot.rowdot_config(streaming=True)`). End to end on an H100 (1b, batch 1,
  # decode_e2e_h100_20261205f.json, paired rounds) it gained dense 1.9% (the attention and q,
  # k, v faster) and MoC 8.6% (the gate and q, k, v, warmed in L2 before them, faster).
  decode_prefetch: bool = True
  remat: str = "none"  # none | ffn | full
  pad_to: int | None = None  # pad F inside the op (None: 128 on GPU, none on CPU)

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  def attention_impl(self) -> str:
    if self.attention == "auto":
      return "cudnn" if jax.default_backend() == "gpu" else "xla"
    return self.attention

  def decode_attention_impl(self) -> str:
    """'auto': the one-kernel attention with RoPE inside ('fused') wherever the MoC kernels run
    as Pallas. On the H200 (1b, batch 1, 128 + 128 tokens, 3 interleaved rounds,
    decode_e2e_rowdot_h200_20261205.json) 'fused' decoded 3.6% (dense) and 4.5% (MoC) faster
    than 'pallas', which had been 4.0-4.5% / 3.1-5.7% faster than XLA's attention."""
    if self.decode_attention == "auto":
      return "fused" if backends.resolve(self.kernel_backend) == "pallas" else "xla"
    return self.decode_attention

  def decode_gemv_impl(self) -> str:
    """'auto': rowdot wherever the MoC kernels run as Pallas. On the H200 (same run) rowdot
    with the fused attention decoded 6.2% faster than split-K for dense and ~1% for MoC
    (paired rounds; 1.2% slower by medians)."""
    if self.decode_gemv == "auto":
      return "rowdot" if backends.resolve(self.kernel_backend) == "pallas" else "splitk"
    return self.decode_gemv

  def validate(self) -> ModelConfig:
    """Raise ConfigError naming the first bad value."""
    _choice("model.ffn", self.ffn, moc.VARIANTS)
    _choice("model.remat", self.remat, REMAT_POLICIES)
    _choice("model.attention", self.attention, ATTENTION_IMPLS)
    _choice("model.kernel_backend", self.kernel_backend, KERNEL_BACKENDS)
    _choice("model.decode_attention", self.decode_attention, DECODE_ATTENTION)
    _choice("model.decode_gemv", self.decode_gemv, DECODE_GEMVS)
    _choice("model.dtype", self.dtype, DTYPES)
    _choice("model.param_dtype", self.param_dtype, DTYPES)
    for name in ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads"):
      if getattr(self, name) <= 0:
        raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
    if self.decode_attention_warm_mb < 0:
      raise ConfigError(
        f"model.decode_attention_warm_mb must be >= 0, got {self.decode_attention_warm_mb}"
      )
    if self.d_model % self.num_heads or self.head_dim % 2:
      raise ConfigError(
        f"model.d_model={self.d_model} must split into num_heads="
        f"{self.num_heads} heads of even size"
      )
    if self.ffn == "moc" and not 0 < self.k <= self.d_ff:
      raise ConfigError(f"model.k must satisfy 0 < k <= d_ff={self.d_ff}, got k={self.k}")
    if self.ffn == "moc_2of8" and self.d_ff % 8:
      raise ConfigError(f"model.ffn=moc_2of8 needs d_ff divisible by 8, got d_ff={self.d_ff}")
    return self


def _choice(key: str, value: Any, valid) -> None:
  if value not in valid:
    raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


def from_preset(preset: str, **overrides: Any) -> ModelConfig:
  """A ModelConfig from a preset name; None-valued overrides keep the preset's value."""
  if preset not in PRESETS:
    raise ConfigError(f"model.preset={preset!r} is unknown; choose one of: {', '.join(PRESETS)}")
  d, f, layers, heads, k = PRESETS[preset]
  base = dict(d_model=d, d_ff=f, num_layers=layers, num_heads=heads, k=k)
  valid = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(overrides) - valid
  if unknown:
    raise ConfigError(f"unknown model keys {sorted(unknown)}; valid: {sorted(valid)}")
  base.update({key: v for key, v in overrides.items() if v is not None})
  if base.get("k") is None:
    base["k"] = moc.default_k(base["d_model"])
  return ModelConfig(**base).validate()
