"""Streaming text files (config.data.text_streaming): split, coverage, resume and errors."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from test_data_helpers import check_rows, doc_text, text_config

from moc_jax import data

SEQ = 64
N_FILES, PER_FILE = 5, 30


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """C4-like json.gz shards of identifiable documents 'd<i>:...' (one shorter than SEQ)."""
  d = tmp_path_factory.mktemp("shards")
  i = 0
  for f in range(N_FILES):
    with gzip.open(d / f"c4-train.{f:05d}-of-{N_FILES:05d}.json.gz", "wt", encoding="utf-8") as fh:
      for _ in range(PER_FILE):
        fh.write(json.dumps({"text": doc_text(i, i % 40 + 1), "url": "x"}) + "\n")
        i += 1
  return str(d / "c4-train.*.json.gz")


def _ids(batches, tok) -> list[int]:
  """Document ids of the BOS-led pieces (pad mode: one per row)."""
  out = []
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      if b["weights"][r].any():
        out.append(int(tok.decode(b["inputs"][r].tolist()).split(":")[0][1:]))
  return out


def test_streamed_split_matches_in_memory_split(shards):
  tok = data.make_tokenizer("bytes")
  got = {}
  for mode in ("on", "off"):
    c = text_config(shards, text_streaming=mode, packing="pad", val_fraction=0.2)
    ev = data.make_eval_batches(c, tokenizer=tok, seq_len=SEQ, batch_size=4, max_batches=None)
    got[mode] = sorted(_ids(ev, tok))
  assert got["on"] == got["off"] and 10 < len(got["on"]) < 60


def test_streamed_training_covers_the_train_split_and_resumes(shards):
  tok = data.make_tokenizer("bytes")
  c = text_config(shards, text_streaming="on", packing="pad", val_fraction=0.2, shuffle_window=8)
  val = set(
    _ids(data.make_eval_batches(c, tokenizer=tok, seq_len=SEQ, batch_size=4, max_batches=None), tok)
  )
  make = lambda: data.make_train_iterator(c, tokenizer=tok, seq_len=SEQ, batch_size=4, seed=1)
  it = make()
  n_train = N_FILES * PER_FILE - len(val)
  first = [next(it) for _ in range(n_train // 4)]  # about one epoch
  for b in first:
    check_rows(b, 4, SEQ, tok.eos_id)
  seen = _ids(first, tok)
  assert not set(seen) & val
  assert len(set(seen)) > 0.8 * n_train  # an epoch, give or take the row-window shuffle
  state = json.loads(json.dumps(it.get_state()))  # mid-file for the interleaved readers
  tail = [next(it) for _ in range(25)]
  resumed = make()
  resumed.set_state(state)
  for x in tail:
    y = next(resumed)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_streaming_errors(tmp_path):
  tok = data.make_tokenizer("bytes")

  def make(path, **kw):
    c = text_config(path, **{"text_streaming": "on", "val_fraction": 0.0, **kw})
    return data.make_train_iterator(c, tokenizer=tok, seq_len=16, batch_size=2, seed=0)

  (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
  with pytest.raises(data.DataError, match=r"a.jsonl:1: record has no 'text' field \(has: body\)"):
    make(tmp_path / "a.jsonl")
  with gzip.open(tmp_path / "e.json.gz", "wt") as f:
    f.write("")
  with pytest.raises(data.DataError, match="holds no records"):
    make(tmp_path / "e.json.gz")
  # A bad record deep inside a later shard surfaces as the same DataError while training.
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "1.jsonl").write_text('{"text": "fine"}\n' * 50)
  (tmp_path / "b" / "2.jsonl").write_text('{"text": "fine"}\n' * 5 + '{"txt": "bad"}\n')
  it = make(tmp_path / "b" / "*.jsonl", shuffle_window=0)
  with pytest.raises(data.DataError, match=r"2.jsonl:6: record has no 'text' field"):
    for _ in range(200):
      next(it)
  with pytest.raises(data.DataError, match="text_streaming='maybe' is unknown"):
    make(tmp_path / "a.jsonl", text_streaming="maybe")


@pytest.mark.slow  # ~15 s: spawned worker processes each import grain (and so jax)
def test_streamed_resume_with_two_workers(shards):
  tok = data.make_tokenizer("bytes")
  c = text_config(shards, text_streaming="on", val_fraction=0.2, shuffle_window=8, num_workers=2)
  make = lambda: data.make_train_iterator(c, tokenizer=tok, seq_len=SEQ, batch_size=4, seed=2)
  it = make()
  head = [next(it) for _ in range(9)]
  state = json.loads(json.dumps(it.get_state()))
  tail = [next(it) for _ in range(9)]
  it.close()
  resumed = make()
  resumed.set_state(state)
  for x in tail:
    y = next(resumed)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  resumed.close()
  for b in head + tail:
    check_rows(b, 4, SEQ, tok.eos_id)
