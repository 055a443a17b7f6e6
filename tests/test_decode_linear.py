"""The split-K decode GEMV `linear` (interpret mode on CPU, compiled on GPU) against a float64
reference, the backend switch between it and the output-major `rowdot`
(tests/test_decode_rowdot.py), the model's decode path through them, and the GPU sweep's CPU
dry run."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _gemv_inputs import TOL
from _gemv_inputs import inputs as _inputs
from _gemv_inputs import rel_err_f64 as _rel_err_f64
from _gemv_inputs import seed as _seed  # tests/ is on sys.path (as for _fast_compile)
from flax import nnx

from pallas_kernels import _decode_gemv, _decode_rowdot, backends, reference
from pallas_kernels._decode_config import DecodeConfig

# Small D blocks: several loop steps per split, D splits that end inside a block (D = 200).
CFG = DecodeConfig(gemv_block_f=128, gemv_block_d=16, gemv_warps=4, gemv_stages=2, t1_dot=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 3, 16])
@pytest.mark.parametrize(("d", "n", "splits"), [(64, 1376, 1), (200, 2736, 4), (256, 5461, 2)])
def test_linear_matches_float64(dtype, num_tokens, d, n, splits):
  seed = _seed()
  x, w = _inputs(seed, (num_tokens,), d, n, dtype)
  cfg = DecodeConfig(**{**CFG.__dict__, "gemv_splits": splits})
  y = _decode_gemv.linear(x, w, config=cfg, interpret=True)
  assert y.shape == (num_tokens, n) and y.dtype == dtype
  assert _rel_err_f64(y, x, w) < TOL[dtype], f"seed={seed}"


@pytest.mark.parametrize("splits", [1, 4])
def test_linear_leading_dims_out_dtype_and_t1_reduce(splits):
  """x (2, 3, D) in bf16 to fp32 logits (the unembedding's call); T = 1 multiply-reduce path."""
  seed = _seed()
  cfg = DecodeConfig(**{**CFG.__dict__, "gemv_splits": splits})
  x, w = _inputs(seed, (2, 3), 96, 1000, jnp.bfloat16)
  y = _decode_gemv.linear(x, w, config=cfg, out_dtype=jnp.float32, interpret=True)
  assert y.shape == (2, 3, 1000) and y.dtype == jnp.float32
  assert _rel_err_f64(y, x, w) < 1e-5, f"seed={seed}"  # no bf16 rounding of the output
  reduce = DecodeConfig(**{**cfg.__dict__, "t1_dot": False})
  y1 = _decode_gemv.linear(x[0, :1], w, config=reduce, interpret=True)
  assert _rel_err_f64(y1, x[0, :1], w) < TOL[jnp.bfloat16], f"seed={seed}"


def test_linear_rejects_bad_inputs():
  x, w = _inputs(0, (17,), 64, 128, jnp.float32)
  with pytest.raises(ValueError, match="at most 16"):
    _decode_gemv.linear(x, w, interpret=True)
  with pytest.raises(ValueError, match="need x"):
    _decode_gemv.linear(x[:4], w[:32], interpret=True)
  with pytest.raises(ValueError, match="cast the weight"):
    _decode_gemv.linear(x[:4], w.astype(jnp.bfloat16), interpret=True)


def test_linear_config_is_valid_at_every_shape():
  for d, n in [(2048, 6144), (2048, 2048), (2048, 32000), (4096, 11008), (64, 100)]:
    c = _decode_gemv.linear_config(1, d, n)
    splits, bf, bd = c.gemv_splits, c.gemv_block_f, c.gemv_block_d
    assert all(v & (v - 1) == 0 for v in (splits, bf, bd)) and c.t1_dot
    assert splits <= 8 and (splits == 1 or d // splits >= 2 * bd)
  assert _decode_gemv.linear_config(1, 2048, 6144).gemv_splits == 8
  assert _decode_gemv.linear_config(1, 64, 100).gemv_splits == 1


def test_backend_switch_and_reference():
  from pallas_kernels import moc_decode

  assert _decode_gemv.MAX_TOKENS == moc_decode.MAX_KERNEL_TOKENS  # one decode/prefill boundary
  assert backends.decode_linear("xla", 1) is reference.linear
  assert backends.decode_linear("pallas", 17) is reference.linear  # prefill: XLA's GEMM
  seed = _seed()
  x, w = _inputs(seed, (3,), 64, 300, jnp.bfloat16)
  fast = backends.decode_linear("pallas", 3)(x, w, jnp.float32)
  slow = reference.linear(x, w, jnp.float32)
  assert fast.dtype == slow.dtype == jnp.float32
  assert _rel_err_f64(slow, x, w) < 1e-5 and _rel_err_f64(fast, x, w) < 1e-5, f"seed={seed}"
  x32, w32 = _inputs(seed, (3,), 64, 300, jnp.float32)
  assert _rel_err_f64(reference.linear(x32, w32), x32, w32) < 1e-6, f"seed={seed}"


def test_prepare_copies_unembed_only_when_dtypes_differ():
  from moc_jax import model_config
  from moc_jax.model import Transformer

  for dtype, copied in (("float32", False), ("bfloat16", True)):
    cfg = model_config.from_preset("tiny", vocab_size=300, num_layers=1, dtype=dtype)
    m = Transformer(cfg, nnx.Rngs(0))
    m.prepare_for_decode()
    shared = m.decode_unembed[...] is m.unembed[...]  # astype to the same dtype: no copy
    assert shared != copied
    w_qkv, w_o = (v[...] for v in m.blocks[0].attn.decode_weights)
    assert w_qkv.shape == (128, 3 * 128) and w_o.shape == (128, 128)
    assert w_qkv.dtype == w_o.dtype == jnp.dtype(dtype)
    if copied:
      assert m.decode_unembed[...].dtype == jnp.bfloat16


@pytest.mark.parametrize(
  ("gemv", "ffn"), [("splitk", "moc"), ("rowdot", "moc"), ("rowdot", "dense")]
)
def test_model_decode_through_pallas_matches_xla(monkeypatch, gemv, ffn):
  """fp32 tiny model: prepared for Pallas (interpret mode on CPU), the same greedy tokens and
  logits (a prefill of 2 × 9 tokens takes XLA; a 1-token step the GEMV) as the XLA model, with
  either decode GEMV (rowdot: the weights stored output-major)."""
  from moc_jax import generate, model_config
  from moc_jax.model import Transformer

  cfg = model_config.from_preset(
    "tiny", vocab_size=1001, num_layers=2, dtype="float32", attention="xla", kernel_backend="xla"
  )
  xla = Transformer(dataclasses.replace(cfg, ffn=ffn), nnx.Rngs(_seed()))
  fast = generate.with_backend(xla, "pallas", decode_gemv=gemv)
  calls = []
  module, name = (_decode_gemv, "linear") if gemv == "splitk" else (_decode_rowdot, "rowdot")
  real = getattr(module, name)
  monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))

  def steps(m):
    graphdef, state = nnx.split(m)

    @jax.jit
    def run(state):
      mm = nnx.merge(graphdef, state)
      cache = mm.init_cache(2, 10)
      prompt = jnp.asarray([[1, 5, 9, 13, 2, 7, 30, 0, 6], [3, 4, 60, 8, 11, 12, 40, 1, 2]])
      pre, cache = mm.decode(prompt, jnp.broadcast_to(jnp.arange(9), (2, 9)), cache)
      step, _ = mm.decode(jnp.asarray([[700], [999]]), jnp.full((2, 1), 9), cache)
      return pre, step

    return run(state)

  (pre_x, step_x), (pre_p, step_p) = steps(xla), steps(fast)
  # qkv and o-proj per layer, the unembedding (1-token step only); rowdot: the FFNs' GEMVs too
  ffn_calls = 2 if gemv == "rowdot" else 0  # MoC's gate, or dense's down (gate+up: `swiglu`)
  assert len(calls) == 2 * 2 + 1 + ffn_calls
  np.testing.assert_allclose(pre_p, pre_x, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(step_p, step_x, rtol=1e-4, atol=1e-5)
  _, step_r = steps(generate.with_backend(xla, "xla", decode_gemv=gemv))  # XLA, prepared layout
  np.testing.assert_allclose(step_r, step_x, rtol=1e-4, atol=1e-5)
  prompts = [[1, 5, 9, 13, 2], [3, 4, 60]]
  assert generate.generate(fast, prompts, 4) == generate.generate(xla, prompts, 4)


def test_gemv_sweep_quick(tmp_path):
  from benchmarks import gemv_sweep

  out = tmp_path / "sweep.json"
  gemv_sweep.main(["--quick", "--methods=splitk,rowdot", f"--out={out}"])
  result = json.loads(out.read_text())
  timed = [r for r in result["rows"] if "us_per_call" in r]
  assert {r["method"] for r in timed} == {"xla", "pallas", "rowdot"}
  assert len(timed) == len(result["rows"])
  assert all(math.isfinite(r["us_per_call"]) and r["rel_err"] < 1e-2 for r in timed)
  assert result["best"] and all(s["best_us"] > 0 and s["rowdot_us"] > 0 for s in result["best"])


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 4])
def test_linear_compiled_on_gpu(num_tokens):
  """d = 2048, N = 6144 (the 1b model's fused qkv), bf16, with linear_config's pick and with one
  split (the kernel writes y itself); a freed NaN buffer of y's size before each call may be
  reused for y, so that an element the kernel skips would show."""
  seed = _seed()
  x, w = _inputs(seed, (num_tokens,), 2048, 6144, jnp.bfloat16)
  for cfg in (None, DecodeConfig(gemv_splits=1, gemv_block_f=64, gemv_block_d=128, t1_dot=True)):
    jnp.full((num_tokens, 6144), jnp.nan, jnp.bfloat16).block_until_ready()  # poison, freed
    y = _decode_gemv.linear(x, w, config=cfg)
    assert y.shape == (num_tokens, 6144) and y.dtype == jnp.bfloat16
    assert _rel_err_f64(y, x, w) < 6e-3, f"seed={seed} cfg={cfg}"
  for cfg in (None, _decode_rowdot.RowdotConfig(block_n=32, block_d=2048, t1_dot=True)):
    jnp.full((num_tokens, 6144), jnp.nan, jnp.bfloat16).block_until_ready()
    y = _decode_rowdot.rowdot(x, w.T.copy(), config=cfg)
    assert _rel_err_f64(y, x, w) < 6e-3, f"seed={seed} rowdot cfg={cfg}"


def test_gemv_tiles_fit_shared_memory_in_fp32():
  """The dense down GEMV's tile (tuned on bf16) keeps its 128-row step in bf16 and halves it
  in fp32, where the H200 refused it (272 KB asked of 227)."""
  from pallas_kernels import _decode_mask, moc_decode

  down = _decode_mask.down_gemv_config(moc_decode.dense_config(1, 2048, 5464))
  assert _decode_gemv.fit_block_d(down, 5464, down.gemv_block_f, 2) == down.gemv_block_d == 128
  fp32 = _decode_gemv.fit_block_d(down, 5464, down.gemv_block_f, 4)
  assert fp32 == 64
  assert down.gemv_stages * fp32 * down.gemv_block_f * 4 <= _decode_gemv.SMEM_BUDGET_BYTES


def test_auto_decode_paths_follow_the_kernel_backend():
  """'auto': rowdot GEMVs and the fused attention where the kernels are Pallas, else split-K
  layouts and XLA's attention."""
  from moc_jax import model_config

  pallas = model_config.from_preset("tiny", kernel_backend="pallas")
  xla = model_config.from_preset("tiny", kernel_backend="xla")
  assert (pallas.decode_gemv_impl(), pallas.decode_attention_impl()) == ("rowdot", "fused")
  assert (xla.decode_gemv_impl(), xla.decode_attention_impl()) == ("splitk", "xla")
  pinned = model_config.from_preset("tiny", kernel_backend="pallas", decode_gemv="splitk")
  assert pinned.decode_gemv_impl() == "splitk"
