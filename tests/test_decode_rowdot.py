"""The output-major decode GEMV `rowdot` (interpret mode on CPU, compiled on GPU) against a
float64 reference: odd shapes, its config picks, the norm prologue and residual epilogue, the
padded output, the loads one step ahead and the resident grid (`RowdotConfig.programs`)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _gemv_inputs import TOL
from _gemv_inputs import inputs as _inputs
from _gemv_inputs import rel_err_f64 as _rel_err_f64
from _gemv_inputs import seed as _seed  # tests/ is on sys.path (as for _fast_compile)
from flax import nnx

from pallas_kernels import _decode_rowdot, reference


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


def test_rowdot_config_streams_only_narrow_one_token_gemvs():
  """streaming=True: q, k, v, the output projection and MoC's gate (T = 1, one weight,
  512-wide steps, N < 16384) load a step ahead on 4 resident programs per SM; 2048-wide steps
  (dense's down GEMV, every one-weight GEMV at d > 2048), the unembedding, the SwiGLU's two
  weights and T > 1 keep their tile."""
  pick = functools.partial(_decode_rowdot.rowdot_config, streaming=True)
  sms = _decode_rowdot.tu.sm_count()
  for d, n in ((2048, 6144), (2048, 2048), (2048, 5464), (512, 1376)):
    cfg = pick(1, d, n)
    plain = _decode_rowdot.rowdot_config(1, d, n)
    assert cfg == dataclasses.replace(plain, prefetch=True, programs=4 * sms), (d, n)
  for args in ((1, 5464, 2048), (1, 4096, 11008), (1, 2048, 32000), (4, 2048, 6144)):
    assert pick(*args) == _decode_rowdot.rowdot_config(*args), args
  assert pick(1, 2048, 5464, weights=2) == _decode_rowdot.RowdotConfig()


@pytest.mark.parametrize("ffn", ["moc", "dense"])
def test_model_decode_prefetch_reaches_the_gemvs_and_keeps_the_tokens(monkeypatch, ffn):
  """model.decode_prefetch (on by default) hands the narrow GEMVs the
  streaming tile (q, k, v, the output projection, MoC's gate) and the attention its loads a
  block ahead; the fp32 tiny model's greedy tokens are the same either way (interpret mode)."""
  from moc_jax import generate, model_config
  from moc_jax.model import Transformer
  from pallas_kernels import decode_attention

  cfg = model_config.from_preset("tiny", vocab_size=301, num_layers=2, dtype="float32", ffn=ffn)
  assert cfg.decode_prefetch
  assert cfg.decode_attention_warm_mb == 16
  seen, attn = [], []
  rowdot, attend = _decode_rowdot._rowdot, decode_attention.attend_qkv
  monkeypatch.setattr(
    _decode_rowdot,
    "_rowdot",
    lambda x, ws, c, *a: seen.append((len(ws), c.prefetch, c.programs)) or rowdot(x, ws, c, *a),
  )
  monkeypatch.setattr(
    decode_attention,
    "attend_qkv",
    lambda *a, **kw: attn.append(kw["prefetch"]) or attend(*a, **kw),
  )
  tokens = {}
  for on in (True, False):
    seen.clear(), attn.clear()
    m = generate.with_backend(
      Transformer(dataclasses.replace(cfg, decode_prefetch=on), nnx.Rngs(3)),
      "pallas",
      decode_attention="fused",
      decode_gemv="rowdot",
    )
    tokens[on] = generate.generate(m, [[1, 5, 9, 13, 2]], 3)  # T = 1: one row
    streamed = {(p, g > 0) for w, p, g in seen if w == 1}
    assert (True, True) in streamed if on else streamed <= {(False, False)}
    assert attn and set(attn) == {on}
  assert tokens[True] == tokens[False]


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
