"""Packing modes, the row contract, eval batches, shuffling and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_data_helpers import check_rows, doc_text, text_config, write_jsonl

from moc_jax import data

SEQ = 32
LENGTHS = [5, 80, 17, 3, 40, 29, 64, 1, 31, 12, 100, 7]  # around and across SEQ


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A jsonl corpus of identifiable documents; returns (glob, {doc text: token list})."""
  d = tmp_path_factory.mktemp("corpus")
  texts = [doc_text(i, n) for i, n in enumerate(LENGTHS)]
  write_jsonl(d / "docs.jsonl", texts)
  tok = data.make_tokenizer("bytes")
  wrapped = {t: [tok.bos_id, *tok.encode(t), tok.eos_id] for t in texts}
  return str(d / "docs.jsonl"), wrapped


def _eval(path, packing, batch_size=4, max_batches=None, **kw):
  c = text_config(path, packing=packing, val_path=path, **kw)
  tok = data.make_tokenizer(c)
  return data.make_eval_batches(
    c, tokenizer=tok, seq_len=SEQ, batch_size=batch_size, max_batches=max_batches
  )


def _pieces(batches):
  """(inputs, targets) of every segment, in row-major order."""
  out = []
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      seg = b["segment_ids"][r]
      for s in range(1, int(seg.max(initial=0)) + 1):
        m = seg == s
        out.append((b["inputs"][r][m].tolist(), b["targets"][r][m].tolist()))
  return out


@pytest.mark.parametrize("packing", ["concat", "first_fit", "pad"])
def test_rows_follow_the_contract(corpus, packing):
  path, _ = corpus
  batches = _eval(path, packing)
  tok = data.make_tokenizer("bytes")
  for b in batches:
    check_rows(b, 4, SEQ, tok.eos_id)


def test_concat_rows_reassemble_into_exactly_the_documents(corpus):
  path, wrapped = corpus
  pieces = _pieces(_eval(path, "concat"))
  docs, cur_in, cur_tg = [], [], []
  for inp, tgt in pieces:
    cur_in += inp
    cur_tg += tgt
    if tgt[-1] == 257:  # EOS closes a document
      docs.append((cur_in, cur_tg))
      cur_in, cur_tg = [], []
  assert not cur_in
  expected = sorted((w[:-1], w[1:]) for w in wrapped.values())
  assert sorted(docs) == expected
  # Concatenation leaves no padding except at the very end of the split.
  batches = _eval(path, "concat")
  total = sum(len(w) - 1 for w in wrapped.values())
  assert sum(b["weights"].sum() for b in batches) == total
  assert batches[0]["weights"].all()


def test_first_fit_pieces_are_documents_cut_at_seq_len(corpus):
  path, wrapped = corpus
  expected = []
  for w in wrapped.values():
    inp, tgt = w[:-1], w[1:]
    expected += [(inp[s : s + SEQ], tgt[s : s + SEQ]) for s in range(0, len(inp), SEQ)]
  assert sorted(_pieces(_eval(path, "first_fit"))) == sorted(expected)


def test_pad_mode_one_truncated_document_per_row_padding_excluded(corpus):
  path, wrapped = corpus
  batches = _eval(path, "pad")
  expected = sorted((w[:-1][:SEQ], w[1:][:SEQ]) for w in wrapped.values())
  assert sorted(_pieces(batches)) == expected
  rows = sum(b["inputs"].shape[0] for b in batches)
  assert rows == 4 * ((len(LENGTHS) + 3) // 4)
  for b in batches:
    pad = b["segment_ids"] == 0
    assert (b["weights"][pad] == 0).all() and (b["inputs"][pad] == 258).all()
    assert (b["targets"][pad] == 258).all()
    assert set(np.unique(b["segment_ids"])) <= {0, 1}


def test_eval_batches_deterministic_capped_and_last_padded(corpus):
  path, _ = corpus
  a = _eval(path, "concat", batch_size=3)
  b = _eval(path, "concat", batch_size=3, shuffle_seed=123)  # the train seed does not matter
  assert len(a) == len(b) >= 2
  for x, y in zip(a, b, strict=True):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert a[-1]["inputs"].shape == (3, SEQ) and a[-1]["weights"][-1].sum() < SEQ
  assert len(_eval(path, "concat", batch_size=3, max_batches=2)) == 2


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys, strict=True):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("packing", ["concat", "first_fit", "pad"])
def test_resume_reproduces_the_uninterrupted_stream(corpus, packing):
  path, _ = corpus
  c = text_config(path, packing=packing, val_fraction=0.0, shuffle_window=16, packing_bins=4)
  tok = data.make_tokenizer(c)
  make = lambda: data.make_train_iterator(c, tokenizer=tok, seq_len=SEQ, batch_size=4, seed=7)
  straight = _take(make(), 30)  # several epochs of the 12 documents
  first = make()
  half = _take(first, 13)
  state = json.loads(json.dumps(first.get_state()))  # survives a JSON checkpoint
  first.close()
  resumed = make()
  resumed.set_state(state)
  _assert_same(half + _take(resumed, 17), straight)
  for b in straight:
    check_rows(b, 4, SEQ, tok.eos_id)


def test_train_stream_depends_on_seed_and_reshuffles_each_epoch(corpus):
  path, _ = corpus
  c = text_config(path, packing="pad", val_fraction=0.0, shuffle_window=0)
  tok = data.make_tokenizer(c)
  make = lambda seed: data.make_train_iterator(
    c, tokenizer=tok, seq_len=SEQ, batch_size=1, seed=seed
  )
  order = lambda it, n: [tok.decode(next(it)["inputs"][0].tolist()).split(":")[0] for _ in range(n)]
  n = len(LENGTHS)
  rows = order(make(0), 3 * n)
  epochs = [rows[i * n : (i + 1) * n] for i in range(3)]
  for e in epochs:
    assert sorted(e) == sorted(f"d{i}" for i in range(n))  # every document once per epoch
  assert epochs[0] != epochs[1] != epochs[2]
  assert rows == order(make(0), 3 * n)
  assert rows != order(make(1), 3 * n)


def test_processes_get_disjoint_shards(corpus):
  path, _ = corpus
  c = text_config(path, packing="pad", val_fraction=0.0, shuffle_window=0)
  tok = data.make_tokenizer(c)
  seen = []
  for p in range(3):
    it = data.make_train_iterator(
      c, tokenizer=tok, seq_len=SEQ, batch_size=1, seed=0, process_index=p, process_count=3
    )
    seen.append({tok.decode(next(it)["inputs"][0].tolist()).split(":")[0] for _ in range(4)})
  assert all(len(s) == 4 for s in seen)
  assert seen[0] | seen[1] | seen[2] == {f"d{i}" for i in range(len(LENGTHS))}


def test_set_state_refuses_a_different_stream(corpus):
  path, _ = corpus
  c = text_config(path, val_fraction=0.0)
  tok = data.make_tokenizer(c)
  it = data.make_train_iterator(c, tokenizer=tok, seq_len=SEQ, batch_size=2, seed=0)
  next(it)
  state = it.get_state()
  other = data.make_train_iterator(c, tokenizer=tok, seq_len=SEQ, batch_size=4, seed=0)
  with pytest.raises(data.DataError, match="batch_size: 2 -> 4"):
    other.set_state(state)
  with pytest.raises(data.DataError, match="not one written by"):
    other.set_state({"bogus": 1})


def test_embedded_default_batches(tmp_path):
  c = data.default_config()
  tok = data.make_tokenizer(c)
  it = data.make_train_iterator(c, tokenizer=tok, seq_len=128, batch_size=8, seed=0)
  for _ in range(5):
    b = next(it)
    check_rows(b, 8, 128, tok.eos_id)
    assert b["weights"].all()  # concat packing of an infinite stream has no padding
  ev = data.make_eval_batches(c, tokenizer=tok, seq_len=128, batch_size=8, max_batches=3)
  assert len(ev) == 3 and all(e["inputs"].shape == (8, 128) for e in ev)


@pytest.mark.slow  # ~15 s: four spawned worker processes each import grain (and so jax)
def test_resume_with_two_worker_processes(corpus):
  path, _ = corpus
  c = text_config(path, val_fraction=0.0, shuffle_window=8, num_workers=2, prefetch=2)
  tok = data.make_tokenizer(c)
  make = lambda: data.make_train_iterator(c, tokenizer=tok, seq_len=SEQ, batch_size=4, seed=3)
  first = make()
  head = _take(first, 7)
  state = json.loads(json.dumps(first.get_state()))
  tail = _take(first, 9)
  first.close()
  resumed = make()
  resumed.set_state(state)
  _assert_same(_take(resumed, 9), tail)
  resumed.close()
  for b in head + tail:
    check_rows(b, 4, SEQ, tok.eos_id)
  assert len({b["inputs"].tobytes() for b in head + tail}) == 16  # workers' rows interleave
