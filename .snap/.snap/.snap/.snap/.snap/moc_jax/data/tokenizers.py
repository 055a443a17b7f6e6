"""Tokenizers behind one small interface: bytes, SentencePiece `.model`, HF `tokenizer.json`.

Every tokenizer exposes BOS/EOS/PAD ids. Where a trained tokenizer lacks one of them it gets a
fresh id just past the tokenizer's own vocabulary (so `vocab_size` grows by one per missing
special), because the pipeline always wraps documents as BOS ... EOS.
"""

from __future__ import annotations

import os
from typing import Protocol

import ml_collections
import numpy as np

from moc_jax.data.errors import DataError


class Tokenizer(Protocol):
  """What the pipeline and the trainer need from a tokenizer."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: list[int]) -> str: ...

  def encode_np(self, text: str) -> np.ndarray: ...


class ByteTokenizer:
  """UTF-8 bytes are ids 0..255; BOS=256, EOS=257, PAD=258."""

  vocab_size = 259
  bos_id = 256
  eos_id = 257
  pad_id = 258

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))

  def encode_np(self, text: str) -> np.ndarray:
    """Fast path: no Python list (bytes -> int32 in one numpy call)."""
    return np.frombuffer(text.encode("utf-8", errors="replace"), np.uint8).astype(np.int32)

  def decode(self, ids: list[int]) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


def _assign_specials(base_vocab: int, found: dict[str, int | None]) -> tuple[int, dict[str, int]]:
  """Gives each missing special a fresh id after the base vocabulary."""
  out, vocab = {}, base_vocab
  for name in ("bos", "eos", "pad"):
    tid = found.get(name)
    if tid is None or tid < 0:
      tid, vocab = vocab, vocab + 1
    out[name] = int(tid)
  return vocab, out


class SentencePieceTokenizer:
  """A SentencePiece model file (e.g. T5's spiece.model or one from train_tokenizer)."""

  def __init__(self, path: str):
    import sentencepiece as spm

    self.path = path
    try:
      with open(path, "rb") as f:
        self._proto = f.read()
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    except OSError as e:
      raise DataError(f"tokenizer file {path!r} cannot be read: {e}") from e
    except Exception as e:  # sentencepiece raises RuntimeError / TypeError on bad protos
      raise DataError(f"tokenizer file {path!r} is not a SentencePiece model: {e}") from e
    self._base_vocab = self._sp.get_piece_size()
    sp = self._sp
    self.vocab_size, ids = _assign_specials(
      self._base_vocab, {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()}
    )
    self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
    self._specials = {self.bos_id, self.eos_id, self.pad_id}

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_np(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids: list[int]) -> str:
    keep = [int(i) for i in ids if int(i) not in self._specials and 0 <= int(i) < self._base_vocab]
    return self._sp.decode(keep)

  def __getstate__(self) -> dict:
    # SentencePieceProcessor itself is not picklable; worker processes rebuild it from bytes.
    return {k: v for k, v in self.__dict__.items() if k != "_sp"}

  def __setstate__(self, state: dict) -> None:
    import sentencepiece as spm

    self.__dict__.update(state)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})"


_HF_SPECIALS = {
  "bos": ("<s>", "<bos>", "[BOS]", "<|begin_of_text|>", "<|startoftext|>", "[CLS]"),
  "eos": ("</s>", "<eos>", "[EOS]", "<|end_of_text|>", "<|endoftext|>", "[SEP]"),
  "pad": ("<pad>", "[PAD]", "<|pad|>"),
}


class HFTokenizer:
  """A Hugging Face `tokenizers` JSON file (BPE, WordPiece, Unigram, ...)."""

  def __init__(self, path: str):
    import tokenizers

    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
      raise DataError(f"tokenizer file {path!r} is not a Hugging Face tokenizer.json: {e}") from e
    self._base_vocab = self._tok.get_vocab_size(with_added_tokens=True)
    found: dict[str, int | None] = {}
    for name, candidates in _HF_SPECIALS.items():
      found[name] = next(
        (self._tok.token_to_id(t) for t in candidates if self._tok.token_to_id(t) is not None),
        None,
      )
    if found["eos"] is not None and found["eos"] == found["bos"]:
      found["bos"] = None  # GPT-2 style single <|endoftext|>: keep BOS distinct
    self.vocab_size, ids = _assign_specials(self._base_vocab, found)
    self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]
    self._specials = {self.bos_id, self.eos_id, self.pad_id}

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_np(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), np.int32)

  def decode(self, ids: list[int]) -> str:
    keep = [int(i) for i in ids if int(i) not in self._specials and 0 <= int(i) < self._base_vocab]
    return self._tok.decode(keep, skip_special_tokens=True)

  def __repr__(self) -> str:
    return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def make_tokenizer(data_config: ml_collections.ConfigDict | str) -> Tokenizer:
  """Builds the tokenizer named by `config.data.tokenizer` (or a spec string)."""
  spec = data_config if isinstance(data_config, str) else str(data_config.tokenizer)
  if spec == "bytes":
    return ByteTokenizer()
  path = os.path.expanduser(spec)
  if not os.path.isfile(path):
    raise DataError(
      f"config.data.tokenizer={spec!r}: no such file; use 'bytes', a SentencePiece .model "
      "file or a Hugging Face tokenizer.json"
    )
  if os.path.getsize(path) == 0:
    raise DataError(f"tokenizer file {spec!r} is empty")
  if path.endswith(".json"):
    return HFTokenizer(path)
  return SentencePieceTokenizer(path)
