"""moc_ffn against a float64 dense-masked reference: forward, all four gradients, variants,
GCP, padding, and the proof that no (tokens × F) residual survives the forward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moc_jax import moc
from pallas_kernels import reference

ALL_GRADS = (0, 1, 2, 3)


def _inputs(seed, lead, d, f, dtype, ties=False):
  ks = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(ks[0], (*lead, d), jnp.float32)
  if ties:  # gate values from a tiny integer set: many exact ties per row
    x = jnp.round(x)
  w_gate = jax.random.normal(ks[1], (d, f)) * (1.0 if ties else d**-0.5)
  if ties:
    w_gate = jnp.round(w_gate)
  w_up = jax.random.normal(ks[2], (d, f)) * d**-0.5
  w_down = jax.random.normal(ks[3], (f, d)) * f**-0.5
  ct = jax.random.normal(ks[4], (*lead, d))
  return x.astype(dtype), w_gate, w_up, w_down, ct


def _masked_reference(x, w_gate, w_up, w_down, mask):
  """Dense SwiGLU in float64 with the unselected channels zeroed (selection held constant)."""
  f64 = lambda a: np.asarray(a, np.float64)
  x, w_gate, w_up, w_down = map(f64, (x, w_gate, w_up, w_down))

  def fwd(x, wg, wu, wd):
    return (jnp.where(mask, jax.nn.silu(x @ wg) * (x @ wu), 0.0)) @ wd

  return fwd, (x, w_gate, w_up, w_down)


def _selection_mask(x, w_gate, k, variant):
  """The op's own selection (on the compute-dtype gate values), as a (..., F) mask."""
  g = (x @ w_gate.astype(x.dtype)).reshape(-1, w_gate.shape[1])
  idx, _ = reference.topk_select(g, k) if variant == "moc" else reference.group_select(g)
  mask = np.zeros(g.shape, bool)
  np.put_along_axis(mask, np.asarray(idx), True, axis=-1)
  return mask.reshape(*x.shape[:-1], -1)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


CASES = [
  # (lead dims, d, F, k, variant, dtype, ties)
  ((2, 3), 16, 1376, 256, "moc", jnp.float32, False),
  ((3,), 16, 5461, 1024, "moc", jnp.float32, False),
  ((3, 2, 2), 16, 40, 7, "moc", jnp.float32, True),
  ((6,), 16, 48, 1, "moc", jnp.float32, False),
  ((4,), 16, 64, 32, "moc", jnp.bfloat16, False),
  ((2, 3), 16, 2736, None, "moc_2of8", jnp.float32, False),
  ((5,), 16, 64, None, "moc_2of8", jnp.bfloat16, True),
]


@pytest.mark.parametrize("lead,d,f,k,variant,dtype,ties", CASES)
@pytest.mark.parametrize("gcp", [False, True])
def test_forward_and_gradients_match_float64_reference(lead, d, f, k, variant, dtype, ties, gcp):
  x, wg, wu, wd, ct = _inputs(hash((lead, f, gcp)) % 1000, lead, d, f, dtype, ties)
  k_eff = moc.effective_k(k, f, variant)
  mask = _selection_mask(x, wg, k_eff, variant)
  assert mask.sum(-1).min() == mask.sum(-1).max() == k_eff  # exactly K per token
  op = lambda *a: moc.moc_ffn(*a, k=k, variant=variant, gcp=gcp, pad_to=128)
  ref, args64 = _masked_reference(x, wg, wu, wd, mask)

  y = op(x, wg, wu, wd)
  assert y.shape == x.shape and y.dtype == x.dtype
  tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
  assert _rel_err(y, ref(*args64)) < tol

  grads = jax.grad(lambda *a: jnp.sum(op(*a).astype(jnp.float32) * ct), ALL_GRADS)(x, wg, wu, wd)
  ref_grads = jax.grad(lambda *a: jnp.sum(ref(*a) * ct), ALL_GRADS)(*args64)
  for name, g, r, like in zip(
    ["x", "w_gate", "w_up", "w_down"], grads, ref_grads, (x, wg, wu, wd), strict=True
  ):
    assert g.dtype == like.dtype and g.shape == like.shape, name
    assert _rel_err(g, r) < 3 * tol, name


def test_unselected_channels_get_exactly_zero_gradient():
  x, wg, wu, wd, ct = _inputs(3, (1,), 8, 64, jnp.float32)
  mask = _selection_mask(x, wg, 5, "moc")[0]
  g_gate, g_up = jax.grad(lambda wg, wu: jnp.sum(moc.moc_ffn(x, wg, wu, wd, k=5) * ct), (0, 1))(
    wg, wu
  )
  assert np.all(np.asarray(g_gate)[:, ~mask] == 0) and np.all(np.asarray(g_up)[:, ~mask] == 0)
  assert np.all(np.abs(np.asarray(g_up)[:, mask]).sum(0) > 0)


def test_selection_is_signed_not_magnitude():
  g = jnp.array([[-10.0, 1.0, -0.5, 2.0, 0.0]])
  idx, val = moc.select_channels(g, 2)
  assert idx.tolist() == [[1, 3]] and val.tolist() == [[1.0, 2.0]]


def test_ties_go_to_the_lower_channel_and_are_exactly_k():
  g = jnp.array([[1.0, 3.0, 3.0, 3.0, 0.0, 3.0]])
  idx, _ = moc.select_channels(g, 2)
  assert idx.tolist() == [[1, 2]]
  idx, _ = moc.select_channels(jnp.zeros((2, 9)), 4)
  assert idx.tolist() == [[0, 1, 2, 3]] * 2


def test_2of8_keeps_top_two_of_each_group_of_eight():
  g = jax.random.normal(jax.random.key(0), (5, 64))
  idx, _ = moc.select_channels(g, None, "moc_2of8")
  assert idx.shape == (5, 16)
  groups = np.asarray(g).reshape(5, 8, 8)
  expect = np.sort(np.argsort(-groups, axis=-1, kind="stable")[..., :2], -1)
  expect = (expect + 8 * np.arange(8)[:, None]).reshape(5, 16)
  assert np.array_equal(np.asarray(idx), expect)


def test_sort_free_selection_equals_lax_top_k():
  for seed, (f, k) in enumerate([(1376, 256), (5461, 1024), (40, 40), (344, 1)]):
    g = jax.random.normal(jax.random.key(seed), (9, f), jnp.bfloat16)
    g = g.at[0].set(g[0, 0])  # a row of all-equal values
    a_idx, a_val = reference.topk_select(g, k)
    b_idx, b_val = reference.select(g, k, "moc")
    assert np.array_equal(a_idx, b_idx) and np.array_equal(a_val, b_val)


def test_dense_variant_is_plain_swiglu_and_padding_changes_nothing():
  x, wg, wu, wd, _ = _inputs(5, (3, 4), 16, 1376, jnp.float32)
  expect = (jax.nn.silu(x @ wg) * (x @ wu)) @ wd
  for pad in (1, 128):
    y = moc.moc_ffn(x, wg, wu, wd, k=None, variant="dense", pad_to=pad)
    assert _rel_err(y, expect) < 1e-6
  y_pad = moc.moc_ffn(x, wg, wu, wd, k=100, pad_to=128)
  y_nopad = moc.moc_ffn(x, wg, wu, wd, k=100, pad_to=1)
  assert _rel_err(y_pad, y_nopad) < 1e-6


@pytest.mark.parametrize(
  ("variant", "backend", "gcp"),
  [("dense", "xla", False), ("moc", "pallas", False), ("moc", "pallas", True)],
)
def test_gate_up_as_one_gemm_gives_the_same_values_and_gradients(
  monkeypatch, variant, backend, gcp
):
  ffn = functools.partial(moc.moc_ffn, k=64, variant=variant, gcp=gcp, backend=backend)
  loss = lambda *w: jnp.sum(ffn(*w, pad_to=128) ** 2)
  with jax.enable_x64(False):  # as the kernels run in a model
    x, wg, wu, wd, _ = _inputs(6, (3, 4), 16, 344, jnp.float32)
    grads = lambda: jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(x, wg, wu, wd)
    monkeypatch.setattr(moc, "FUSE_GATE_UP", True)
    v_one, g_one = grads()
    monkeypatch.setattr(moc, "FUSE_GATE_UP", False)
    v_two, g_two = grads()
  assert _rel_err(v_one, v_two) < 1e-6
  for a, b in zip(g_one, g_two, strict=True):
    assert _rel_err(a, b) < 1e-5


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_gcp_gives_bitwise_identical_output_and_gradients(backend):
  with jax.enable_x64(False):
    x, wg, wu, wd, ct = _inputs(6, (4, 8), 32, 344, jnp.bfloat16)
    ffn = lambda gcp, *a: moc.moc_ffn(*a, k=64, gcp=gcp, backend=backend)
    loss = lambda gcp: lambda *a: jnp.sum(ffn(gcp, *a).astype(jnp.float32) * ct)
    a = jax.jit(jax.value_and_grad(loss(False), ALL_GRADS))(x, wg, wu, wd)
    b = jax.jit(jax.value_and_grad(loss(True), ALL_GRADS))(x, wg, wu, wd)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      assert np.array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.parametrize(
  ("backend", "fuse", "gcp"),
  [("xla", True, False), ("pallas", True, True), ("pallas", False, False)],
)
def test_kept_cast_weights_give_bitwise_identical_gradients(monkeypatch, backend, fuse, gcp):
  """keep_weights (the forward's cast weights held for the backward) against casting again."""
  monkeypatch.setattr(moc, "FUSE_GATE_UP", fuse)
  with jax.enable_x64(False):
    x, wg, wu, wd, ct = _inputs(9, (4, 8), 32, 344, jnp.bfloat16)
    ffn = lambda keep, *a: moc.moc_ffn(*a, k=64, gcp=gcp, backend=backend, keep_weights=keep)
    loss = lambda keep: lambda *a: jnp.sum(ffn(keep, *a).astype(jnp.float32) * ct)
    a = jax.jit(jax.value_and_grad(loss(True), ALL_GRADS))(x, wg, wu, wd)
    b = jax.jit(jax.value_and_grad(loss(False), ALL_GRADS))(x, wg, wu, wd)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.array_equal(np.asarray(u), np.asarray(v))


def test_cast_weights_are_kept_by_default_only_without_gcp_or_fsdp(monkeypatch):
  assert moc.default_keep_weights(gcp=False) and not moc.default_keep_weights(gcp=True)
  monkeypatch.setattr(moc, "mesh_axis_size", lambda name: 4 if name == "fsdp" else 1)
  assert not moc.default_keep_weights(gcp=False)


@pytest.mark.parametrize("gcp,expected_leaves", [(False, 4), (True, 3)])
def test_residuals_are_compact(gcp, expected_leaves):
  """Inspect what the custom_vjp forward keeps: nothing of size tokens × F."""
  t, d, f, k = 64, 32, 344, 48
  x, wg, wu, wd, _ = _inputs(7, (t,), d, f, jnp.bfloat16)
  _, (x_res, weights, compact) = moc._moc_fwd(x, wg, wu, wd, k, "moc", gcp, "xla", 128, False)
  assert x_res is x and all(a is b for a, b in zip(weights, (wg, wu, wd), strict=True))
  assert len(compact) == expected_leaves
  assert compact[0].dtype == jnp.uint16
  for leaf in compact:
    assert leaf.shape == (t, k)
  assert moc.residual_bytes_per_token(f, k, "moc", gcp) == k * (2 + 2 * (2 if gcp else 3))


@pytest.mark.parametrize("gcp", [False, True])
def test_pallas_residuals_keep_a_bitmask(gcp):
  t, d, f, k = 16, 32, 344, 48
  with jax.enable_x64(False):
    x, wg, wu, wd, _ = _inputs(8, (t,), d, f, jnp.bfloat16)
    _, (_, weights, compact) = moc._moc_fwd(x, wg, wu, wd, k, "moc", gcp, "pallas", 128, True)
  assert weights[:3] == (wg, wu, wd)  # the masters, then the forward's cast [Wg | Wu] and Wd
  assert [(w.shape, w.dtype) for w in weights[3:]] == [((d, 768), x.dtype), ((384, d), x.dtype)]
  assert compact[0].dtype == jnp.int32 and compact[0].shape == (t, 384 // 32)
  assert [leaf.shape for leaf in compact[1:]] == [(t, k)] * (2 if gcp else 3)
  per_token = sum(leaf.size * leaf.dtype.itemsize for leaf in compact) // t
  assert moc.residual_bytes_per_token(f, k, "moc", gcp, backend="pallas") == per_token


def test_residual_bytes_meet_the_1b_targets():
  d_ff, k = 5461, 1024
  for backend in ("xla", "pallas"):
    assert moc.residual_bytes_per_token(d_ff, k, "moc", False, backend=backend) <= 10.3e3
    assert moc.residual_bytes_per_token(d_ff, k, "moc", True, backend=backend) <= 6.2e3
  assert moc.residual_bytes_per_token(d_ff, None, "dense", gcp=False) == 4 * d_ff * 2


def _stack_temp_bytes(variant, gcp, layers=6, t=512, d=64, f=1024, k=128):
  """Compiled scratch memory of jax.grad through a stack of FFN layers."""

  def loss(x, ws):
    for wg, wu, wd in ws:
      x = x + moc.moc_ffn(x, wg, wu, wd, k=k, variant=variant, gcp=gcp)
    return jnp.sum(x.astype(jnp.float32))

  x = jax.ShapeDtypeStruct((t, d), jnp.bfloat16)
  ws = [
    (
      jax.ShapeDtypeStruct((d, f), jnp.float32),
      jax.ShapeDtypeStruct((d, f), jnp.float32),
      jax.ShapeDtypeStruct((f, d), jnp.float32),
    )
  ] * layers
  compiled = jax.jit(jax.grad(loss, argnums=1)).lower(x, ws).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_compiled_memory_per_layer_of_a_moc_stack_is_below_dense():
  """What each extra layer adds to the compiled scratch memory of jax.grad (XLA:CPU)."""
  with jax.enable_x64(False):
    per_layer = {
      name: (_stack_temp_bytes(v, gcp, layers=8) - _stack_temp_bytes(v, gcp, layers=2)) / 6
      for name, v, gcp in (("dense", "dense", False), ("moc", "moc", False), ("gcp", "moc", True))
    }
  one_txf_bf16 = 512 * 1024 * 2
  # Dense autodiff keeps several (T x F) arrays per layer; MoC keeps (T x K) ones.
  assert per_layer["dense"] >= 3 * one_txf_bf16
  assert per_layer["moc"] < 0.75 * per_layer["dense"]
  assert per_layer["gcp"] < 0.75 * per_layer["dense"]


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(k=0), "0 < k <= d_ff"),
    (dict(k=65), "0 < k <= d_ff"),
    (dict(k=4, variant="topk"), "unknown FFN variant"),
  ],
)
def test_bad_arguments_are_rejected_with_a_clear_message(kwargs, message):
  x, wg, wu, wd, _ = _inputs(8, (2,), 8, 64, jnp.float32)
  with pytest.raises(ValueError, match=message):
    moc.moc_ffn(x, wg, wu, wd, **kwargs)


def test_2of8_needs_f_divisible_by_8():
  x, wg, wu, wd, _ = _inputs(9, (2,), 8, 60, jnp.float32)
  with pytest.raises(ValueError, match="divisible by 8"):
    moc.moc_ffn(x, wg, wu, wd, k=None, variant="moc_2of8")


@pytest.mark.gpu
@pytest.mark.parametrize(
  ("d", "f", "k", "gcp"), [(512, 1376, 256, False), (2048, 5461, 1024, True)]
)
def test_gpu_pallas_op_matches_the_xla_op(d, f, k, gcp):
  """The whole op on the GPU (Pallas epilogues, F padded to 128): forward and four gradients
  near the xla backend's, and bitwise equal with the cast weights kept or not."""
  with jax.enable_x64(False):
    x, wg, wu, wd, ct = _inputs(10, (4096,), d, f, jnp.bfloat16)
    op = lambda backend, keep: (
      lambda *a: jnp.sum(
        moc.moc_ffn(*a, k=k, gcp=gcp, backend=backend, keep_weights=keep).astype(jnp.float32) * ct
      )
    )
    run = lambda backend, keep: jax.jit(jax.value_and_grad(op(backend, keep), ALL_GRADS))(
      x, wg, wu, wd
    )
    kept, recast, xla = run("pallas", True), run("pallas", False), run("xla", False)
  for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(recast), strict=True):
    assert np.array_equal(np.asarray(a), np.asarray(b))
  # Not bitwise: the xla backend's separate gate GEMM may round a G differently from the fused
  # [G | U] one, and a channel at the K-th value then changes sides for that token.
  errs = [_rel_err(a, b) for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(xla), strict=True)]
  assert errs[0] < 1e-2 and max(errs[1:]) < 5e-2, errs
