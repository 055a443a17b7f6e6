"""TFDS splits streamed with tf.data, for builds that tfds.data_source cannot read (TFRecord).

Needs TensorFlow, only to read. Each process reads its `tfds.even_splits` share of the split
through `builder.as_dataset`, one file after another, in an order shuffled afresh each epoch by
a seed of (seed, epoch). TFDS already shuffled the examples across files when it built them, so
reading files in turn loses no mixing that interleaving would add, and the row window shuffle
after packing mixes documents further. There is no example shuffle buffer, whose contents would
have to be part of the resume state.

Resume: the position is (epoch, documents read in that epoch), two integers in the Grain state.
Because files are read in turn in a known order, set_state finds the file and the record that
position falls in and starts there (TFDS file instructions: later files only, a raw-record
`skip` in the first), so restoring reads at most one file's records up to the position, without
parsing them. tf.data's own iterator checkpoints would be binary TensorFlow files tied to the TF
version and pipeline graph, not a small JSON state that Orbax stores with the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from moc_jax.data import tfds_source
from moc_jax.data.errors import DataError

READ_BATCH = 256  # documents per tf.data step: one Python round trip each, not one per document


@functools.cache
def _tensorflow() -> Any:
  """TensorFlow, kept off the accelerators: the model runs in JAX and needs their memory."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    import tensorflow as tf
  except ImportError as e:
    raise DataError(
      f"streaming TFDS with tf.data needs TensorFlow, which failed to import ({e}); "
      "`pip install tensorflow-cpu`"
    ) from e
  with contextlib.suppress(RuntimeError):  # TF's devices were initialised elsewhere already
    tf.config.set_visible_devices([], "GPU")
  return tf


def _epoch_seed(seed: int, epoch: int) -> int:
  h = hashlib.blake2b(f"{int(seed)}:{int(epoch)}".encode(), digest_size=8).digest()
  return int.from_bytes(h, "little")


def arrange_files(instructions: Sequence[Any], seed: int | None, start: int) -> list[Any]:
  """TFDS file instructions in this epoch's order (shuffled unless seed is None), beginning at
  document `start`: earlier files dropped, the first one's `skip` advanced."""
  order = list(instructions)
  if seed is not None:
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
  for i, f in enumerate(order):
    if start < f.take:
      first = dataclasses.replace(f, skip=f.skip + start, take=f.take - start)
      return [first, *order[i + 1 :]]
    start -= f.take
  raise ValueError(f"document {start} is past the end of the split")  # the caller prevents it


class _StreamIterator(grain.DatasetIterator):
  """Document texts of one share, epoch after epoch; the state is (epoch, documents read)."""

  def __init__(self, spec: TfdsStream):
    super().__init__()
    self._spec = spec
    self._epoch = 0
    self._read = 0
    self._it: Iterator[np.ndarray] | None = None
    self._buffer: list[bytes] = []

  def __next__(self) -> str:
    spec = self._spec
    while not self._buffer:
      if self._read >= spec.size:  # the epoch is done
        if not spec.repeat:
          raise StopIteration
        self._epoch, self._read, self._it = self._epoch + 1, 0, None
      if self._it is None:
        self._it = spec.epoch_dataset(self._epoch, self._read).as_numpy_iterator()
      batch = next(self._it, None)
      if batch is None:
        raise DataError(f"{self._spec}: its files hold fewer documents than its metadata says")
      self._buffer = list(batch)[::-1]
    self._read += 1
    return self._buffer.pop().decode("utf-8", errors="replace")

  def get_state(self) -> dict[str, Any]:
    return {"epoch": self._epoch, "read": self._read}

  def set_state(self, state: dict[str, Any]) -> None:
    self._it, self._buffer = None, []
    self._epoch, self._read = int(state["epoch"]), int(state["read"])


class TfdsStream(grain.IterDataset):
  """One process's share of a TFDS split as a stream of document texts."""

  def __init__(self, builder: Any, split: Any, text_field: str, seed: int | None, repeat: bool):
    super().__init__()
    self.builder, self.split, self.text_field = builder, split, text_field
    self.seed, self.repeat = seed, repeat
    self.size = int(builder.info.splits[split].num_examples)

  def epoch_dataset(self, epoch: int, start: int) -> Any:
    """Batches of document texts of one epoch from document `start` on."""
    tf = _tensorflow()
    import tensorflow_datasets as tfds

    options = tf.data.Options()
    options.deterministic = True
    seed = None if self.seed is None else _epoch_seed(self.seed, epoch)
    read_config = tfds.ReadConfig(
      options=options,
      try_autocache=False,
      interleave_cycle_length=1,  # files in turn, so a position names one file and record
      experimental_interleave_sort_fn=lambda files: arrange_files(files, seed, start),
    )
    ds = self.builder.as_dataset(split=self.split, shuffle_files=False, read_config=read_config)
    field = self.text_field
    return ds.map(lambda ex: ex[field]).batch(READ_BATCH)

  def __iter__(self) -> _StreamIterator:
    return _StreamIterator(self)

  def __str__(self) -> str:
    return f"TfdsStream({self.builder.name}, split={self.split})"


def stream_documents(
  data_config: ml_collections.ConfigDict,
  split: str,
  *,
  seed: int | None,
  shard: tuple[int, int],
  repeat: bool,
  num_workers: int = 0,
) -> TfdsStream:
  """This process's share of the train or val split, checked up front (split, field, size)."""
  c = data_config
  if num_workers > 0:
    raise DataError(
      f"config.data.num_workers={num_workers}: a TFDS dataset streamed with tf.data is read "
      "in this process (tf.data parses records in parallel threads); set num_workers=0"
    )
  _tensorflow()
  import tensorflow_datasets as tfds

  name, tfds_split = str(c.tfds_name).strip(), tfds_source.split_of(c, split)
  builder = tfds_source.open_builder(name, str(c.tfds_data_dir) or None)
  tfds_source.check_text_field(builder, name, str(c.text_field))
  total = tfds_source.split_size(builder, name, tfds_split)
  index, count = shard
  if total == 0:
    raise DataError(f"the {split} split {tfds_split!r} of TFDS dataset {name!r} is empty")
  if total < count:
    raise DataError(f"the {split} split has {total} documents, fewer than {count} processes")
  share = tfds_split if count == 1 else tfds.even_splits(tfds_split, n=count)[index]
  return TfdsStream(builder, share, str(c.text_field), seed, repeat)
