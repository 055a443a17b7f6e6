"""Documents -> fixed-length rows with segment ids, positions and loss weights.

Each document becomes BOS t1 .. tn EOS, and its (input, target) pairs are formed *before*
packing (inputs = tokens[:-1], targets = tokens[1:]), so a target is always the next token of
the same document and no target ever crosses a document boundary, whatever the packing.
Rows carry `segment_ids` (1, 2, ... per document piece in the row, 0 = padding) and
`positions` (restarting at 0 for each piece), for per-document attention masks and RoPE.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from grain import experimental as gex

from moc_jax.data.tokenizers import Tokenizer

ROW_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")


class Tokenize(grain.transforms.Map):
  """Document text -> {'inputs', 'targets'} int32 arrays of one document.

  With `max_tokens` (pad mode keeps only a row's worth) only a prefix of a long text is
  tokenized: tokenizers split at whitespace/pre-tokens first, so the first `max_tokens` ids of
  a prefix that yields `_MARGIN` more are those of the whole text, at a fraction of the cost.
  """

  _MARGIN = 32

  def __init__(self, tokenizer: Tokenizer, max_tokens: int | None = None):
    self.tokenizer, self.max_tokens = tokenizer, max_tokens

  def _encode(self, text: str) -> np.ndarray:
    if self.max_tokens is None:
      return self.tokenizer.encode_np(text)
    chars = 8 * (self.max_tokens + self._MARGIN)
    while len(text) > chars:
      ids_n = self.tokenizer.encode_np(text[:chars])
      if ids_n.size >= self.max_tokens + self._MARGIN:
        return ids_n[: self.max_tokens]
      chars *= 4
    return self.tokenizer.encode_np(text)[: self.max_tokens]

  def map(self, element: Any) -> dict[str, np.ndarray]:
    text = element if isinstance(element, str) else element[1]
    body_n = self._encode(text)
    tokens_n = np.empty(body_n.size + 2, np.int32)
    tokens_n[0], tokens_n[-1] = self.tokenizer.bos_id, self.tokenizer.eos_id
    tokens_n[1:-1] = body_n
    return {"inputs": tokens_n[:-1], "targets": tokens_n[1:]}


class ChunkExample(gex.FlatMapTransform):
  """Cuts a long document into pieces of at most `seq_len` pairs (first_fit packs pieces)."""

  max_fan_out = 1 << 30  # only used by MapDataset.flat_map; we flat-map an IterDataset

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, element: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    n = element["inputs"].shape[0]
    return [
      {k: v[s : s + self.seq_len] for k, v in element.items()} for s in range(0, n, self.seq_len)
    ]


def _row(
  inputs_n: np.ndarray, targets_n: np.ndarray, seg_n: np.ndarray, pos_n: np.ndarray, pad_id: int
) -> dict[str, np.ndarray]:
  real_n = seg_n > 0
  return {
    "inputs": np.where(real_n, inputs_n, pad_id).astype(np.int32),
    "targets": np.where(real_n, targets_n, pad_id).astype(np.int32),
    "weights": real_n.astype(np.float32),
    "segment_ids": seg_n.astype(np.int32),
    "positions": np.where(real_n, pos_n, 0).astype(np.int32),
  }


class PadExample(grain.transforms.Map):
  """The paper's protocol: one document per row, truncated to seq_len, the rest padding."""

  def __init__(self, seq_len: int, pad_id: int):
    self.seq_len, self.pad_id = seq_len, pad_id

  def map(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = min(element["inputs"].shape[0], self.seq_len)
    full_inputs_n = np.zeros(self.seq_len, np.int32)
    full_targets_n = np.zeros(self.seq_len, np.int32)
    full_inputs_n[:n] = element["inputs"][:n]
    full_targets_n[:n] = element["targets"][:n]
    seg_n = (np.arange(self.seq_len) < n).astype(np.int32)
    pos_n = np.arange(self.seq_len, dtype=np.int32)
    return _row(full_inputs_n, full_targets_n, seg_n, pos_n, self.pad_id)


class FromPacked(grain.transforms.Map):
  """Grain's packed features -> the row format the trainer expects."""

  def __init__(self, pad_id: int):
    self.pad_id = pad_id

  def map(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _row(
      element["inputs"],
      element["targets"],
      element["inputs_segment_ids"],
      element["inputs_positions"],
      self.pad_id,
    )


def pack(
  examples: grain.IterDataset,
  *,
  packing: str,
  seq_len: int,
  pad_id: int,
  seed: int,
  num_bins: int,
  shuffle_bins: bool = True,
) -> grain.IterDataset:
  """Per-document examples -> rows of `seq_len` in the chosen packing mode."""
  lengths = {"inputs": seq_len, "targets": seq_len}
  if packing == "concat":
    packed = gex.ConcatThenSplitIterDataset(examples, length_struct=lengths)
  elif packing == "first_fit":
    pieces = gex.FlatMapIterDataset(examples, ChunkExample(seq_len))
    packed = gex.FirstFitPackIterDataset(
      pieces,
      length_struct=lengths,
      num_packing_bins=num_bins,
      seed=seed,
      shuffle_bins=shuffle_bins,
    )
  elif packing == "pad":
    return examples.map(PadExample(seq_len, pad_id))
  else:
    raise ValueError(f"unknown packing {packing!r}")
  return packed.map(FromPacked(pad_id))


def pad_batch(batch: dict[str, np.ndarray], batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
  """Fills a short last batch up to batch_size with all-padding rows (weight 0)."""
  n = batch["inputs"].shape[0]
  if n == batch_size:
    return batch
  out = {}
  for k, v in batch.items():
    fill = pad_id if k in ("inputs", "targets") else 0
    extra = np.full((batch_size - n, *v.shape[1:]), fill, v.dtype)
    out[k] = np.concatenate([v, extra], axis=0)
  return out
