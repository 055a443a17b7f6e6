"""Model shapes, parameter annotations, KV-cache decoding and document masking."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moc_jax import model, model_config
from moc_jax.model import Transformer, count_params

F32 = jnp.float32


def _tiny(**kw):
  kw = {"vocab_size": 320, "dtype": "float32", **kw}
  return model_config.from_preset("tiny", **kw)


@pytest.mark.parametrize("ffn", ["dense", "moc", "moc_2of8"])
def test_logits_shape_and_parameter_count(ffn):
  cfg = _tiny(ffn=ffn)
  model = Transformer(cfg, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, cfg.vocab_size)
  logits = model(tokens)
  assert logits.shape == (2, 24, cfg.vocab_size) and logits.dtype == jnp.float32
  d, f, v, n = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.num_layers
  expected = 2 * v * d + d + n * (4 * d * d + 3 * d * f + 2 * d)
  assert count_params(model) == expected


def test_parameters_carry_logical_axis_names():
  model = Transformer(_tiny(), nnx.Rngs(0))
  specs = nnx.get_partition_spec(nnx.state(model, nnx.Param))
  ffn = specs["blocks"][0]["ffn"]
  assert tuple(ffn["w_gate"].value) == ("embed", "mlp")
  assert tuple(ffn["w_down"].value) == ("mlp", "embed")
  assert tuple(specs["embed"].value) == ("vocab", "embed")
  assert tuple(specs["blocks"][0]["attn"]["w_q"].value) == ("embed", "heads", "head_dim")


def test_init_is_normal_with_std_002_and_no_biases():
  model = Transformer(_tiny(), nnx.Rngs(0))
  w = np.asarray(model.blocks[0].ffn.w_up[...])
  assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
  names = [str(p) for p, _ in nnx.iter_graph(model)]
  assert not any("bias" in n for n in names)


@pytest.mark.parametrize(
  ("ffn", "backend"),
  [("dense", "xla"), ("moc", "xla"), ("dense", "pallas")],  # pallas: interpret mode on CPU
)
def test_kv_cache_decoding_matches_the_full_forward(ffn, backend):
  """Prefill then single steps from the decode-layout weights (pallas: the kernels, in
  interpret mode on CPU)."""
  cfg = _tiny(ffn=ffn, kernel_backend=backend)
  model = Transformer(cfg, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
  full = model(tokens)
  model.prepare_for_decode()
  cache = model.init_cache(2, 16)
  graphdef, state = nnx.split(model)  # jitted: one compile per shape, not one per op
  decode = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s).decode(t, p, c))
  prefill, cache = decode(state, tokens[:, :8], jnp.broadcast_to(jnp.arange(8), (2, 8)), cache)
  steps = [prefill]
  for t in range(8, 12):
    logits, cache = decode(state, tokens[:, t : t + 1], jnp.full((2, 1), t), cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-4, rtol=2e-4)


def test_a_token_never_sees_another_document_in_its_row():
  cfg = _tiny()
  model = Transformer(cfg, nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(3), (1, 16), 0, cfg.vocab_size)
  segments = jnp.array([[1] * 6 + [2] * 7 + [0] * 3])
  positions = jnp.array([list(range(6)) + list(range(7)) + [0] * 3])
  other = tokens.at[0, :6].set((tokens[0, :6] + 7) % cfg.vocab_size)  # change document 1
  a = model(tokens, positions, segments)
  b = model(other, positions, segments)
  np.testing.assert_array_equal(a[0, 6:13], b[0, 6:13])  # document 2 unaffected, bitwise
  assert not np.allclose(a[0, :6], b[0, :6])
  # and document 2 alone, at the start of a row, gives the same logits
  alone = model(tokens[:, 6:13], jnp.arange(7)[None], jnp.ones((1, 7), jnp.int32))
  np.testing.assert_allclose(alone[0], a[0, 6:13], atol=1e-5)


def test_remat_policies_give_the_same_gradients():
  tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 320)
  grads = []
  for remat in model_config.REMAT_POLICIES:
    graphdef, state = nnx.split(Transformer(_tiny(remat=remat), nnx.Rngs(0)))
    loss = lambda s, g=graphdef: nnx.merge(g, s)(tokens).mean()
    grads.append(jax.jit(jax.grad(loss))(state))
  for other in grads[1:]:
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(other), strict=True):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
  "overrides,message",
  [
    ({"ffn": "topk"}, "model.ffn='topk' is not valid"),
    ({"k": 0}, "0 < k <= d_ff"),
    ({"k": 345}, "0 < k <= d_ff"),
    ({"ffn": "moc_2of8", "d_ff": 340}, "divisible by 8"),
    ({"remat": "some"}, "model.remat"),
  ],
)
def test_bad_model_config_names_the_problem(overrides, message):
  with pytest.raises(model_config.ConfigError, match=message):
    _tiny(**overrides)


def test_unknown_preset_lists_the_valid_ones():
  with pytest.raises(model_config.ConfigError, match="tiny, 60m, 130m, 350m, 1b"):
    model_config.from_preset("2b")


def test_presets_match_the_paper():
  for name, (d, f, layers, heads, k) in {
    "60m": (512, 1376, 8, 8, 256),
    "130m": (768, 2048, 12, 12, 384),
    "350m": (1024, 2736, 24, 16, 512),
    "1b": (2048, 5461, 24, 32, 1024),
  }.items():
    c = model_config.from_preset(name)
    assert (c.d_model, c.d_ff, c.num_layers, c.num_heads, c.k) == (d, f, layers, heads, k)


def test_unembed_backward_runs_in_the_compute_dtype():
  """fp32: exactly autodiff's gradients. bf16: the backward GEMMs take a bf16 cotangent (no
  fp32 GEMMs in the step), within one bf16 rounding of autodiff's fp32-promoted gradients."""
  ks = jax.random.split(jax.random.key(time.time_ns() % 2**31), 3)
  x, w = jax.random.normal(ks[0], (2, 5, 16)), jax.random.normal(ks[1], (16, 40))
  ct = jax.random.normal(ks[2], (2, 5, 40))
  ours = lambda x, w: jnp.sum(model.unembed(x, w) * ct)
  plain = lambda x, w: jnp.sum(jnp.einsum("bld,dv->blv", x, w, preferred_element_type=F32) * ct)
  for got, want in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  text = jax.jit(jax.grad(ours, (0, 1))).lower(xb, wb).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert len(dots) == 2  # the two backward GEMMs (the forward value is unused here)
  for line in dots:  # operand types: (tensor<...xbf16>, tensor<...xbf16>) -> fp32 result
    operands = line.rsplit(":", 1)[1].split("->")[0]
    assert "f32>" not in operands.replace("bf16>", ""), line
  grads = jax.grad(ours, (0, 1))(xb, wb)
  for got, want in zip(grads, jax.grad(plain, (0, 1))(xb, wb), strict=True):
    assert got.dtype == jnp.bfloat16
    err = np.max(np.abs(np.float32(got) - np.float32(want))) / np.max(np.abs(np.float32(want)))
    assert err < 2e-2
