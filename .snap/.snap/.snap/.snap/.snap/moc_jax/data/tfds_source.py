"""TFDS datasets read by random access from ArrayRecord files (no TensorFlow needed).

Prepare once, on any machine with TensorFlow:
  tfds build c4/en --file_format=array_record --data_dir=DIR
then train with --config.data.source=tfds --config.data.tfds_name=c4/en
--config.data.tfds_data_dir=DIR. A TFRecord-only build is streamed with tf.data instead
(tfds_stream.py) when TensorFlow is installed; `uses_tf_data` decides which reader runs.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import ml_collections

from moc_jax.data.errors import DataError

_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


def _build_hint(name: str, data_dir: str | None) -> str:
  return f"tfds build {name} --file_format=array_record" + (
    f" --data_dir={data_dir}" if data_dir else ""
  )


def has_tensorflow() -> bool:
  """Whether TensorFlow is installed, without importing it (that takes seconds)."""
  return importlib.util.find_spec("tensorflow") is not None


def open_builder(name: str, data_dir: str | None) -> Any:
  """The prepared builder (from code or from the files in data_dir), or a DataError."""
  import tensorflow_datasets as tfds

  hint = _build_hint(name, data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    first = str(e).split("\n")[0]
    raise DataError(
      f"TFDS dataset {name!r} not found ({first}); check config.data.tfds_name and "
      f"config.data.tfds_data_dir={data_dir or ''!r}"
    ) from e
  except Exception as e:  # malformed names, version strings, unreadable metadata
    raise DataError(f"TFDS dataset {name!r} cannot be opened: {e}") from e
  if not builder.is_prepared():
    raise DataError(
      f"TFDS dataset {name!r} is not prepared in {str(builder.data_dir)!r}; run `{hint}` "
      "(needs TensorFlow and the source files) or set config.data.tfds_data_dir"
    )
  return builder


def check_text_field(builder: Any, name: str, text_field: str) -> None:
  features = builder.info.features
  if text_field not in features:
    have = ", ".join(sorted(features))
    raise DataError(
      f"TFDS dataset {name!r} has no {text_field!r} feature (has: {have}); "
      "set config.data.text_field"
    )


def _no_split(builder: Any, name: str, split: str) -> DataError:
  splits = ", ".join(sorted(builder.info.splits))
  return DataError(f"TFDS dataset {name!r} has no split {split!r} (splits: {splits})")


def split_size(builder: Any, name: str, split: str) -> int:
  """Examples in a split name (slicing allowed), from the metadata; DataError if unknown."""
  try:
    return int(builder.info.splits[split].num_examples)
  except Exception as e:  # KeyError / ValueError / AssertionError, by TFDS version
    raise _no_split(builder, name, split) from e


def uses_tf_data(data_config: ml_collections.ConfigDict) -> bool:
  """config.data.tfds_streaming: 'on' = tf.data; 'off' = tfds.data_source; 'auto' = tf.data
  only when the dataset cannot be read by random access (a TFRecord build) and TensorFlow is
  installed. Raises the DataError that names the fix when neither reader can run."""
  c = data_config
  mode, name, data_dir = str(c.tfds_streaming), str(c.tfds_name).strip(), str(c.tfds_data_dir)
  if mode == "on" and not has_tensorflow():
    raise DataError(
      "config.data.tfds_streaming='on' reads TFDS with tf.data, which needs TensorFlow: "
      "`pip install tensorflow-cpu` (or set tfds_streaming='off' for an ArrayRecord build)"
    )
  builder = open_builder(name, data_dir or None)
  fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if mode == "on":
    if fmt == "array_record":
      raise DataError(
        f"TFDS dataset {name!r} is stored as array_record, which TFDS does not read with "
        "tf.data; set config.data.tfds_streaming='auto' to read it with tfds.data_source"
      )
    return True
  if fmt in _RANDOM_ACCESS_FORMATS:
    return False
  if mode == "auto" and has_tensorflow():
    return True
  steps = [] if has_tensorflow() else ["`pip install tensorflow-cpu`"]
  if mode == "off":
    steps.append("set config.data.tfds_streaming='auto'")
  raise DataError(
    f"TFDS dataset {name!r} in {str(builder.data_dir)!r} is stored as {fmt}, which cannot be "
    f"read by random access; rebuild it with `{_build_hint(name, data_dir or None)}`, or "
    f"{' and '.join(steps)} to stream it with tf.data"
  )


class TfdsDocuments:
  """Random-access document texts of one TFDS split; picklable (reopens in each process)."""

  def __init__(self, name: str, split: str, data_dir: str | None, text_field: str):
    self.name, self.split, self.data_dir, self.text_field = name, split, data_dir, text_field
    builder = open_builder(name, data_dir)
    check_text_field(builder, name, text_field)
    try:
      self._source = self._open()
    except ValueError as e:
      raise _no_split(builder, name, split) from e
    self._len = len(self._source)

  def _open(self) -> Any:
    import tensorflow_datasets as tfds

    return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir, download=False)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> str:
    value = self._source[int(index)][self.text_field]
    if isinstance(value, bytes):
      return value.decode("utf-8", errors="replace")
    return str(value)

  def __getstate__(self) -> dict:
    return {k: v for k, v in self.__dict__.items() if k != "_source"}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._source = self._open()

  def __repr__(self) -> str:
    return f"TfdsDocuments({self.name!r}, split={self.split!r}, n={self._len})"


def split_of(data_config: ml_collections.ConfigDict, split: str) -> str:
  """The TFDS split for 'train' or 'val' (config.data.tfds_train_split / tfds_val_split)."""
  c = data_config
  name = str(c.tfds_train_split if split == "train" else c.tfds_val_split).strip()
  if not name:
    raise DataError(
      f"config.data.tfds_{split}_split is empty; name a split, e.g. 'train[98%:]' for a "
      "dataset without a validation split"
    )
  return name


def load_split(data_config: ml_collections.ConfigDict, split: str) -> TfdsDocuments:
  """The train or val split as random-access documents (ArrayRecord, no TensorFlow)."""
  c = data_config
  name = str(c.tfds_name).strip()
  tfds_split = split_of(c, split)
  docs = TfdsDocuments(name, tfds_split, str(c.tfds_data_dir) or None, str(c.text_field))
  if len(docs) == 0:
    raise DataError(f"the {split} split {tfds_split!r} of TFDS dataset {name!r} is empty")
  return docs
