"""TFDS read through tf.data (config.data.tfds_streaming) from a tiny TFRecord-only dataset
built locally (no network): coverage, sharding, exact resume, training. Needs TensorFlow."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_data_helpers import check_rows, tiny_tfds_builder

from moc_jax import data
from moc_jax.data import tfds_source, tfds_stream

pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

N_TRAIN, N_VAL, SEQ = 48, 6, 48


# Documents 'doc <i>: ...', shorter than SEQ.
MocTinyRecords = tiny_tfds_builder(
  "MocTinyRecords", N_TRAIN, N_VAL, text=lambda i: f"doc {i}: " + "lorem " * (i % 5 + 1)
)


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfrecord")
  config = tfds.download.DownloadConfig(num_shards=4)  # several files, so file shuffle matters
  MocTinyRecords(data_dir=str(d), file_format="tfrecord").download_and_prepare(
    download_config=config
  )
  return str(d)


def _config(records_dir, **kw):
  c = data.default_config()
  c.source, c.tfds_name, c.tfds_data_dir = "tfds", "moc_tiny_records", records_dir
  c.packing = "pad"  # one document per row, so every row names its document
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def _ids(batches, tok) -> list[int]:
  out = []
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      if b["weights"][r].any():
        out.append(int(tok.decode(b["inputs"][r].tolist()).split(":")[0].split()[-1]))
  return out


def _make(c, seed=0, **kw):
  tok = data.make_tokenizer(c)
  return data.make_train_iterator(c, tokenizer=tok, seq_len=SEQ, batch_size=4, seed=seed, **kw)


def test_auto_streams_a_tfrecord_build_and_resumes_exactly_mid_stream(records_dir):
  c = _config(records_dir, shuffle_window=8)
  tok = data.make_tokenizer(c)
  it = _make(c)
  assert it.get_state()["fingerprint"]["tfds_reader"] == "tf.data"
  head = [next(it) for _ in range(7)]  # mid-epoch (12 batches per epoch) and mid-window
  state = json.loads(json.dumps(it.get_state()))
  tail = [next(it) for _ in range(11)]  # across the epoch boundary
  for b in head + tail:
    check_rows(b, 4, SEQ, tok.eos_id)
  ids = _ids(head + tail, tok)
  assert set(ids) == set(range(N_TRAIN)) and max(np.bincount(ids)) <= 2
  resumed = _make(c)
  resumed.set_state(state)
  for x in tail:
    y = next(resumed)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  # Deterministic from the seed; another seed gives another order.
  again, other = _make(c), _make(c, seed=5)
  assert _ids([next(again) for _ in range(3)], tok) == ids[:12]
  assert _ids([next(other) for _ in range(3)], tok) != ids[:12]


def test_each_epoch_reads_every_document_once_and_resumes_at_any_position(records_dir):
  stream = tfds_stream.stream_documents(
    _config(records_dir), "train", seed=3, shard=(0, 1), repeat=True
  )
  it = iter(stream)
  epochs = [[next(it) for _ in range(N_TRAIN)] for _ in range(3)]
  for docs in epochs:
    assert sorted(int(t.split(":")[0].split()[-1]) for t in docs) == list(range(N_TRAIN))
  assert len({tuple(docs) for docs in epochs}) == 3  # a new file order each epoch
  for read in (0, 5, 12, 13, 47, 48):  # 4 files of 12: starts, middles and ends of files
    resumed = iter(stream)
    resumed.set_state({"epoch": 1, "read": read})
    n = N_TRAIN - read + 3  # into the next epoch
    assert [next(resumed) for _ in range(n)] == (epochs[1] + epochs[2])[read : read + n]


def test_eval_reads_all_of_validation_once(records_dir):
  c = _config(records_dir)
  tok = data.make_tokenizer(c)
  ev = data.make_eval_batches(c, tokenizer=tok, seq_len=SEQ, batch_size=4, max_batches=None)
  assert sorted(_ids(ev, tok)) == list(range(1000, 1000 + N_VAL))


def test_processes_read_disjoint_shares_of_the_split(records_dir):
  c = _config(records_dir, shuffle_window=0)
  tok = data.make_tokenizer(c)
  shares = []
  for p in range(2):
    it = _make(c, process_index=p, process_count=2)
    shares.append(set(_ids([next(it) for _ in range(N_TRAIN // 2 // 4)], tok)))  # one epoch
  assert not shares[0] & shares[1]
  assert shares[0] | shares[1] == set(range(N_TRAIN))


def test_tf_data_choices_and_errors(records_dir, monkeypatch):
  def expect(match, **kw):
    with pytest.raises(data.DataError, match=match):
      _make(_config(records_dir, **kw))

  expect(r"stored as tfrecord.*tfds_streaming='auto'", tfds_streaming="off")
  expect(r"set num_workers=0", num_workers=2)
  expect(r"no split 'test' \(splits: train, validation\)", tfds_train_split="test")
  expect(r"no 'body' feature \(has: text\)", text_field="body")
  expect(r"tfds_streaming='maybe' is unknown", tfds_streaming="maybe")
  assert _make(_config(records_dir, tfds_streaming="on")).get_state()["fingerprint"]["tfds_reader"]
  monkeypatch.setattr(tfds_source, "has_tensorflow", lambda: False)
  expect(r"stored as tfrecord.*`pip install tensorflow-cpu` to stream it with tf.data")
  expect(
    r"tfds_streaming='on' reads TFDS with tf.data, which needs TensorFlow", tfds_streaming="on"
  )


def test_the_trainer_trains_through_tf_data_and_its_checkpoint_resumes_the_stream(
  tmp_path, records_dir, monkeypatch
):
  import orbax.checkpoint as ocp

  from configs.default import get_config
  from moc_jax import checkpoint, trainer

  seen, real = [], trainer.data.make_train_iterator

  def recording(*a, **kw):  # the batches the trainer trains on, in order
    it = real(*a, **kw)
    real_next = it.__next__

    class Recording(type(it)):
      def __next__(self):
        seen.append(real_next())
        return seen[-1]

    it.__class__ = Recording
    return it

  monkeypatch.setattr(trainer.data, "make_train_iterator", recording)
  cfg = get_config()
  cfg.data = _config(records_dir, packing="concat", shuffle_window=4)
  cfg.train.update({"steps": 4, "batch_size": 4, "seq_len": 32, "log_every": 1})
  cfg.eval.update({"every": 4, "batches": 1, "batch_size": 4})
  cfg.checkpoint.update(every=2, async_save=False)
  result = trainer.train(cfg, str(tmp_path))
  assert result["step"] == 4 and result["tokens"] > 0 and len(seen) == 4
  monkeypatch.undo()
  manager = checkpoint.make_manager(str(tmp_path), every=1, keep=3)
  saved = manager.restore(2, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
  it = data.make_train_iterator(
    cfg.data, tokenizer=data.make_tokenizer(cfg.data), seq_len=32, batch_size=4, seed=cfg.seed
  )
  it.set_state(saved)  # what a resumed run does: it must see the batches of steps 3 and 4
  for x in seen[2:]:
    y = next(it)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
