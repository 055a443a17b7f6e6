"""train.compiler_options: parsing, the per-backend defaults, and a clear error for bad names."""

import jax
import jax.numpy as jnp
import pytest

from moc_jax import compile_options
from moc_jax.model_config import ConfigError


def test_auto_gives_the_gpu_defaults_on_gpu_only():
  assert compile_options.parse("auto", backend="gpu") == compile_options.GPU_DEFAULTS
  assert compile_options.parse("auto", backend="cpu") == {}
  assert compile_options.parse("none", backend="gpu") == {}


def test_explicit_options_are_typed():
  got = compile_options.parse("a=true, b=False,c=3,d=0.5,e=fast")
  assert got == {"a": True, "b": False, "c": 3, "d": 0.5, "e": "fast"}


@pytest.mark.parametrize("spec", ["xla_gpu_enable_triton_gemm", "=1", "a=1,,b=2", "a="])
def test_malformed_specs_name_the_config_key(spec):
  with pytest.raises(ConfigError, match=r"train\.compiler_options"):
    compile_options.parse(spec)


def test_a_misspelt_option_fails_before_training():
  with pytest.raises(ConfigError, match="xla_gpu_enable_trition_gemm"):
    compile_options.check({"xla_gpu_enable_trition_gemm": False})
  compile_options.check(compile_options.GPU_DEFAULTS)  # a real option: accepted on any backend


def test_the_train_step_compiles_with_the_gpu_defaults():
  # Accepted by the CPU compiler too (GPU-only options are ignored there), so the same
  # config runs everywhere.
  f = jax.jit(lambda x: x @ x, compiler_options=compile_options.GPU_DEFAULTS)
  assert float(f(jnp.eye(3)).sum()) == 3.0
