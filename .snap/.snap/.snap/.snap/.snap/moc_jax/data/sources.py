"""Document sources: the embedded stdlib corpus and local text files, split train/validation.

A source is a random-access sequence of document strings, so Grain can shuffle it globally.
Text files are read into memory once per process (a few GB at most); corpora larger than
that belong in TFDS ArrayRecord format (see README.md).
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import json
import os
import sysconfig

import ml_collections

from moc_jax.data.errors import DataError

# Directories skipped in the embedded corpus. Test suites are dropped because many Linux
# distributions ship the standard library without them: skipping them keeps the corpus (and
# so the split and the loss curve) the same on every machine with this Python version.
EMBEDDED_SKIP_DIRS = frozenset(
  {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
RECORD_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


def is_validation(name: str, val_fraction: float) -> bool:
  """Deterministic, machine-independent split of a document name into validation."""
  h = hashlib.blake2b(name.encode("utf-8", errors="replace"), digest_size=8).digest()
  return int.from_bytes(h, "little") / 2**64 < val_fraction


def clean_text(text: str) -> str:
  """Replaces lone surrogates (possible in JSON escapes) so every tokenizer can encode."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    text = text.encode("utf-8", errors="replace").decode("utf-8")
  return text


@functools.lru_cache(maxsize=1)
def embedded_corpus() -> tuple[tuple[str, str], ...]:
  """(relative path, text) of this Python's stdlib .py files, sorted; cached per process."""
  root = sysconfig.get_paths()["stdlib"]
  if not root or not os.path.isdir(root):
    raise DataError(f"embedded source: Python's standard library directory {root!r} not found")
  docs = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in EMBEDDED_SKIP_DIRS)
    for fn in filenames:
      if fn.endswith(".py"):
        full = os.path.join(dirpath, fn)
        with open(full, "rb") as f:
          text = f.read().decode("utf-8", errors="replace")
        docs.append((os.path.relpath(full, root).replace(os.sep, "/"), text))
  docs.sort()
  if not docs:
    raise DataError(f"embedded source: no .py files under {root!r}")
  return tuple(docs)


def expand_globs(pattern: str, what: str = "config.data.path") -> list[str]:
  """Sorted files matched by comma-separated globs (a directory means all files below it)."""
  parts = [p.strip() for p in str(pattern).split(",") if p.strip()]
  if not parts:
    raise DataError(f"{what} is empty; give a glob such as 'data/*.jsonl'")
  files: set[str] = set()
  for part in parts:
    part = os.path.expanduser(part)
    if os.path.isdir(part):
      part = os.path.join(part, "**", "*")
    matched = [f for f in glob.glob(part, recursive=True) if os.path.isfile(f)]
    if not matched:
      raise DataError(f"{what}: {part!r} matches no files")
    files.update(matched)
  return sorted(files)


def _read_text(path: str) -> str:
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"cannot read {path!r}: {e}") from e
  return data.decode("utf-8", errors="replace")


def parse_record(line: str, path: str, lineno: int, text_field: str) -> str | None:
  """The text of one jsonl line (None for a blank line); DataError names file:line."""
  if not line.strip():
    return None
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{lineno}: not a JSON record ({e.msg})") from e
  if not isinstance(record, dict) or text_field not in record:
    keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
    raise DataError(
      f"{path}:{lineno}: record has no {text_field!r} field (has: {keys}); "
      "set config.data.text_field"
    )
  value = record[text_field]
  if not isinstance(value, str):
    raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(value).__name__}, not text")
  return clean_text(value)


def read_documents(path: str, text_field: str) -> list[tuple[str, str]]:
  """(name, text) for each document of one file; raises DataError for an empty shard."""
  base = os.path.basename(path)
  text = _read_text(path)
  if not text.strip():
    raise DataError(f"data file {path!r} is empty")
  if not path.endswith(RECORD_SUFFIXES):
    return [(base, text)]
  docs = []
  for lineno, line in enumerate(text.split("\n"), start=1):
    value = parse_record(line, path, lineno, text_field)
    if value is not None:
      docs.append((f"{base}:{lineno}", value))
  if not docs:
    raise DataError(f"data file {path!r} holds no records")
  return docs


STREAM_AUTO_BYTES = 1 << 30  # text_streaming='auto' streams corpora bigger than this on disk


def text_split_files(
  data_config: ml_collections.ConfigDict, split: str
) -> tuple[list[str], bool | None]:
  """Files holding a split of the text source, and which hash side to keep (None = all)."""
  c = data_config
  if str(c.val_path).strip():
    if split == "val":
      return expand_globs(str(c.val_path), "config.data.val_path"), None
    return expand_globs(str(c.path), "config.data.path"), None
  files = expand_globs(str(c.path), "config.data.path")
  if float(c.val_fraction) <= 0.0:
    if split == "val":
      raise DataError(
        f"the val split of config.data.path={c.path!r} is empty "
        "(raise config.data.val_fraction or set config.data.val_path)"
      )
    return files, None
  return files, split == "val"


def use_streaming(data_config: ml_collections.ConfigDict, files: list[str]) -> bool:
  """text_streaming: 'on', 'off', or 'auto' (stream above STREAM_AUTO_BYTES on disk)."""
  mode = str(data_config.text_streaming)
  if mode == "auto":
    return sum(os.path.getsize(f) for f in files) > STREAM_AUTO_BYTES
  return mode == "on"


@functools.lru_cache(maxsize=4)
def _read_files(files: tuple[str, ...], text_field: str) -> tuple[tuple[str, str], ...]:
  docs: list[tuple[str, str]] = []
  for path in files:
    docs.extend(read_documents(path, text_field))
  return tuple(docs)


def load_documents(data_config: ml_collections.ConfigDict, split: str) -> list[tuple[str, str]]:
  """(name, text) documents of split 'train' or 'val' for the embedded or text source."""
  c = data_config
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  if c.source == "embedded":
    want_val = split == "val"
    fraction = float(c.val_fraction)
    docs = [d for d in embedded_corpus() if is_validation(d[0], fraction) == want_val]
    where = "embedded stdlib corpus"
  elif c.source == "text":
    files, want_val = text_split_files(c, split)
    docs = list(_read_files(tuple(files), str(c.text_field)))
    if want_val is not None:
      docs = [d for d in docs if is_validation(d[0], float(c.val_fraction)) == want_val]
    where = f"config.data.{'val_path' if split == 'val' and c.val_path else 'path'}"
  else:
    raise DataError(f"load_documents does not handle source {c.source!r}")
  if not docs:
    hint = " (raise config.data.val_fraction or set config.data.val_path)" if split == "val" else ""
    raise DataError(f"the {split} split of the {where} is empty{hint}")
  return docs
