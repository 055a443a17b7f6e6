"""Build the convergence study's corpus: Python source files as json.gz shards.

  python benchmarks/make_code_corpus.py --out=.corpus --max_mb=150 \
      /usr/lib/python3.11 /path/to/site-packages

C4 cannot be downloaded on our machines, so the study (benchmarks/convergence.py) trains on
code: every `.py` file under the given roots between 1 KB and 256 KB, deduplicated by content,
taken in sorted path order until `--max_mb` of text. About 1% of files (by a hash of their
content) form the validation shard, so validation documents are never trained on. Output:
`train-NNNNN.json.gz` shards and `val.json.gz`, one JSON record {"text": ...} per line, plus
`manifest.json` with the file, byte and document counts.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys

MIN_BYTES, MAX_BYTES = 1024, 256 * 1024


def source_files(roots: list[str]) -> list[str]:
  """Every .py file under the roots, sorted, without following symlinked directories."""
  paths = []
  for root in roots:
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
  return sorted(paths)


def read_unique(paths: list[str], max_bytes: int):
  """(digest, text) of readable UTF-8 files in size bounds, first copy of each content only."""
  seen, total = set(), 0
  for path in paths:
    try:
      size = os.path.getsize(path)
      if not MIN_BYTES <= size <= MAX_BYTES:
        continue
      with open(path, encoding="utf-8") as f:
        text = f.read()
    except (OSError, UnicodeDecodeError):
      continue
    digest = hashlib.sha1(text.encode()).hexdigest()
    if digest in seen:
      continue
    seen.add(digest)
    total += len(text.encode())
    if total > max_bytes:
      return
    yield digest, text


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("roots", nargs="+")
  p.add_argument("--out", required=True)
  p.add_argument("--max_mb", type=float, default=150.0)
  p.add_argument("--shard_mb", type=float, default=16.0)
  p.add_argument("--val_percent", type=int, default=1)
  a = p.parse_args(argv)
  if os.path.exists(a.out) and os.listdir(a.out):
    sys.exit(f"error: --out={a.out} exists and is not empty; choose a new directory")
  os.makedirs(a.out, exist_ok=True)
  counts = {"train_docs": 0, "val_docs": 0, "train_bytes": 0, "val_bytes": 0}
  shard, shard_bytes, shard_files = None, 0, []
  val = gzip.open(os.path.join(a.out, "val.json.gz"), "wt", encoding="utf-8", compresslevel=9)  # noqa: SIM115
  for digest, text in read_unique(source_files(a.roots), int(a.max_mb * 2**20)):
    line = json.dumps({"text": text}) + "\n"
    split = "val" if int(digest[:8], 16) % 100 < a.val_percent else "train"
    counts[f"{split}_docs"] += 1
    counts[f"{split}_bytes"] += len(text.encode())
    if split == "val":
      val.write(line)
      continue
    if shard is None or shard_bytes > a.shard_mb * 2**20:
      if shard is not None:
        shard.close()
      shard_files.append(f"train-{len(shard_files):05d}.json.gz")
      shard = gzip.open(  # noqa: SIM115
        os.path.join(a.out, shard_files[-1]), "wt", encoding="utf-8", compresslevel=9
      )
      shard_bytes = 0
    shard.write(line)
    shard_bytes += len(text.encode())
  val.close()
  if shard is not None:
    shard.close()
  manifest = dict(counts, roots=a.roots, train_shards=shard_files, max_mb=a.max_mb)
  with open(os.path.join(a.out, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=1)
  print(json.dumps(counts))
  return 0


if __name__ == "__main__":
  sys.exit(main())
