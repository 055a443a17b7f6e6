"""Grain pipelines: the infinite, resumable training iterator and the fixed eval batches."""

from __future__ import annotations

import ast
import hashlib
import json
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from grain import experimental as gex

from moc_jax.data import packing as packing_lib
from moc_jax.data import shuffle as shuffle_lib
from moc_jax.data import sources, streaming, tfds_source, tfds_stream
from moc_jax.data.config import check_config
from moc_jax.data.errors import DataError
from moc_jax.data.tokenizers import Tokenizer

STATE_FORMAT = 1
EVAL_SEED = 0  # eval order must not depend on the training seed, so runs are comparable
# Documents are in memory or memory-mapped ArrayRecord: reader threads would only contend for
# the GIL (and Grain's thread handoff costs ~5 ms per element); workers are the way to scale.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
STREAM_CYCLE = 16  # streamed files read at once per worker


def _documents(data_config: ml_collections.ConfigDict, split: str) -> Sequence[Any]:
  """Random-access documents of one split (str or (name, text) elements)."""
  if data_config.source == "tfds":
    return tfds_source.load_split(data_config, split)
  return sources.load_documents(data_config, split)


def _document_stream(
  data_config: ml_collections.ConfigDict,
  split: str,
  *,
  seed: int | None,
  shard: tuple[int, int] = (0, 1),
  repeat: bool,
) -> grain.IterDataset:
  """Documents of one split and shard: globally shuffled (a new order per epoch) when they
  are random-access, shuffled by file and interleaved when streamed (big text files, TFDS
  through tf.data)."""
  c = data_config
  if c.source == "tfds" and tfds_source.uses_tf_data(c):
    return tfds_stream.stream_documents(
      c, split, seed=seed, shard=shard, repeat=repeat, num_workers=int(c.num_workers) * repeat
    )
  if c.source == "text":
    files, want_val = sources.text_split_files(c, split)
    if sources.use_streaming(c, files):
      return streaming.stream_documents(
        files, text_field=str(c.text_field), want_val=want_val, val_fraction=float(c.val_fraction),
        seed=seed, shard=shard, repeat=repeat, cycle_length=STREAM_CYCLE if repeat else 1,
        num_workers=int(c.num_workers),
      )  # fmt: skip
  docs = _documents(c, split)
  index, count = shard
  if len(docs) < count:
    raise DataError(f"the {split} split has {len(docs)} documents, fewer than {count} processes")
  ds = grain.MapDataset.source(docs)[index::count]
  if seed is not None:
    ds = shuffle_lib.shuffle(ds, seed)
  if repeat:
    ds = ds.repeat(None)
  return ds.to_iter_dataset(_READ_OPTIONS)


def _tokenize(
  data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, seq_len: int
) -> packing_lib.Tokenize:
  """Pad mode keeps at most seq_len tokens of a document, so only those are tokenized."""
  return packing_lib.Tokenize(tokenizer, seq_len if data_config.packing == "pad" else None)


def _check_request(c: ml_collections.ConfigDict, seq_len: int, batch_size: int) -> None:
  check_config(c)
  if seq_len < 1 or batch_size < 1:
    raise DataError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")


def _packed_rows(
  c: ml_collections.ConfigDict, tokenizer: Tokenizer, docs, seq_len: int, **pack_kw: Any
):
  """Documents → tokens → fixed-length rows, as config.data.packing says."""
  return packing_lib.pack(
    docs.map(_tokenize(c, tokenizer, seq_len)),
    packing=c.packing,
    seq_len=seq_len,
    pad_id=tokenizer.pad_id,
    num_bins=int(c.packing_bins),
    **pack_kw,
  )


def _ensure_absl_flags_parsed() -> None:
  """Grain's worker processes read absl flags; outside absl.app (tests, notebooks) use defaults."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _mix_seed(seed: int, shuffle_seed: int) -> int:
  """One 32-bit seed from the run seed and config.data.shuffle_seed."""
  h = hashlib.blake2b(f"{int(seed)}:{int(shuffle_seed)}".encode(), digest_size=4).digest()
  return int.from_bytes(h, "little")


def _fingerprint(data_config: ml_collections.ConfigDict, tokenizer: Tokenizer, **kw: Any) -> dict:
  """Everything that decides which rows come out, to refuse resuming into another stream."""
  keys = (
    "source", "path", "val_path", "val_fraction", "tokenizer", "packing", "packing_bins",
    "shuffle_window", "num_workers", "shuffle_seed", "tfds_name", "tfds_train_split",
    "text_field", "text_streaming",
  )  # fmt: skip
  fp = {k: data_config.get(k) for k in keys}
  fp["vocab_size"] = int(tokenizer.vocab_size)
  fp.update(kw)
  return json.loads(json.dumps(fp))


class TrainIterator:
  """Infinite iterator of training batches with a small, JSON-serialisable position."""

  def __init__(self, dataset: grain.IterDataset, fingerprint: dict):
    self._dataset = dataset
    self._fingerprint = fingerprint
    # Close (and drop) the Grain iterator at exit, while modules still exist: Grain's own
    # __del__ fails noisily if it first runs during interpreter teardown.
    self._box = [iter(dataset)]
    self._finalizer = weakref.finalize(self, _close_iterators, self._box)

  def __iter__(self) -> TrainIterator:
    return self

  @property
  def _it(self) -> grain.DatasetIterator:
    if not self._box:
      raise RuntimeError("this TrainIterator was closed")
    return self._box[0]

  def __next__(self) -> dict[str, np.ndarray]:
    # Plain copies: worker batches arrive in shared memory, which is released (unlinked) as
    # soon as the SharedMemoryArray is dropped, rather than whenever the trainer drops it.
    return {k: np.array(v) for k, v in next(self._it).items()}

  def get_state(self) -> dict:
    """Position to store in the checkpoint; set_state(it) continues exactly from here."""
    # Grain's state holds tuples that a JSON round trip would turn into lists (and Grain then
    # resumes elsewhere), so it travels as a Python literal string.
    grain_state = repr(self._it.get_state())
    return {"format": STATE_FORMAT, "fingerprint": self._fingerprint, "grain": grain_state}

  def set_state(self, state: dict) -> None:
    """Moves to a position from get_state of an iterator built with the same settings."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or "grain" not in state:
      raise DataError("data iterator state is not one written by TrainIterator.get_state")
    old, new = state.get("fingerprint", {}), self._fingerprint
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
      changes = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
      raise DataError(f"cannot resume the data stream, its settings changed ({changes})")
    grain_state = state["grain"]
    if isinstance(grain_state, str):
      grain_state = ast.literal_eval(grain_state)
    self._it.set_state(grain_state)

  def close(self) -> None:
    """Stops prefetch threads and worker processes (also done at exit); no batches after."""
    self._finalizer()


def _close_iterators(box: list) -> None:
  while box:
    close = getattr(box.pop(), "close", None)
    if close is not None:
      close()


def make_train_iterator(
  data_config: ml_collections.ConfigDict,
  *,
  tokenizer: Tokenizer,
  seq_len: int,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> TrainIterator:
  """Batches of (batch_size, seq_len) rows: inputs, targets, weights, segment_ids, positions.

  Documents of this process's shard are shuffled globally (a new order each epoch), wrapped
  BOS .. EOS, tokenized, packed and shuffled again in windows of rows; all deterministic from
  (seed, config.data.shuffle_seed, process_index, process_count, num_workers).
  """
  c = data_config
  _check_request(c, seq_len, batch_size)
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} not in [0, process_count={process_count})")
  mixed = _mix_seed(seed, c.shuffle_seed)
  docs = _document_stream(c, "train", seed=mixed, shard=(process_index, process_count), repeat=True)
  rows = _packed_rows(c, tokenizer, docs, seq_len, seed=mixed)
  if int(c.shuffle_window) > 0:
    rows = gex.WindowShuffleIterDataset(rows, window_size=int(c.shuffle_window), seed=mixed)
  batches = rows.batch(batch_size, drop_remainder=True)
  if int(c.num_workers) > 0:
    _ensure_absl_flags_parsed()
    opts = grain.MultiprocessingOptions(
      num_workers=int(c.num_workers), per_worker_buffer_size=int(c.prefetch)
    )
    batches = batches.mp_prefetch(opts)
  elif int(c.prefetch) > 0:
    batches = gex.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=int(c.prefetch))
  # Only tf.data runs record their reader, so checkpoints from before it existed still resume.
  reader = {"tfds_reader": "tf.data"} if isinstance(docs, tfds_stream.TfdsStream) else {}
  fp = _fingerprint(
    c, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=int(seed),
    process_index=process_index, process_count=process_count, **reader,
  )  # fmt: skip
  return TrainIterator(batches, fp)


def make_eval_batches(
  data_config: ml_collections.ConfigDict,
  *,
  tokenizer: Tokenizer,
  seq_len: int,
  batch_size: int,
  max_batches: int | None,
) -> list[dict[str, np.ndarray]]:
  """The validation split as a fixed list of at most max_batches batches (None = all).

  Same row format as training; the order is fixed (independent of the training seed) and a
  short last batch is filled with weight-0 rows instead of being dropped.
  """
  c = data_config
  _check_request(c, seq_len, batch_size)
  docs = _document_stream(c, "val", seed=EVAL_SEED, repeat=False)
  rows = _packed_rows(c, tokenizer, docs, seq_len, seed=EVAL_SEED, shuffle_bins=False)
  out = []
  for batch in rows.batch(batch_size, drop_remainder=False):
    if max_batches is not None and len(out) >= max_batches:
      break
    out.append(packing_lib.pad_batch(batch, batch_size, tokenizer.pad_id))
  if not out and max_batches != 0:
    raise DataError(f"the val split of config.data.source={c.source!r} holds no documents")
  return out
