"""Streaming text files for corpora too big to hold in memory (e.g. C4's json.gz shards).

Files are shuffled per epoch and per process; each worker reads `cycle_length` files at once,
line by line, interleaving their documents (Grain's InterleaveIterDataset); the row shuffle
after packing mixes them further. A file iterator's position is its line number, so resuming
re-opens the file and skips lines (decompressing them) instead of holding a buffer.
Documents are split into train/validation by the same name hash as the in-memory reader.
"""

from __future__ import annotations

import gzip
import io
import os
from typing import Any

import grain
from grain import experimental as gex

from moc_jax.data import sources
from moc_jax.data.errors import DataError
from moc_jax.data.shuffle import shuffle as global_shuffle


class _FileIterator(grain.DatasetIterator):
  """(name, text) documents of one file that fall in the wanted split."""

  def __init__(self, spec: FileDocuments):
    super().__init__()
    self._spec = spec
    self._line = 0  # lines consumed so far: the whole state
    self._found = 0
    self._file: io.TextIOBase | None = None

  def _open(self) -> None:
    path = self._spec.path
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    self._file = io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="\n")

  def __next__(self) -> tuple[str, str]:
    spec = self._spec
    if self._file is None:
      self._open()
      for _ in range(self._line):
        self._file.readline()
    if not spec.is_records:
      if self._line > 0:
        self.close()
        raise StopIteration
      self._line = 1
      text = self._file.read()
      if not text.strip():
        raise DataError(f"data file {spec.path!r} is empty")
      return os.path.basename(spec.path), text
    base = os.path.basename(spec.path)
    while True:
      line = self._file.readline()
      if not line:
        self.close()
        if self._found == 0:
          raise DataError(f"data file {spec.path!r} holds no records")
        raise StopIteration
      self._line += 1
      text = sources.parse_record(line, spec.path, self._line, spec.text_field)
      if text is None:
        continue
      self._found += 1
      name = f"{base}:{self._line}"
      if spec.keep(name):
        return name, text

  def get_state(self) -> dict[str, Any]:
    return {"line": self._line, "found": self._found}

  def set_state(self, state: dict[str, Any]) -> None:
    self.close()
    self._line, self._found = int(state["line"]), int(state["found"])

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


class FileDocuments(grain.IterDataset):
  """One file as a stream of (name, text) documents of one split."""

  def __init__(self, path: str, text_field: str, want_val: bool | None, val_fraction: float):
    super().__init__()
    self.path, self.text_field = path, text_field
    self.want_val, self.val_fraction = want_val, val_fraction
    self.is_records = path.endswith(sources.RECORD_SUFFIXES)

  def keep(self, name: str) -> bool:
    return self.want_val is None or sources.is_validation(name, self.val_fraction) == self.want_val

  def __iter__(self) -> _FileIterator:
    return _FileIterator(self)

  def __str__(self) -> str:
    return f"FileDocuments({os.path.basename(self.path)})"


class _MakeFile(grain.transforms.Map):
  def __init__(self, text_field: str, want_val: bool | None, val_fraction: float):
    self.text_field, self.want_val, self.val_fraction = text_field, want_val, val_fraction

  def map(self, path: str) -> FileDocuments:
    return FileDocuments(path, self.text_field, self.want_val, self.val_fraction)


def check_first_record(path: str, text_field: str) -> None:
  """Fails at start-up, not hours in, on the commonest mistakes: empty file, wrong field."""
  if os.path.getsize(path) == 0:
    raise DataError(f"data file {path!r} is empty")
  it = _FileIterator(FileDocuments(path, text_field, None, 0.0))
  try:
    next(it)
  except StopIteration:
    raise DataError(f"data file {path!r} holds no records") from None
  finally:
    it.close()


def stream_documents(
  files: list[str],
  *,
  text_field: str,
  want_val: bool | None,
  val_fraction: float,
  seed: int | None,
  shard: tuple[int, int] = (0, 1),
  repeat: bool = True,
  cycle_length: int = 16,
  num_workers: int = 0,
) -> grain.IterDataset:
  """(name, text) documents of `files`, interleaved; shuffled by file when `seed` is set."""
  index, count = shard
  if len(files) < count:
    raise DataError(
      f"streaming needs at least one file per process: {len(files)} files, {count} processes "
      "(set config.data.text_streaming='off' to read documents into memory instead)"
    )
  check_first_record(files[index], text_field)
  ds = grain.MapDataset.source(files)[index::count]
  if seed is not None:
    ds = global_shuffle(ds, seed)
  if repeat:
    ds = ds.repeat(None)
  ds = ds.map(_MakeFile(text_field, want_val, val_fraction))
  # Never more open files than each worker has per epoch, or one file's documents would be
  # read twice at once (from two epochs).
  per_worker = len(range(index, len(files), count)) // max(1, num_workers)
  return gex.InterleaveIterDataset(ds, cycle_length=max(1, min(cycle_length, per_worker)))
