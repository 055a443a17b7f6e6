"""Decode FFN kernels against the jnp references (interpret mode on CPU, compiled on GPU).

Fresh random inputs every run (seeded by the clock, printed on failure). Ties are made on
purpose with small-integer gates, whose sums are exact in any order and any float type.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _decode_list, _l2_prefetch, moc_decode, reference, topk

# Small blocks so that the tiny CPU shapes still cover several programs, splits and edges.
SMALL = moc_decode.DecodeConfig(
  gemv_block_f=32,
  gemv_block_d=16,
  gemv_splits=2,
  select_radix_bits=4,
  up_block_c=16,
  up_block_d=32,
  down_splits=3,
  down_block_c=16,
  down_block_d=16,
)
# The list pipeline with small blocks: several programs per token, a partial last step.
LIST = dataclasses.replace(
  SMALL, pipeline="list", list_rows=4, list_programs=8, list_block_d=32, t1_dot=True
)
# The list pipeline selecting with the training top-K kernel (G from one D split or summed).
TOPK = dataclasses.replace(LIST, topk=topk.CHUNKED)
TOPK_SPLIT1 = dataclasses.replace(TOPK, gemv_splits=1, topk=topk.ONE_BLOCK)


def _seed() -> int:
  return time.time_ns() % (2**31)


def _rel_err(a: jax.Array, b: jax.Array) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.isfinite(a).all()
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _weights(seed: int, num_tokens: int, d_model: int, d_ff: int, dtype, integer_gate: bool):
  """x, Wg (D×F), Wu^T (F×D), Wd (F×D). integer_gate: G exact, with many ties."""
  ks = jax.random.split(jax.random.key(seed), 4)
  if integer_gate:
    x = jax.random.randint(ks[0], (num_tokens, d_model), -2, 3).astype(dtype)
    wg = jax.random.randint(ks[1], (d_model, d_ff), -2, 3).astype(dtype)
  else:
    x = jax.random.normal(ks[0], (num_tokens, d_model), dtype)
    wg = (jax.random.normal(ks[1], (d_model, d_ff)) * d_model**-0.5).astype(dtype)
  wu = (jax.random.normal(ks[2], (d_ff, d_model)) * d_model**-0.5).astype(dtype)
  wd = (jax.random.normal(ks[3], (d_ff, d_model)) * d_ff**-0.5).astype(dtype)
  return x, wg, wu, wd


@pytest.mark.parametrize(
  ("num_tokens", "d_ff", "k", "variant", "dtype", "integer_gate", "cfg"),
  [
    (1, 203, 40, "moc", jnp.float32, False, SMALL),  # odd F, one token (multiply-reduce path)
    (3, 136, 34, "moc_2of8", jnp.float32, True, SMALL),  # ties inside groups of 8
    (16, 100, 23, "moc", jnp.bfloat16, True, SMALL),  # ties at the threshold, bf16, tl.dot path
    (16, 203, 41, "moc", jnp.float32, True, None),  # moc_config at T = 16 (mask pipeline)
    # the mask pipeline with all of Wd through the split-K GEMV
    (5, 136, 34, "moc_2of8", jnp.bfloat16, False, dataclasses.replace(SMALL, dense_down="gemv")),
    (1, 171, 37, "moc", jnp.float32, True, LIST),  # odd F, ties, lists; T = 1 via tl.dot
    (3, 136, 34, "moc_2of8", jnp.bfloat16, True, LIST),  # group lists, several tokens
    (4, 203, 41, "moc", jnp.bfloat16, False, LIST),  # T = 4, the list pipeline's largest
    (1, 1376, 250, "moc", jnp.bfloat16, True, None),  # decode_ffn's own config (moc_config)
    (1, 1376, 250, "moc", jnp.bfloat16, True, dataclasses.replace(LIST, select_granule=32)),
    (3, 203, 41, "moc", jnp.float32, True, dataclasses.replace(SMALL, select_granule=16)),
    (3, 203, 41, "moc", jnp.float32, True, dataclasses.replace(SMALL, select_chunk=32)),
    (1, 1376, 250, "moc", jnp.bfloat16, True, TOPK),  # ties, odd F, training top-K select
    (3, 203, 41, "moc", jnp.float32, True, TOPK_SPLIT1),  # fp32 keys, G written by the GEMV
    (3, 203, 41, "moc", jnp.float32, True, dataclasses.replace(TOPK, gemv_splits=3)),  # folded
    (1, 1376, 250, "moc", jnp.bfloat16, True, dataclasses.replace(TOPK, fold_gate_sum=False)),
    (2, 136, 34, "moc_2of8", jnp.bfloat16, False, TOPK),
    (2, 203, 1, "moc", jnp.bfloat16, False, LIST),  # K = 1
    (1, 200, 100, "moc", jnp.float32, False, LIST),  # K = F/2
  ],
)
def test_decode_ffn_matches_reference(num_tokens, d_ff, k, variant, dtype, integer_gate, cfg):
  seed, d_model = _seed(), 48
  x, wg, wu, wd = _weights(seed, num_tokens, d_model, d_ff, dtype, integer_gate)
  y = moc_decode.decode_ffn(x, wg, wu, wd, k, variant, config=cfg, interpret=True)
  want = reference.decode_ffn(x, wg, wu, wd, k, variant)
  assert y.shape == want.shape and y.dtype == want.dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  assert _rel_err(y, want) < tol, f"{seed=}"


@pytest.mark.parametrize(
  ("num_tokens", "d_ff", "k", "variant", "dtype", "cfg"),
  [
    (1, 1376, 250, "moc", jnp.bfloat16, None),  # moc_config: list pipeline, training top-K
    (3, 203, 41, "moc", jnp.float32, TOPK),
    (2, 136, 34, "moc_2of8", jnp.bfloat16, TOPK),
    (5, 203, 41, "moc", jnp.float32, SMALL),  # mask pipeline: G as the select's one partial
    (3, 136, 34, "moc_2of8", jnp.bfloat16, LIST),  # list pipeline, decode select
  ],
)
def test_decode_ffn_output_major_gate(num_tokens, d_ff, k, variant, dtype, cfg):
  """The gate weight given as Wgᵀ (F × D) to the rowdot GEMV: the same FFN, ties included."""
  seed, d_model = _seed(), 48
  x, wg, wu, wd = _weights(seed, num_tokens, d_model, d_ff, dtype, True)
  y = moc_decode.decode_ffn(
    x, wg.T, wu, wd, k, variant, config=cfg, interpret=True, output_major=True
  )
  want = reference.decode_ffn(x, wg, wu, wd, k, variant)
  assert _rel_err(y, want) < (1e-5 if dtype == jnp.float32 else 2e-2), f"{seed=}"


@pytest.mark.parametrize(
  ("splits", "num_tokens", "d_model", "dtype", "residual"),
  [
    (5, 3, 200, jnp.bfloat16, True),  # splits not a power of two, odd D
    (128, 1, 2048, jnp.float32, True),  # the 1b shape at T = 1: 32-column programs
    (7, 2, 33, jnp.bfloat16, False),
  ],
)
def test_sum_partials_matches_float64(splits, num_tokens, d_model, dtype, residual):
  """round(Σ partials) (+ residual, rounded as XLA adds) against the float64 sum: within one
  rounding of the output, plus the fp32 sum's own error (~1e-6 per partial of unit size)."""
  seed = _seed()
  kp, kr = jax.random.split(jax.random.key(seed))
  p = jax.random.normal(kp, (splits, num_tokens, d_model), jnp.float32)
  r = jax.random.normal(kr, (num_tokens, d_model), dtype) if residual else None
  got = _decode_list.sum_partials(p, dtype, r, interpret=True)
  assert got.shape == (num_tokens, d_model) and got.dtype == dtype
  want = np.asarray(jnp.asarray(np.asarray(p, np.float64).sum(0), jnp.float32).astype(dtype))
  if residual:
    want = np.asarray((jnp.asarray(want, jnp.float32) + r.astype(jnp.float32)).astype(dtype))
  ulp = 2.0**-7 if dtype == jnp.bfloat16 else 2.0**-22
  np.testing.assert_allclose(
    np.asarray(got, np.float32),
    want.astype(np.float32),
    rtol=ulp,
    atol=1e-6 * splits,
    err_msg=f"{seed=}",
  )


@pytest.mark.parametrize(
  ("num_tokens", "d_ff", "k", "cfg"),
  [
    (1, 1376, 250, "kernel"),  # moc_config (list pipeline, training top-K), the Pallas sum
    (1, 1376, 250, "xla"),
    (3, 203, 41, dataclasses.replace(TOPK, list_sum="kernel")),
    (5, 203, 41, SMALL),  # mask pipeline: the add after the down projection
  ],
)
def test_decode_ffn_norm_and_residual(num_tokens, d_ff, k, cfg):
  """residual + FFN(RMSNorm(x)) with the norm in the gate GEMV and the residual added in the
  sum of the rows' partials (list_sum 'kernel') or by XLA: the reference's, in fp32."""
  seed, d_model = _seed(), 48
  x, wg, wu, wd = _weights(seed, num_tokens, d_model, d_ff, jnp.float32, False)
  scale = jax.random.uniform(jax.random.key(seed + 1), (d_model,), jnp.float32, 0.5, 1.5)
  r = jax.random.normal(jax.random.key(seed + 2), x.shape, jnp.float32)
  if isinstance(cfg, str):
    cfg = dataclasses.replace(moc_decode.moc_config(num_tokens, d_model, d_ff), list_sum=cfg)
  y = moc_decode.decode_ffn(
    x,
    wg.T,
    wu,
    wd,
    k,
    "moc",
    config=cfg,
    interpret=True,
    output_major=True,
    norm=(scale, 1e-6),
    residual=r,
  )
  xn = reference.rms_norm(x, scale, 1e-6)
  want = r + reference.decode_ffn(xn, wg, wu, wd, k, "moc")
  assert _rel_err(y, want) < 1e-5, f"{seed=}"


@pytest.mark.parametrize("num_tokens", [1, 3, 17])  # 17: prefill, XLA on the transposed weights
def test_dense_decode_ffn_output_major(num_tokens):
  """Wgᵀ, Wuᵀ and Wdᵀ through two rowdot launches (SwiGLU in the first one's epilogue)."""
  seed, d_model, d_ff = _seed(), 48, 203
  x, wg, wu_t, wd = _weights(seed, num_tokens, d_model, d_ff, jnp.float32, False)
  y = moc_decode.dense_decode_ffn(x, wg.T, wu_t, wd.T, interpret=True, output_major=True)
  want = reference.dense_decode_ffn(x, wg, wu_t.T, wd)
  assert _rel_err(y, want) < 1e-5, f"{seed=}"


@pytest.mark.parametrize(
  ("num_tokens", "splits", "t1_dot", "down"),
  [
    (1, 2, False, "rows"),
    (3, 1, False, "rows"),
    (1, 1, True, "rows"),
    (3, 2, True, "gemv"),
    (1, 2, True, "gemv"),
    (2, None, True, "default"),  # dense_config's blocks (wider than this shape), 16 splits
  ],
)
def test_dense_decode_ffn_matches_xla(num_tokens, splits, t1_dot, down):
  """Split-K partials (then XLA's SwiGLU) and the fused SwiGLU epilogue give the same FFN, with
  either down projection (the split-K GEMV takes the down_* knobs)."""
  seed, d_model, d_ff = _seed(), 48, 136
  x, wg, wu_t, wd = _weights(seed, num_tokens, d_model, d_ff, jnp.float32, False)
  cfg = None  # default: dense_config
  if down != "default":
    cfg = dataclasses.replace(SMALL, gemv_splits=splits, t1_dot=t1_dot, dense_down=down)
  y = moc_decode.dense_decode_ffn(x, wg, wu_t.T, wd, config=cfg, interpret=True)
  want = reference.dense_decode_ffn(x, wg, wu_t.T, wd)
  assert _rel_err(y, want) < 1e-5, f"{seed=}"


@pytest.mark.parametrize(("max_bytes", "programs"), [(10**9, 3), (5000, 3), (20002, 7), (2, 1)])
def test_warm_programs_read_exactly_the_first_bytes(max_bytes, programs):
  """The L2-warming programs together read the first max_bytes of the weight, each once."""
  seed = _seed()
  w = jax.random.normal(jax.random.key(seed), (64, 300)).astype(jnp.bfloat16)
  sums = _l2_prefetch.warm_sums([(w, max_bytes)], programs=programs, interpret=True)
  n = min(w.size, max_bytes // 2)
  want = np.asarray(w, np.float64).reshape(-1)[:n].sum()
  np.testing.assert_allclose(float(np.sum(np.asarray(sums, np.float64))), want, atol=1e-3)
  assert sums.shape == (programs,)


@pytest.mark.parametrize(("budgets", "programs"), [((5000, 10**9), 7), ((600, 0, 40), 2)])
def test_warm_programs_share_several_weights(budgets, programs):
  """Several weights: each warming program reads from one of them, and together they read
  the first bytes asked of each (none of a weight asked for 0), each byte once."""
  seed = _seed()
  keys = jax.random.split(jax.random.key(seed), len(budgets))
  ws = [jax.random.normal(k, (40 + 8 * i, 100)).astype(jnp.bfloat16) for i, k in enumerate(keys)]
  warm = list(zip(ws, budgets, strict=True))
  sums = _l2_prefetch.warm_sums(warm, programs=programs, interpret=True)
  plan = _l2_prefetch._plan(warm, programs)
  assert sums.shape == (programs,) and sum(count for *_, count in plan) == programs
  got = np.asarray(sums, np.float64)
  asked = [(w, b) for w, b in zip(ws, budgets, strict=True) if b]
  for (_, n, first, count), (w, b) in zip(plan, asked, strict=True):
    assert n == min(w.size, b // 2)
    want = np.asarray(w, np.float64).reshape(-1)[:n].sum()
    np.testing.assert_allclose(got[first : first + count].sum(), want, atol=1e-3)


@pytest.mark.parametrize("fold", [True, False])
def test_decode_ffn_with_warm_lowers_and_matches(fold):
  """Warming L2 from the top-K launch leaves y as it was (CPU: the kernel runs alone) and the
  one launch with the warming programs lowers to a Triton call for CUDA."""
  seed = _seed()
  x, wg, wu, wd = _weights(seed, 1, 64, 300, jnp.bfloat16, False)
  warm = jax.random.normal(jax.random.key(seed + 1), (64, 192)).astype(jnp.bfloat16)
  cfg = dataclasses.replace(TOPK, fold_gate_sum=fold)
  warm_cfg = dataclasses.replace(cfg, warm_bytes=5000, warm_programs=3)
  y = moc_decode.decode_ffn(x, wg, wu, wd, 40, "moc", config=cfg)
  y_warm = moc_decode.decode_ffn(x, wg, wu, wd, 40, "moc", config=warm_cfg, warm=warm)
  np.testing.assert_array_equal(np.asarray(y_warm, np.float32), np.asarray(y, np.float32))
  fn = functools.partial(
    moc_decode.decode_ffn, k=40, variant="moc", config=warm_cfg, interpret=False
  )
  text = jax.jit(fn).trace(x, wg, wu, wd, warm=warm).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") >= 2  # gate GEMV, top-K + warming, rows


def test_sum_kernel_lowers_for_cuda_and_bad_list_sum():
  """The list pipeline with list_sum='kernel' lowers its partial sum to a Triton call of its
  own; an unknown list_sum is refused by name."""
  seed = _seed()
  x, wg, wu, wd = _weights(seed, 1, 64, 300, jnp.bfloat16, False)
  cfg = dataclasses.replace(moc_decode.moc_config(1, 64, 300), list_sum="kernel")
  fn = functools.partial(
    moc_decode.decode_ffn, k=40, variant="moc", config=cfg, interpret=False, output_major=True
  )
  text = jax.jit(fn).trace(x, wg.T, wu, wd, residual=x).lower(lowering_platforms=("cuda",))
  assert "decode_rows_sum" in text.as_text()
  with pytest.raises(ValueError, match="list_sum"):
    dataclasses.replace(cfg, list_sum="atomic")


@pytest.mark.gpu
def test_decode_ffn_sum_kernel_gpu():
  """Compiled at the 1b shape (T = 1, bf16, the norm in the gate GEMV): the rows' partials
  summed with the residual by `sum_partials` give what XLA's sum and add give, within one
  bf16 rounding (the two sums' orders differ)."""
  d_model, d_ff, k = 2048, 5464, 1024
  seed = _seed()
  x, wg, wu, wd = _weights(seed, 1, d_model, d_ff, jnp.bfloat16, False)
  scale = jax.random.uniform(jax.random.key(seed + 1), (d_model,), jnp.float32, 0.5, 1.5)
  r = jax.random.normal(jax.random.key(seed + 2), x.shape, jnp.bfloat16)
  cfg = moc_decode.moc_config(1, d_model, d_ff)
  kw = dict(output_major=True, norm=(scale, 1e-6), residual=r)
  wg_t = wg.T.copy()
  y_xla = moc_decode.decode_ffn(x, wg_t, wu, wd, k, "moc", config=cfg, **kw)
  jnp.full(x.shape, jnp.nan, jnp.bfloat16).block_until_ready()  # poison, freed
  kernel_cfg = dataclasses.replace(cfg, list_sum="kernel")
  y = moc_decode.decode_ffn(x, wg_t, wu, wd, k, "moc", config=kernel_cfg, **kw)
  np.testing.assert_allclose(
    np.asarray(y, np.float32), np.asarray(y_xla, np.float32), rtol=2**-7, atol=1e-2
  )


@pytest.mark.gpu
@pytest.mark.parametrize("d_model", [2048, 4096])  # the top-K sums the gate partials at 2048
def test_decode_ffn_warm_gpu_exact(d_model):
  """Compiled: the top-K launch with 264 warming programs gives y bit for bit as without."""
  d_ff, k = (5464, 1024) if d_model == 2048 else (11008, 2048)
  cfg = moc_decode.moc_config(1, d_model, d_ff)
  warm_cfg = dataclasses.replace(cfg, warm_bytes=24 << 20)
  seed = _seed()
  x, wg, wu, wd = _weights(seed, 1, d_model, d_ff, jnp.bfloat16, False)
  warm = jax.random.normal(jax.random.key(seed + 1), (d_model, 3 * d_model), jnp.bfloat16)
  y = moc_decode.decode_ffn(x, wg, wu, wd, k, "moc", config=cfg)
  y_warm = moc_decode.decode_ffn(x, wg, wu, wd, k, "moc", config=warm_cfg, warm=warm)
  np.testing.assert_array_equal(np.asarray(y_warm, np.float32), np.asarray(y, np.float32))
  with jax.default_matmul_precision("highest"):
    want = reference.decode_ffn(x, wg, wu, wd, k, "moc")
  assert _rel_err(y_warm, want) < 3e-2, f"{seed=}"


@pytest.mark.gpu
@pytest.mark.parametrize(
  ("num_tokens", "variant", "pipeline"),
  [  # most wanted first: T = 4 was cut by the 70 s session limit on 2026-11-28b, untested
    (4, "moc", "list"),
    (1, "moc", "list"),
    (16, "moc", "mask"),
    (1, "moc_2of8", "list"),
    (16, "moc_2of8", "list"),
    (1, "moc", "mask"),
    (1, "moc", "pieces"),
    (1, "moc", "chunk512"),
    (1, "moc", "topk"),
    (4, "moc", "topk"),
  ],
)
def test_decode_ffn_gpu_real_size(num_tokens, variant, pipeline):
  """Compiled kernels at the 1B decode shape: fp32 (exact selection) and bf16."""
  d_model, d_ff, k = 2048, 5464, 1024
  cfg = moc_decode.moc_config(num_tokens, d_model, d_ff)
  if pipeline == "pieces":  # the decode select over power-of-two pieces
    cfg = dataclasses.replace(cfg, pipeline="list", select_granule=256, topk=None)
  elif pipeline == "chunk512":  # the decode select on 512-lane chunks
    cfg = dataclasses.replace(cfg, pipeline="list", select_chunk=512, topk=None)
  elif pipeline == "topk":  # the list pipeline with another top-K config than the default
    cfg = dataclasses.replace(cfg, pipeline="list", topk=topk.CHUNKED)
  else:  # the mask pipeline selects with the decode select
    cfg = dataclasses.replace(cfg, pipeline=pipeline, topk=cfg.topk if pipeline == "list" else None)
  for dtype, integer_gate, tol in ((jnp.float32, True, 1e-5), (jnp.bfloat16, False, 3e-2)):
    seed = _seed()
    x, wg, wu, wd = _weights(seed, num_tokens, d_model, d_ff, dtype, integer_gate)
    if integer_gate:
      x, wg = x * 0.125, wg * 0.125  # still exact: powers of 2
    y = moc_decode.decode_ffn(x, wg, wu, wd, k, variant, config=cfg)
    with jax.default_matmul_precision("highest"):
      want = reference.decode_ffn(x, wg, wu, wd, k, variant)
    assert _rel_err(y, want) < tol, f"{seed=} {dtype=}"
    with jax.default_matmul_precision("highest"):
      want_d = reference.dense_decode_ffn(x, wg, wu.T, wd)
    yd = moc_decode.dense_decode_ffn(x, wg, wu.T, wd)  # split-K GEMVs, dense_config
    assert _rel_err(yd, want_d) < tol, f"{seed=} {dtype=}"


@pytest.mark.parametrize("bad", [dict(pipeline="x"), dict(dense_down="x"), dict(topk=topk.CHUNKED)])
def test_config_errors(bad):
  """A bad DecodeConfig field fails when the config is made (topk needs the list pipeline)."""
  with pytest.raises(ValueError):
    moc_decode.DecodeConfig(**bad)
