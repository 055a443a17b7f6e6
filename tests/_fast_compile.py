"""XLA:CPU flags for the test processes: cheap compiles of programs that run once or twice.

The suite compiles thousands of small programs (interpret-mode kernels above all) and runs most
of them once, so LLVM's optimisation of each was a quarter of its time: on 2 cores the suite took
7 min 5 s with these flags against 9 min 20 s without (2026-12-05). They change how XLA's CPU
code is generated, not what the programs compute; `make train` and users' runs do not use them,
nor do test runs where a CUDA jax plugin is installed (the GPU tests compile as users do).
"""

import importlib.util

FLAGS = "--xla_llvm_disable_expensive_passes=true --xla_backend_optimization_level=0"
CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def with_flags(xla_flags: str | None, cpu_only: bool = False) -> str:
  """xla_flags (an XLA_FLAGS value, possibly None) with FLAGS appended; unchanged where a CUDA
  plugin could make GPUs the devices, unless cpu_only (JAX_PLATFORMS=cpu) says they are not."""
  if not cpu_only and any(importlib.util.find_spec(name) for name in CUDA_PLUGINS):
    return xla_flags or ""
  return f"{xla_flags or ''} {FLAGS}".strip()
