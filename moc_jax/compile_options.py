"""XLA compiler options for the train step: `train.compiler_options` in the config.

Why: XLA's GPU defaults are not the fastest for this model. On the H200 the 1b dense step ran
+1.2% faster with every GEMM on cuBLAS instead of XLA's Triton GEMM fusions (whose prologues
recompute SwiGLU's elementwise work inside the GEMM), +2.1% with the gate and up projections as
one GEMM as well, and MoC was unchanged (its FFN GEMMs are already cuBLAS calls)
(`benchmarks/results/model_step_1b_flags_h200_20261203{b,c}.json`, set through XLA_FLAGS).
Programmatic dependent launch (`xla_gpu_enable_pdl`) changed neither the 1b step nor decoding
there (`model_step_1b_pdl_h200_20261205.json`, `decode_e2e_h200_20261205.json`): not a default.
The options go to `jax.jit(..., compiler_options=...)` of the train step only, so nothing else
a process compiles is affected, and no XLA_FLAGS are needed.

  auto   the measured defaults on GPU (GPU_DEFAULTS), none elsewhere
  none   XLA's own defaults
  a=b,c=d  exactly these (values: true/false, integers, floats, else strings), e.g.
         xla_gpu_enable_triton_gemm=true
"""

from __future__ import annotations

from typing import Any

import jax

from moc_jax.model_config import ConfigError

GPU_DEFAULTS: dict[str, Any] = {"xla_gpu_enable_triton_gemm": False}


def _value(text: str) -> Any:
  low = text.strip().lower()
  if low in ("true", "false"):
    return low == "true"
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text.strip()


def parse(
  spec: str,
  backend: str | None = None,
  *,
  key: str = "train.compiler_options",
  gpu_defaults: dict[str, Any] = GPU_DEFAULTS,
) -> dict[str, Any]:
  """`train.compiler_options` (or the option named `key`, whose `auto` means `gpu_defaults`)
  → a dict for `jax.jit(compiler_options=...)`."""
  spec = (spec or "").strip()
  if spec == "auto":
    return dict(gpu_defaults) if (backend or jax.default_backend()) == "gpu" else {}
  if spec in ("", "none"):
    return {}
  options = {}
  for item in spec.split(","):
    name, sep, value = item.partition("=")
    if not sep or not name.strip() or not value.strip():
      raise ConfigError(f"{key}: {item!r} is not name=value (use auto, none or a=b,c=d)")
    options[name.strip()] = _value(value)
  return options


def check(options: dict[str, Any], key: str = "train.compiler_options") -> None:
  """Compile a trivial program with the options, so a misspelt name fails before training
  starts, with the config key in the message."""
  if not options:
    return
  try:
    jax.jit(lambda x: x + 1, compiler_options=options).lower(1.0).compile()
  except Exception as e:  # XLA: INVALID_ARGUMENT: No such compile option: 'x'
    raise ConfigError(f"{key}={options}: XLA rejected it: {e}") from None
