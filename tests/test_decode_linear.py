"""The decode GEMV `linear` (interpret mode on CPU, compiled on GPU) against a float64 reference,
its backend switch, the model's decode path through it, and the GPU sweep's CPU dry run.

Fresh random inputs every run (seed from the clock, in every failure message). Interpret mode
fills each output with NaN before the kernel runs, so a NaN-free result was fully written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import _decode_gemv, _decode_rowdot, backends, reference
from pallas_kernels._decode_config import DecodeConfig

# Small D blocks: several loop steps per split, D splits that end inside a block (D = 200).
CFG = DecodeConfig(gemv_block_f=128, gemv_block_d=16, gemv_warps=4, gemv_stages=2, t1_dot=True)
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 6e-3}  # bf16: one rounding of the output


def _seed() -> int:
  return time.time_ns() % (2**31)


def _inputs(seed: int, lead: tuple[int, ...], d: int, n: int, dtype):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (*lead, d), dtype)
  w = (jax.random.normal(kw, (d, n)) * d**-0.5).astype(dtype)
  return x, w


def _rel_err_f64(y, x, w) -> float:
  """‖y − x W‖ / ‖x W‖ with x W in float64 from the same (rounded) inputs; NaN never passes."""
  y = np.asarray(y, np.float64)
  assert np.isfinite(y).all(), "an output element was not written (NaN)"
  want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
  return float(np.linalg.norm(y - want) / np.linalg.norm(want))


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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 3, 16])
@pytest.mark.parametrize(
  ("d", "n", "block_n", "prefetch"),
  [(64, 1376, 8, False), (200, 2736, 16, False), (96, 5461, 4, False), (200, 1376, 8, True)],
)
def test_rowdot_matches_float64(dtype, num_tokens, d, n, block_n, prefetch):
  """The output-major GEMV on Wᵀ: odd N (a last block of rows past N), D not a step multiple;
  prefetch: each step's loads one step ahead (T = 1; more tokens ignore it)."""
  seed = _seed()
  x, w = _inputs(seed, (num_tokens,), d, n, dtype)
  cfg = _decode_rowdot.RowdotConfig(block_n=block_n, block_d=32, warps=4, stages=2)
  cfg = dataclasses.replace(cfg, prefetch=prefetch)
  y = _decode_rowdot.rowdot(x, w.T, config=cfg, interpret=True)
  assert y.shape == (num_tokens, n) and y.dtype == dtype
  assert _rel_err_f64(y, x, w) < TOL[dtype], f"seed={seed}"
  if prefetch:  # the same sums in the same order: the same bits
    plain = dataclasses.replace(cfg, prefetch=False)
    np.testing.assert_array_equal(y, _decode_rowdot.rowdot(x, w.T, config=plain, interpret=True))


def test_rowdot_leading_dims_out_dtype_t1_dot_and_errors():
  seed = _seed()
  x, w = _inputs(seed, (2, 3), 96, 1000, jnp.bfloat16)
  cfg = _decode_rowdot.RowdotConfig(block_n=16, block_d=64, t1_dot=True)
  y = _decode_rowdot.rowdot(x, w.T, config=cfg, out_dtype=jnp.float32, interpret=True)
  assert y.shape == (2, 3, 1000) and y.dtype == jnp.float32
  assert _rel_err_f64(y, x, w) < 1e-5, f"seed={seed}"  # no bf16 rounding of the output
  y1 = _decode_rowdot.rowdot(x[0, :1], w.T, config=cfg, interpret=True)  # T = 1 through tl.dot
  assert _rel_err_f64(y1, x[0, :1], w) < TOL[jnp.bfloat16], f"seed={seed}"
  with pytest.raises(ValueError, match="need x"):
    _decode_rowdot.rowdot(x, w, interpret=True)
  with pytest.raises(ValueError, match="at most 16"):
    _decode_rowdot.rowdot(jnp.zeros((17, 96), jnp.bfloat16), w.T, interpret=True)


def test_rowdot_config_picks_and_its_wide_step_at_t1():
  """The sweep's rule: one 2-byte weight at T = 1 steps a D over 2048 2048 wide and takes 4 rows
  from N = 16384 up; the SwiGLU's two weights, fp32 and T > 1 keep 8 rows, 512 wide. The wide step
  masks an odd D's last step (D = 2100: one full step and 52 columns)."""
  pick = _decode_rowdot.rowdot_config
  assert (pick(1, 5464, 2048).block_n, pick(1, 5464, 2048).block_d) == (8, 2048)
  assert (pick(1, 2048, 32000).block_n, pick(1, 2048, 32000).block_d) == (4, 512)
  assert pick(1, 2048, 6144) == pick(4, 5464, 32000) == pick(1, 4096, 11008, weights=2)
  assert pick(1, 5464, 2048, itemsize=4).block_d == 512  # fp32 weights: not measured wide
  assert pick(1, 2048, 6144) == _decode_rowdot.RowdotConfig()
  seed = _seed()
  x, w = _inputs(seed, (1,), 2100, 40, jnp.bfloat16)
  y = _decode_rowdot.rowdot(x, w.T, interpret=True)
  assert _rel_err_f64(y, x, w) < TOL[jnp.bfloat16], f"seed={seed}"


def test_rowdot_out_cols_pads_with_zeros():
  """out_cols > N: y is that wide, its first N columns as without, the rest exactly 0 (the
  padded G the Mosaic select reads); out_cols < N or with a residual is refused."""
  seed = _seed()
  x, w = _inputs(seed, (3,), 64, 203, jnp.bfloat16)
  cfg = _decode_rowdot.RowdotConfig(block_n=8, block_d=32)
  y = _decode_rowdot.rowdot(x, w.T, config=cfg, out_dtype=jnp.float32, interpret=True)
  wide = _decode_rowdot.rowdot(
    x, w.T, config=cfg, out_dtype=jnp.float32, out_cols=256, interpret=True
  )
  assert wide.shape == (3, 256)
  np.testing.assert_array_equal(np.asarray(wide[:, :203]), np.asarray(y))
  np.testing.assert_array_equal(np.asarray(wide[:, 203:]), 0)
  with pytest.raises(ValueError, match="out_cols"):
    _decode_rowdot.rowdot(x, w.T, out_cols=200, interpret=True)
  with pytest.raises(ValueError, match="out_cols"):
    _decode_rowdot.rowdot(x, w.T, out_cols=256, residual=y.astype(x.dtype), interpret=True)


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


@pytest.mark.gpu
def test_rowdot_wide_configs_compiled_on_gpu():
  """rowdot_config's sweep picks at the 1b shapes they were chosen for, compiled: dense down
  (D = 5464 in 2048-wide steps, with the residual) and the unembedding (4 rows, fp32 logits),
  each output poisoned first."""
  seed = _seed()
  x, w = _inputs(seed, (1,), 5464, 2048, jnp.bfloat16)
  r = jax.random.normal(jax.random.key(seed + 1), (1, 2048), jnp.bfloat16)
  jnp.full((1, 2048), jnp.nan, jnp.bfloat16).block_until_ready()
  y = _decode_rowdot.rowdot(x, w.T.copy(), residual=r)
  want = (reference.linear(x, w) + r).astype(jnp.bfloat16)
  f32 = functools.partial(np.asarray, dtype=np.float32)
  np.testing.assert_allclose(f32(y), f32(want), rtol=1e-2, atol=2e-2)
  x, w = _inputs(seed + 2, (1,), 2048, 32000, jnp.bfloat16)
  jnp.full((1, 32000), jnp.nan, jnp.float32).block_until_ready()
  y = _decode_rowdot.rowdot(x, w.T.copy(), out_dtype=jnp.float32)
  assert _rel_err_f64(y, x, w) < 1e-5, f"seed={seed}"


@pytest.mark.gpu
def test_rowdot_streaming_programs_compiled_on_gpu():
  """`RowdotConfig.programs` compiled at the 1b gate (5464 rows, the norm inside, returning the
  normalized x): the sweep's streaming grids give the bits of one program per block of the
  same tile."""
  seed = _seed()
  x, w = _inputs(seed, (1,), 2048, 5464, jnp.bfloat16)
  scale = jax.random.uniform(jax.random.key(seed + 1), (2048,), jnp.float32, 0.5, 1.5)
  w_t = w.T.copy()
  run = lambda cfg: _decode_rowdot.rowdot(
    x, w_t, config=cfg, norm=(scale, 1e-5), return_normed=True
  )
  for rows, width, programs in ((8, 512, 264), (4, 512, 683), (4, 2048, 528)):
    plain = _decode_rowdot.RowdotConfig(block_n=rows, block_d=width)
    cfg = dataclasses.replace(plain, programs=programs)
    for got, ref in zip(run(cfg), run(plain), strict=True):
      np.testing.assert_array_equal(np.asarray(got), np.asarray(ref), err_msg=f"{cfg} {seed=}")


def test_gemv_tiles_fit_shared_memory_in_fp32():
  """The dense down GEMV's tile (tuned on bf16) keeps its 128-row step in bf16 and halves it
  in fp32, where the H200 refused it (272 KB asked of 227)."""
  from pallas_kernels import _decode_mask, moc_decode

  down = _decode_mask.down_gemv_config(moc_decode.dense_config(1, 2048, 5464))
  assert _decode_gemv.fit_block_d(down, 5464, down.gemv_block_f, 2) == down.gemv_block_d == 128
  fp32 = _decode_gemv.fit_block_d(down, 5464, down.gemv_block_f, 4)
  assert fp32 == 64
  assert down.gemv_stages * fp32 * down.gemv_block_f * 4 <= _decode_gemv.SMEM_BUDGET_BYTES


@pytest.mark.parametrize(("num_tokens", "prefetch"), [(1, False), (3, False), (1, True)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_rowdot_norm_prologue_and_residual_epilogue(num_tokens, prefetch, dtype):
  """rowdot(norm=…, residual=…) equals the model's RMSNorm, then rowdot, then the residual add
  (an odd D split into several steps); swiglu's norm likewise; the normalized x it returns is
  the norm's output."""
  from moc_jax.model import RMSNorm

  seed = _seed()
  d, n = 200, 1376
  x, w = _inputs(seed, (num_tokens,), d, n, dtype)
  x = x * 3 + 1  # a norm that does something
  norm = RMSNorm(d, 1e-5, jnp.float32, nnx.Rngs(0))
  norm.scale[...] = jax.random.uniform(jax.random.key(seed + 1), (d,), jnp.float32, 0.5, 1.5)
  residual = jax.random.normal(jax.random.key(seed + 2), (num_tokens, n), dtype)
  cfg = _decode_rowdot.RowdotConfig(block_n=16, block_d=64, prefetch=prefetch)
  xn = norm(x)
  want = (reference.linear(xn, w) + residual).astype(dtype)
  got, got_xn = _decode_rowdot.rowdot(
    x,
    w.T,
    config=cfg,
    norm=(norm.scale[...], 1e-5),
    residual=residual,
    return_normed=True,
    interpret=True,
  )
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(
    np.asarray(got_xn, np.float32), np.asarray(xn, np.float32), rtol=tol, atol=tol
  )
  np.testing.assert_allclose(
    np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol
  )
  wu = jax.random.normal(jax.random.key(seed + 3), (d, n), dtype) * d**-0.5
  z = _decode_rowdot.swiglu(x, w.T, wu.T, config=cfg, norm=(norm.scale[...], 1e-5), interpret=True)
  g, u = reference.linear(xn, w, jnp.float32), reference.linear(xn, wu, jnp.float32)
  want_z = (jax.nn.silu(g) * u).astype(dtype)
  np.testing.assert_allclose(
    np.asarray(z, np.float32), np.asarray(want_z, np.float32), rtol=tol, atol=tol
  )
  with pytest.raises(ValueError, match="needs a norm"):
    _decode_rowdot.rowdot(x, w.T, return_normed=True, interpret=True)


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


@pytest.mark.parametrize("programs", [1, 3, 7])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_rowdot_programs_stream_their_blocks_bit_for_bit(programs, dtype):
  """`RowdotConfig.programs`: a few programs, each taking row blocks pid, pid + programs, …
  with its loads a step ahead, give one program per block's bits (odd N: 173 blocks of 8 rows,
  so programs hold different counts; D in 7 steps), with the norm, the residual, the
  normalized x, zero-padded columns and the SwiGLU; more tokens ignore it."""
  seed = _seed()
  d, n = 200, 1379
  x, w = _inputs(seed, (1,), d, n, dtype)
  scale = jax.random.uniform(jax.random.key(seed + 1), (d,), jnp.float32, 0.5, 1.5)
  residual = jax.random.normal(jax.random.key(seed + 2), (1, n), dtype)
  plain = _decode_rowdot.RowdotConfig(block_n=8, block_d=32)
  many = dataclasses.replace(plain, programs=programs)
  run = lambda cfg, **kw: _decode_rowdot.rowdot(x, w.T, config=cfg, interpret=True, **kw)
  same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b), f"{seed=}")
  same(run(many), run(plain))
  kw = dict(norm=(scale, 1e-5), residual=residual, return_normed=True)
  for got, want in zip(run(many, **kw), run(plain, **kw), strict=True):
    same(got, want)
  same(
    run(many, out_cols=1400, out_dtype=jnp.float32),
    run(plain, out_cols=1400, out_dtype=jnp.float32),
  )
  wu = jax.random.normal(jax.random.key(seed + 3), (n, d), dtype)
  swiglu = lambda cfg: _decode_rowdot.swiglu(x, w.T, wu, config=cfg, interpret=True)
  same(swiglu(many), swiglu(plain))
  x3 = jnp.concatenate([x, x + 1, x - 1])
  three = lambda cfg: _decode_rowdot.rowdot(x3, w.T, config=cfg, interpret=True)
  same(three(many), three(plain))
