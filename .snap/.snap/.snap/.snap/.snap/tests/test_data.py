"""Data sources, the byte tokenizer, the train/validation split and bad-input errors."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from test_data_helpers import text_config, write_jsonl

from moc_jax import data
from moc_jax.data import sources


def test_default_config_has_the_documented_keys():
  c = data.default_config()
  for key in (
    "source", "path", "val_path", "val_fraction", "tokenizer", "packing", "num_workers",
    "shuffle_seed", "tfds_name", "tfds_data_dir", "tfds_train_split", "tfds_val_split",
    "text_field",
  ):  # fmt: skip
    assert key in c, key
  assert c.source == "embedded" and c.tokenizer == "bytes" and c.packing == "concat"
  assert 0.02 <= c.val_fraction <= 0.05 and c.num_workers == 0


def test_byte_tokenizer_round_trip_and_specials():
  tok = data.make_tokenizer(data.default_config())
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
  text = "héllo wörld ✓ 𝛑\n"
  ids = tok.encode(text)
  assert ids == list(text.encode("utf-8")) and max(ids) < 256
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
  np.testing.assert_array_equal(tok.encode_np(text), np.asarray(ids, np.int32))
  assert tok.decode([0x68, 0xFF, 0x69]) == "h\ufffdi"  # broken bytes are replaced


def test_embedded_split_is_deterministic_disjoint_and_complete():
  c = data.default_config()
  train = sources.load_documents(c, "train")
  val = sources.load_documents(c, "val")
  train_names = {n for n, _ in train}
  val_names = {n for n, _ in val}
  assert not train_names & val_names
  everything = sources.embedded_corpus()
  assert train_names | val_names == {n for n, _ in everything}
  assert all(n.endswith(".py") for n in train_names)
  assert not any(
    part in ("site-packages", "test", "tests") for n in train_names for part in n.split("/")
  )
  assert 0.005 < len(val) / len(everything) < 0.06  # val_fraction=0.02, hashed
  assert [n for n, _ in val] == sorted(val_names)
  # Same answer computed from scratch (not only from the per-process cache).
  assert [n for n, _ in val] == [n for n, _ in everything if sources.is_validation(n, 0.02)]
  assert "os.py" in train_names | val_names


def test_text_globs_txt_jsonl_json_gz_and_val_path(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "one.txt").write_text("first document\nwith two lines\n")
  (tmp_path / "a" / "two.txt").write_text("second document")
  write_jsonl(tmp_path / "b.jsonl", ["j1", "j2", "j3"])
  with gzip.open(tmp_path / "c.json.gz", "wt", encoding="utf-8") as f:
    for t in ("g1", "g2"):
      f.write(json.dumps({"text": t}) + "\n")
  pattern = f"{tmp_path}/a/*.txt, {tmp_path}/*.jsonl,{tmp_path}/*.json.gz"
  c = text_config(pattern, val_fraction=0.0)
  texts = sorted(t for _, t in sources.load_documents(c, "train"))
  assert texts == sorted(
    ["first document\nwith two lines\n", "second document", "j1", "j2", "j3", "g1", "g2"]
  )
  # A directory means every file below it.
  c = text_config(str(tmp_path / "a"), val_fraction=0.0)
  assert len(sources.load_documents(c, "train")) == 2
  # A second glob for validation: all of `path` is training data.
  c = text_config(f"{tmp_path}/a/*.txt", val_path=f"{tmp_path}/*.jsonl", val_fraction=0.5)
  assert [t for _, t in sources.load_documents(c, "val")] == ["j1", "j2", "j3"]
  assert len(sources.load_documents(c, "train")) == 2


def test_text_split_by_document_hash(tmp_path):
  write_jsonl(tmp_path / "docs.jsonl", [f"doc {i}" for i in range(200)])
  c = text_config(tmp_path / "docs.jsonl", val_fraction=0.25)
  train = sources.load_documents(c, "train")
  val = sources.load_documents(c, "val")
  assert len(train) + len(val) == 200 and 20 < len(val) < 80
  assert not {t for _, t in train} & {t for _, t in val}
  assert val == sources.load_documents(c, "val")


def test_non_utf8_bytes_are_replaced(tmp_path):
  (tmp_path / "bad.txt").write_bytes(b"caf\xe9 \xff\xfe ok")
  (tmp_path / "bad.jsonl").write_bytes(b'{"text": "x\\ud800y"}\n')  # lone surrogate escape
  c = text_config(f"{tmp_path}/bad.*", val_fraction=0.0)
  texts = sorted(t for _, t in sources.load_documents(c, "train"))
  assert texts == ["caf\ufffd \ufffd\ufffd ok", "x?y"]
  tok = data.make_tokenizer(c)
  batch = next(data.make_train_iterator(c, tokenizer=tok, seq_len=16, batch_size=2, seed=0))
  assert batch["inputs"].shape == (2, 16)


def _expect_error(c, match: str, split: str = "train") -> None:
  with pytest.raises(data.DataError, match=match):
    if split == "train":
      data.make_train_iterator(
        c, tokenizer=data.make_tokenizer("bytes"), seq_len=8, batch_size=2, seed=0
      )
    else:
      data.make_eval_batches(
        c, tokenizer=data.make_tokenizer("bytes"), seq_len=8, batch_size=2, max_batches=1
      )


def test_bad_inputs_raise_one_clear_data_error(tmp_path):
  assert issubclass(data.DataError, ValueError)
  _expect_error(text_config(""), "needs config.data.path")
  _expect_error(text_config(tmp_path / "nothing*.jsonl"), "matches no files")
  (tmp_path / "empty.jsonl").write_text("")
  _expect_error(text_config(tmp_path / "empty.jsonl"), "empty.jsonl' is empty")
  (tmp_path / "blank.jsonl").write_text("\n\n")
  _expect_error(text_config(tmp_path / "blank.jsonl"), "is empty")
  (tmp_path / "nofield.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
  _expect_error(
    text_config(tmp_path / "nofield.jsonl"),
    r"nofield.jsonl:2: record has no 'text' field \(has: body\)",
  )
  (tmp_path / "broken.jsonl").write_text('{"text": "ok"\n')
  _expect_error(text_config(tmp_path / "broken.jsonl"), "broken.jsonl:1: not a JSON record")
  with gzip.open(tmp_path / "emptyshard.json.gz", "wt") as f:
    f.write("")
  _expect_error(text_config(tmp_path / "emptyshard.json.gz"), "emptyshard.json.gz' is empty")
  write_jsonl(tmp_path / "ok.jsonl", ["a", "b"])
  _expect_error(
    text_config(tmp_path / "ok.jsonl", val_fraction=0.0), "val split .* is empty", "val"
  )
  _expect_error(
    text_config(tmp_path / "ok.jsonl", source="hdfs"),
    "source='hdfs' is unknown; valid: embedded, text, tfds",
  )
  _expect_error(text_config(tmp_path / "ok.jsonl", packing="best"), "packing='best' is unknown")
  _expect_error(
    text_config(tmp_path / "ok.jsonl", val_path=str(tmp_path / "nope*")),
    "val_path.*matches no files",
    "val",
  )
  c = data.default_config()
  c.source = "tfds"
  _expect_error(c, "needs config.data.tfds_name")


def test_bad_tokenizer_files_raise_data_error(tmp_path):
  with pytest.raises(data.DataError, match="no such file"):
    data.make_tokenizer(str(tmp_path / "missing.model"))
  (tmp_path / "junk.model").write_bytes(b"\x00\x01not a sentencepiece model")
  with pytest.raises(data.DataError, match="not a SentencePiece model"):
    data.make_tokenizer(str(tmp_path / "junk.model"))
  (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 7}')
  with pytest.raises(data.DataError, match=r"not a Hugging Face tokenizer\.json"):
    data.make_tokenizer(str(tmp_path / "tokenizer.json"))
  (tmp_path / "zero.model").write_bytes(b"")
  with pytest.raises(data.DataError, match="is empty"):
    data.make_tokenizer(str(tmp_path / "zero.model"))
