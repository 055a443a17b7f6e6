"""Shared test setup: cheap XLA:CPU compiles (`_fast_compile`), fp32 matmuls on CPU, a GPU
marker that skips cleanly, and each test module's compiled programs released after it."""

import gc
import os

from _fast_compile import with_flags

os.environ["XLA_FLAGS"] = with_flags(
  os.environ.get("XLA_FLAGS"), cpu_only=os.environ.get("JAX_PLATFORMS") == "cpu"
)  # read when jax starts XLA

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  del config
  if jax.default_backend() == "gpu":
    return
  skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip_gpu)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drop jax's caches after each test module. The suite compiles thousands of programs; kept
  in one process, their memory maps grew past the kernel's vm.max_map_count (65530) about 60%
  of the way through, where XLA's CPU compiler then segfaulted (2026-12-04)."""
  yield
  jax.clear_caches()
  gc.collect()
  if os.environ.get("MOC_TEST_MAPS"):
    with open("/proc/self/maps") as f:
      print(f"\n[maps after module: {sum(1 for _ in f)}]")
