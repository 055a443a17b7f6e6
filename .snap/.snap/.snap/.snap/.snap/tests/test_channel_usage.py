"""Channel usage counts the training selection exactly: against an independent lax.top_k
reference on one batch, padding tokens and F padding excluded, and end to end on a workdir."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.default import get_config
from moc_jax import channel_usage, checkpoint, trainer
from moc_jax.model import Transformer
from moc_jax.model_config import from_preset
from pallas_kernels import reference


def _batch(vocab: int, b: int = 3, seq: int = 16) -> dict:
  tokens = jax.random.randint(jax.random.key(3), (b, seq), 0, vocab)
  weights = np.ones((b, seq), np.float32)
  weights[0, 10:] = 0  # padding tail
  weights[2] = 0  # an all-padding row
  return {"inputs": tokens, "weights": jnp.asarray(weights)}


def _reference_counts(model: Transformer, batch: dict) -> np.ndarray:
  """Walk the blocks by hand and select with lax.top_k (not the bisection mask under test)."""
  c = model.cfg
  x = model._embed(batch["inputs"])
  positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
  real_T = np.asarray(batch["weights"]).reshape(-1) > 0
  out = []
  for block in model.blocks:
    x = x + block.attn(block.attn_norm(x), positions)
    h_TxD = block.ffn_norm(x).reshape(-1, c.d_model)
    g_TxF = h_TxD @ block.ffn.w_gate[...].astype(h_TxD.dtype)
    if c.ffn == "moc":
      idx_TxK, _ = reference.topk_select(g_TxF, c.k)
    else:
      idx_TxK, _ = reference.group_select(g_TxF)
    out.append(np.bincount(np.asarray(idx_TxK)[real_T].ravel(), minlength=c.d_ff))
    x = x + block.ffn(block.ffn_norm(x))
  return np.stack(out)


@pytest.mark.parametrize(("ffn", "pad_to"), [("moc", None), ("moc_2of8", 128), ("moc", 128)])
def test_counts_match_a_direct_top_k_reference(ffn, pad_to):
  cfg = from_preset("tiny", vocab_size=320, dtype="float32", ffn=ffn, pad_to=pad_to)
  model = Transformer(cfg, nnx.Rngs(0))
  batch = _batch(cfg.vocab_size)
  model.set_attributes(capture_input=True)
  graphdef, params = nnx.split(model)
  step = channel_usage.make_usage_step(graphdef, cfg, document_mask=False)
  counts_NxF, tokens = step(params, batch)
  counts_NxF = np.asarray(counts_NxF)
  k = cfg.k if ffn == "moc" else cfg.d_ff // 4
  assert int(tokens) == 26 and counts_NxF.shape == (cfg.num_layers, cfg.d_ff)  # F padding cut
  np.testing.assert_array_equal(counts_NxF.sum(axis=1), 26 * k)
  model.set_attributes(capture_input=False)
  np.testing.assert_array_equal(counts_NxF, _reference_counts(model, batch))
  s = channel_usage.usage_stats(counts_NxF[0], int(tokens), k)
  assert all(0.0 <= v <= 1.0 for v in s["share"]) and len(s["share"]) == cfg.d_ff
  assert abs(sum(s["share"]) - k) < 1e-2 and 0 < s["entropy_norm"] <= 1 and 0 <= s["gini"] < 1


def test_capture_is_off_by_default_and_leaves_the_model_unchanged():
  model = Transformer(from_preset("tiny", vocab_size=320, dtype="float32"), nnx.Rngs(0))
  model(jnp.zeros((1, 8), jnp.int32))
  assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))


def test_usage_stats_extremes():
  uniform = channel_usage.usage_stats(np.full(8, 5), tokens=10, k=4)
  assert uniform["entropy_norm"] == 1.0 and uniform["gini"] == 0.0
  assert uniform["share_median"] == 0.5 and uniform["never_selected"] == 0
  skewed = channel_usage.usage_stats(np.array([10, 10, 0, 0]), tokens=10, k=2)
  assert skewed["never_selected"] == 2 and skewed["share_max"] == 1.0
  assert skewed["entropy_norm"] == 0.5 and skewed["gini"] == 0.5


def test_workdir_end_to_end_and_dense_note(tmp_path, capsys):
  c = get_config()
  c.eval.batch_size = 4
  c.train.update(steps=2, batch_size=4, seq_len=32, log_every=1)
  c.eval.update(every=2, batches=1)
  c.checkpoint.update(every=2, async_save=False)
  trainer.train(c, str(tmp_path / "moc"))
  out = tmp_path / "usage.json"
  with pytest.raises(SystemExit) as exit_info:
    channel_usage.app.run(
      channel_usage.main,
      ["x", f"--workdir={tmp_path / 'moc'}", "--batches=2", f"--out={out}"],
    )
  assert exit_info.value.code == 0
  result = json.loads(out.read_text())
  assert result["step"] == 2 and result["batches"] == 2 and len(result["layers"]) == 4
  for layer in result["layers"]:
    assert layer["k"] == 64 and len(layer["share"]) == 344
    assert abs(sum(layer["share"]) * layer["tokens"] - 64 * layer["tokens"]) < layer["tokens"]
  assert "layer 3:" in capsys.readouterr().out

  c.model.ffn = "dense"
  checkpoint.write_config(str(tmp_path), c.to_dict())
  dense = channel_usage.channel_usage_workdir(str(tmp_path), c)
  assert dense["layers"] == [] and "no MoC layers" in dense["note"]
