"""Input-pipeline throughput (tokens/s per host) with a SentencePiece tokenizer.

  python benchmarks/data_pipeline.py [--tokenizer=PATH.model] [--seconds=15]

Trains a SentencePiece model on the embedded corpus' train split (vocab 32000, or the most
the corpus supports) unless one is given, then times `make_train_iterator` batches
(seq_len 256, the paper's) with 0 and 2 worker processes, plus the stages alone (tokenizing,
packing) to show where the time goes. Writes benchmarks/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moc_jax import data
from moc_jax.data import sources, train_tokenizer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "data_pipeline.json")


def _machine() -> dict:
  cpu = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
  except OSError:
    pass
  return {
    "cpu": cpu,
    "cores": os.cpu_count(),
    "platform": platform.platform(),
    "python": platform.python_version(),
  }


def _git_commit() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    return out.stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def time_pipeline(cfg, tok, seq_len: int, batch_size: int, seconds: float) -> dict:
  """Tokens/s of next(iterator) after the first batch (worker start-up timed separately)."""
  load_before = os.getloadavg()[0]
  t0 = time.perf_counter()
  it = data.make_train_iterator(cfg, tokenizer=tok, seq_len=seq_len, batch_size=batch_size, seed=0)
  next(it)
  startup_s = time.perf_counter() - t0
  n, real, t0 = 0, 0.0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    b = next(it)
    n += 1
    real += float(b["weights"].sum())
  dt = time.perf_counter() - t0
  it.close()
  return {
    "num_workers": int(cfg.num_workers),
    "packing": cfg.packing,
    "tokenizer": "bytes" if cfg.tokenizer == "bytes" else "sentencepiece",
    "seq_len": seq_len,
    "batch_size": batch_size,
    "batches": n,
    "seconds": round(dt, 2),
    "startup_s": round(startup_s, 2),
    "tokens_per_s": round(n * batch_size * seq_len / dt),
    "nonpad_tokens_per_s": round(real / dt),
    # Other work on the machine skews these figures: the 1-minute load average around the run.
    "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
  }


def time_stages(tok, seq_len: int) -> dict:
  """The stages alone, single process: tokenizing text, and packing pre-tokenized docs."""
  import grain

  from moc_jax.data import packing

  sources.embedded_corpus.cache_clear()
  t0 = time.perf_counter()
  docs = [t for _, t in sources.load_documents(data.default_config(), "train")]
  read_s = time.perf_counter() - t0
  byte_tok = data.make_tokenizer("bytes")
  t0 = time.perf_counter()
  n_bytes = sum(len(byte_tok.encode_np(d)) for d in docs)
  bytes_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  ids = [tok.encode_np(d) for d in docs]
  tok_s = time.perf_counter() - t0
  n_tokens = sum(len(x) for x in ids)
  examples = [
    {"inputs": np.concatenate([[tok.bos_id], x]).astype(np.int32),
     "targets": np.concatenate([x, [tok.eos_id]]).astype(np.int32)}
    for x in ids
  ]  # fmt: skip
  out = {
    "embedded_read_s": round(read_s, 3),
    "embedded_bytes_tokenize_s": round(bytes_s, 3),
    "corpus_chars": sum(len(d) for d in docs),
    "corpus_byte_tokens": n_bytes,
    "corpus_tokens": n_tokens,
  }
  out["tokenize_tokens_per_s"] = round(n_tokens / tok_s)
  for mode in ("concat", "first_fit", "pad"):
    rows = packing.pack(
      grain.MapDataset.source(examples).to_iter_dataset(grain.ReadOptions(num_threads=0)),
      packing=mode, seq_len=seq_len, pad_id=tok.pad_id, seed=0, num_bins=64,
    )  # fmt: skip
    t0, n = time.perf_counter(), 0
    for _ in rows:
      n += 1
    dt = time.perf_counter() - t0
    out[f"pack_{mode}_row_tokens_per_s"] = round(n * seq_len / dt)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tokenizer", default="", help="SentencePiece .model; '' = train one")
  p.add_argument("--seconds", type=float, default=15.0)
  p.add_argument("--seq_len", type=int, default=256)
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--output", default=RESULTS)
  args = p.parse_args()

  sp_path, train_s = args.tokenizer, None
  if not sp_path:
    sp_path = os.path.join(tempfile.mkdtemp(prefix="moc_sp_"), "stdlib_sp.model")
    t0 = time.perf_counter()
    cmd = ["--input=embedded", "--kind=sentencepiece", "--vocab_size=32000", f"--output={sp_path}"]
    if train_tokenizer.main(cmd) != 0:
      sys.exit("tokenizer training failed")
    train_s = round(time.perf_counter() - t0, 1)
  sp = data.make_tokenizer(sp_path)
  print(f"tokenizer: {sp}", flush=True)

  runs = []
  for tok_name, packing, workers in [
    ("sentencepiece", "concat", 0),
    ("sentencepiece", "concat", 2),
    ("sentencepiece", "pad", 0),
    ("sentencepiece", "first_fit", 0),
    ("bytes", "concat", 0),
  ]:
    cfg = data.default_config()
    cfg.tokenizer = sp_path if tok_name == "sentencepiece" else "bytes"
    cfg.packing, cfg.num_workers = packing, workers
    tok = sp if tok_name == "sentencepiece" else data.make_tokenizer("bytes")
    r = time_pipeline(cfg, tok, args.seq_len, args.batch_size, args.seconds)
    print(json.dumps(r), flush=True)
    runs.append(r)
  stages = time_stages(sp, args.seq_len)
  print(json.dumps(stages), flush=True)

  import grain

  result = {
    "benchmark": "data_pipeline",
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "git_commit": _git_commit(),
    "machine": _machine(),
    "grain_version": getattr(grain, "__version__", None) or _pkg_version("grain"),
    "source": "embedded (stdlib .py, train split)",
    "tokenizer": {
      "path": os.path.basename(sp_path),
      "vocab_size": sp.vocab_size,
      "train_s": train_s,
    },
    "target_tokens_per_s": 60000,
    "runs": runs,
    "stages_single_process": stages,
  }
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  with open(args.output, "w") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  print(f"wrote {args.output}")


def _pkg_version(name: str) -> str:
  from importlib import metadata

  return metadata.version(name)


if __name__ == "__main__":
  main()
