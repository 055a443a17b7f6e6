"""Shared builders for the data tests (no tests here): small corpora, row-contract checks."""

from __future__ import annotations

import json
import string
from collections.abc import Callable

import numpy as np

from moc_jax.data import default_config

ALPHABET = string.ascii_letters + string.digits


def doc_text(i: int, n: int) -> str:
  """A document whose bytes identify it: 'd<i>:' then n pseudo-random letters."""
  rng = np.random.default_rng(i)
  return f"d{i}:" + "".join(rng.choice(list(ALPHABET), size=n))


def write_jsonl(path, texts: list[str]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for t in texts:
      f.write(json.dumps({"text": t, "id": 1}) + "\n")


def text_config(path: str, **overrides):
  c = default_config()
  c.source = "text"
  c.path = str(path)
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def check_rows(batch: dict[str, np.ndarray], batch_size: int, seq_len: int, eos_id: int) -> None:
  """Asserts the row-format contract on one batch."""
  for key in ("inputs", "targets", "segment_ids", "positions"):
    assert batch[key].shape == (batch_size, seq_len), key
    assert batch[key].dtype == np.int32, key
  assert batch["weights"].dtype == np.float32
  seg, pos = batch["segment_ids"], batch["positions"]
  np.testing.assert_array_equal(batch["weights"], (seg > 0).astype(np.float32))
  for r in range(batch_size):
    real = seg[r] > 0
    n = int(real.sum())
    assert real[:n].all(), "padding must only sit at the end of a row"
    assert (pos[r, n:] == 0).all()
    if n == 0:
      continue
    ids = seg[r, :n]
    starts = np.flatnonzero(np.diff(ids, prepend=0))
    np.testing.assert_array_equal(ids[starts], np.arange(1, len(starts) + 1))
    for s, e in zip(starts, [*starts[1:], n], strict=True):
      np.testing.assert_array_equal(pos[r, s:e], np.arange(e - s))
      # Within a document the target of token t is the input at t+1.
      np.testing.assert_array_equal(batch["targets"][r, s : e - 1], batch["inputs"][r, s + 1 : e])
      # The BOS..EOS wrapping: an EOS target ends its piece (nothing follows within it).
      eos_at = np.flatnonzero(batch["targets"][r, s:e] == eos_id)
      assert eos_at.size == 0 or eos_at.tolist() == [e - s - 1]


def tiny_tfds_builder(class_name: str, n_train: int, n_val: int, **fields: Callable[[int], str]):
  """A TFDS builder class, registered under class_name in snake_case, whose example i holds
  fields[k](i) in text feature k: train i in [0, n_train), validation i in [1000, 1000+n_val)."""
  import tensorflow_datasets as tfds

  class _Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      features = tfds.features.FeaturesDict({k: tfds.features.Text() for k in fields})
      return tfds.core.DatasetInfo(builder=self, features=features)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {
        "train": self._generate_examples(0, n_train),
        "validation": self._generate_examples(1000, n_val),
      }

    def _generate_examples(self, start, n):
      for i in range(start, start + n):
        yield str(i), {k: f(i) for k, f in fields.items()}

  return type(class_name, (_Tiny,), {"__module__": __name__})
