"""The TFDS source on a tiny ArrayRecord dataset built locally (no network, no TensorFlow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_data_helpers import check_rows, tiny_tfds_builder

from moc_jax import data
from moc_jax.data import tfds_source

tfds = pytest.importorskip("tensorflow_datasets")

N_TRAIN, N_VAL = 40, 6


# Documents 'doc <i>: ...' of varied length, with a non-text feature.
MocTinyText = tiny_tfds_builder(
  "MocTinyText",
  N_TRAIN,
  N_VAL,
  text=lambda i: f"doc {i}: " + "lorem ipsum " * (i % 13 + 1) + "é",
  url=lambda i: f"u{i}",
)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  MocTinyText(data_dir=str(d), file_format="array_record").download_and_prepare()
  return str(d)


def _config(tfds_dir, **kw):
  c = data.default_config()
  c.source, c.tfds_name, c.tfds_data_dir = "tfds", "moc_tiny_text", tfds_dir
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def test_train_and_eval_from_tfds(tfds_dir):
  c = _config(tfds_dir, shuffle_window=8)
  tok = data.make_tokenizer(c)
  make = lambda: data.make_train_iterator(c, tokenizer=tok, seq_len=48, batch_size=4, seed=0)
  it = make()
  batches = [next(it) for _ in range(12)]  # > 1 epoch of 40 short documents
  for b in batches:
    check_rows(b, 4, 48, tok.eos_id)
  text = "".join(tok.decode(b["inputs"].ravel().tolist()) for b in batches)
  seen = {int(w.split(":")[0]) for w in text.split("doc ")[1:] if w.split(":")[0].isdigit()}
  assert seen <= set(range(N_TRAIN)) and len(seen) > 20
  state = json.loads(json.dumps(it.get_state()))
  more = [next(it) for _ in range(3)]
  resumed = make()
  resumed.set_state(state)
  for x in more:
    y = next(resumed)
    assert all((x[k] == y[k]).all() for k in x)
  ev = data.make_eval_batches(c, tokenizer=tok, seq_len=48, batch_size=4, max_batches=None)
  ev_text = "".join(tok.decode(b["inputs"].ravel().tolist()) for b in ev)
  ev_ids = {int(w.split(":")[0]) for w in ev_text.split("doc ")[1:]}
  assert sorted(ev_ids) == list(range(1000, 1000 + N_VAL))  # all of validation, nothing else
  # TFDS split slicing also works for carving a validation split out of train.
  c2 = _config(tfds_dir, tfds_val_split="train[:10%]")
  assert (
    len(data.make_eval_batches(c2, tokenizer=tok, seq_len=48, batch_size=4, max_batches=None)) >= 1
  )


def test_tfds_read_in_a_fresh_process_without_the_builder_code(tfds_dir):
  code = (
    "from moc_jax import data; c = data.default_config(); c.source = 'tfds'; "
    f"c.tfds_name = 'moc_tiny_text'; c.tfds_data_dir = {tfds_dir!r}; c.packing = 'pad'; "
    "ev = data.make_eval_batches(c, tokenizer=data.make_tokenizer(c), seq_len=64, "
    "batch_size=2, max_batches=None); print(sum(int(b['weights'].any(1).sum()) for b in ev))"
  )
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip().splitlines()[-1] == str(N_VAL)


def test_tfds_bad_inputs(tfds_dir, tmp_path):
  tok = data.make_tokenizer("bytes")

  def expect(c, match, split="train"):
    with pytest.raises(data.DataError, match=match):
      if split == "train":
        data.make_train_iterator(c, tokenizer=tok, seq_len=8, batch_size=2, seed=0)
      else:
        data.make_eval_batches(c, tokenizer=tok, seq_len=8, batch_size=2, max_batches=1)

  expect(_config(tfds_dir, tfds_name="no_such_dataset_xyz"), "'no_such_dataset_xyz' not found")
  expect(
    _config(tfds_dir, tfds_train_split="test"), r"no split 'test' \(splits: train, validation\)"
  )
  expect(_config(tfds_dir, tfds_val_split="valid"), "no split 'valid'", "val")
  expect(_config(tfds_dir, text_field="body"), r"no 'body' feature \(has: text, url\)")
  expect(_config(tfds_dir, tfds_val_split=""), "tfds_val_split is empty", "val")
  expect(_config(str(tmp_path), tfds_name="moc_tiny_text"), "is not prepared in")


def test_tfds_streaming_choices_on_an_array_record_build(tfds_dir, monkeypatch):
  tok = data.make_tokenizer("bytes")

  def make(**kw):
    c = _config(tfds_dir, **kw)
    return data.make_train_iterator(c, tokenizer=tok, seq_len=8, batch_size=2, seed=0)

  assert "tfds_reader" not in make().get_state()["fingerprint"]  # auto: tfds.data_source
  make(tfds_streaming="off").close()
  monkeypatch.setattr(tfds_source, "has_tensorflow", lambda: True)
  with pytest.raises(data.DataError, match=r"array_record, which TFDS does not read with tf\.data"):
    make(tfds_streaming="on")
  monkeypatch.setattr(tfds_source, "has_tensorflow", lambda: False)
  with pytest.raises(data.DataError, match=r"needs TensorFlow: `pip install tensorflow-cpu`"):
    make(tfds_streaming="on")


def test_the_trainer_trains_a_few_steps_on_a_tfds_dataset(tfds_dir, tmp_path):
  from configs.default import get_config
  from moc_jax import metrics, trainer

  cfg = get_config()
  cfg.data = _config(tfds_dir)
  cfg.train.update({"steps": 4, "batch_size": 4, "seq_len": 32, "log_every": 1})
  cfg.eval.update({"every": 4, "batches": 2, "batch_size": 4})
  cfg.checkpoint.async_save = False
  result = trainer.train(cfg, str(tmp_path))
  assert result["step"] == 4 and result["tokens"] > 0
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path)) if r["kind"] == "train"] == [
    1,
    2,
    3,
    4,
  ]
