"""TFDS datasets read by random access from ArrayRecord files (no TensorFlow needed).

Prepare once, on any machine with TensorFlow:
  tfds build c4/en --file_format=array_record --data_dir=DIR
then train with --config.data.source=tfds --config.data.tfds_name=c4/en
--config.data.tfds_data_dir=DIR.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from moc_jax.data.errors import DataError

_RANDOM_ACCESS_FORMATS = ("array_record", "parquet")


def _open_builder(name: str, data_dir: str | None) -> Any:
  """The prepared builder (from code or from the files in data_dir), or a DataError."""
  import tensorflow_datasets as tfds

  hint = f"tfds build {name} --file_format=array_record" + (
    f" --data_dir={data_dir}" if data_dir else ""
  )
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
  fmt = str(getattr(builder.info.file_format, "value", builder.info.file_format))
  if fmt not in _RANDOM_ACCESS_FORMATS:
    raise DataError(
      f"TFDS dataset {name!r} in {str(builder.data_dir)!r} is stored as {fmt}, which cannot be "
      f"read by random access; rebuild it with `{hint}`"
    )
  return builder


class TfdsDocuments:
  """Random-access document texts of one TFDS split; picklable (reopens in each process)."""

  def __init__(self, name: str, split: str, data_dir: str | None, text_field: str):
    self.name, self.split, self.data_dir, self.text_field = name, split, data_dir, text_field
    builder = _open_builder(name, data_dir)
    features = builder.info.features
    if text_field not in features:
      have = ", ".join(sorted(features))
      raise DataError(
        f"TFDS dataset {name!r} has no {text_field!r} feature (has: {have}); "
        "set config.data.text_field"
      )
    try:
      self._source = self._open()
    except ValueError as e:
      splits = ", ".join(sorted(builder.info.splits))
      raise DataError(f"TFDS dataset {name!r} has no split {split!r} (splits: {splits})") from e
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


def load_split(data_config: ml_collections.ConfigDict, split: str) -> TfdsDocuments:
  """The train or val split named by config.data.tfds_train_split / tfds_val_split."""
  c = data_config
  name = str(c.tfds_name).strip()
  split_name = str(c.tfds_train_split if split == "train" else c.tfds_val_split).strip()
  if not split_name:
    raise DataError(
      f"config.data.tfds_{split}_split is empty; name a split, e.g. 'train[98%:]' for a "
      "dataset without a validation split"
    )
  docs = TfdsDocuments(name, split_name, str(c.tfds_data_dir) or None, str(c.text_field))
  if len(docs) == 0:
    raise DataError(f"the {split} split {split_name!r} of TFDS dataset {name!r} is empty")
  return docs
