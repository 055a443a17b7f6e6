"""SentencePiece / HF tokenizers, the train_tokenizer command, and their use in the pipeline."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
from test_data_helpers import check_rows, text_config, write_jsonl

from moc_jax import data
from moc_jax.data import sources, train_tokenizer

SAMPLE = "def f(x):\n\treturn x * 2  # ünïcödé ✓ 𝛑\n\n    indented   spaces\r\nend"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """~60 stdlib files as one jsonl shard: small enough to train tokenizers in seconds."""
  d = tmp_path_factory.mktemp("tokcorpus")
  texts = [t for _, t in sources.embedded_corpus()[:400:7]]
  write_jsonl(d / "code.jsonl", texts)
  return str(d / "code.jsonl"), texts


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
  """Paths of a SentencePiece and a BPE tokenizer trained through the CLI entry point."""
  path, _ = corpus
  d = tmp_path_factory.mktemp("tok")
  out = {"sentencepiece": str(d / "sp.model"), "bpe": str(d / "bpe" / "tokenizer.json")}
  for kind, output in out.items():
    args = [f"--input={path}", f"--kind={kind}", "--vocab_size=800", f"--output={output}"]
    assert train_tokenizer.main(args) == 0
  return out


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_trained_tokenizer_round_trips_and_has_distinct_specials(trained, corpus, kind):
  tok = data.make_tokenizer(trained[kind])
  assert 300 < tok.vocab_size <= 800
  specials = {tok.bos_id, tok.eos_id, tok.pad_id}
  assert len(specials) == 3 and max(specials) < tok.vocab_size
  for text in [SAMPLE, corpus[1][0], ""]:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    np.testing.assert_array_equal(tok.encode_np(text), np.asarray(ids, np.int32))
  # Fewer tokens than bytes: it learned something.
  assert len(tok.encode(corpus[1][0])) < 0.6 * len(corpus[1][0].encode())
  clone = pickle.loads(pickle.dumps(tok))  # worker processes get a pickled copy
  assert clone.encode(SAMPLE) == tok.encode(SAMPLE) and clone.vocab_size == tok.vocab_size


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_pipeline_with_trained_tokenizer(trained, corpus, kind):
  c = text_config(corpus[0], tokenizer=trained[kind], val_fraction=0.1, packing="first_fit")
  tok = data.make_tokenizer(c)
  it = data.make_train_iterator(c, tokenizer=tok, seq_len=64, batch_size=4, seed=0)
  for _ in range(3):
    b = next(it)
    check_rows(b, 4, 64, tok.eos_id)
    assert b["inputs"].max() < tok.vocab_size
  ev = data.make_eval_batches(c, tokenizer=tok, seq_len=64, batch_size=4, max_batches=2)
  first = ev[0]["inputs"][0][ev[0]["segment_ids"][0] == 1]
  assert first[0] == tok.bos_id and tok.decode(first.tolist())  # a BOS-led, decodable piece


def test_missing_specials_get_fresh_ids(tmp_path):
  import sentencepiece as spm
  import tokenizers
  from tokenizers import models, pre_tokenizers

  tk = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
  tk.pre_tokenizer = pre_tokenizers.Whitespace()
  tk.save(str(tmp_path / "tokenizer.json"))
  tok = data.make_tokenizer(str(tmp_path / "tokenizer.json"))
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (3, 4, 5, 6)
  assert tok.encode("a b a") == [0, 1, 0] and tok.decode([3, 0, 1, 4, 5]) == "a b"
  # A T5-like SentencePiece model: pad=0, eos=1, unk=2, no BOS -> BOS is appended.
  text = "\n".join(f"token{i} word{i % 7} the cat sat" for i in range(300))
  (tmp_path / "c.txt").write_text(text)
  spm.SentencePieceTrainer.train(
    input=str(tmp_path / "c.txt"), model_prefix=str(tmp_path / "t5like"), vocab_size=40,
    pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
  )  # fmt: skip
  tok = data.make_tokenizer(str(tmp_path / "t5like.model"))
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.vocab_size) == (0, 1, 40, 41)
  assert tok.decode([40, *tok.encode("the cat"), 1, 0]) == "the cat"


def test_train_tokenizer_errors(tmp_path, capsys):
  assert (
    train_tokenizer.main(
      ["--input=/nonexistent/*.txt", "--kind=bpe", f"--output={tmp_path}/t.json"]
    )
    == 2
  )
  assert "matches no files" in capsys.readouterr().err
  (tmp_path / "x.txt").write_text("some text here")
  assert (
    train_tokenizer.main(
      [f"--input={tmp_path}/x.txt", "--kind=sentencepiece", f"--output={tmp_path}/t.json"]
    )
    == 2
  )
  assert "must end in .model" in capsys.readouterr().err
  assert (
    train_tokenizer.main(
      [f"--input={tmp_path}/x.txt", "--kind=bpe", "--vocab_size=100", f"--output={tmp_path}/t.json"]
    )
    == 2
  )
  assert "below the 260" in capsys.readouterr().err
  # The module entry point: exit status 2 and one line on stderr.
  cmd = [sys.executable, "-m", "moc_jax.data.train_tokenizer", "--input=embedded"]
  cmd += ["--kind=sentencepiece", f"--output={tmp_path}/a.txt"]
  r = subprocess.run(cmd, capture_output=True, text=True, check=False)
  assert r.returncode == 2 and "error: --output=" in r.stderr


@pytest.mark.parametrize("kind", ["sentencepiece", "bpe"])
def test_pad_mode_prefix_tokenization_matches_full_tokenization(trained, kind):
  from moc_jax.data import packing

  tok = data.make_tokenizer(trained[kind])
  docs = [t for _, t in sources.embedded_corpus()[1::25]]
  assert max(len(d) for d in docs) > 8 * (64 + 32)  # the prefix path is exercised
  full, prefix = packing.Tokenize(tok), packing.Tokenize(tok, max_tokens=64)
  pad = packing.PadExample(64, tok.pad_id)
  for doc in docs:
    a, b = pad.map(full.map(doc)), pad.map(prefix.map(doc))
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
