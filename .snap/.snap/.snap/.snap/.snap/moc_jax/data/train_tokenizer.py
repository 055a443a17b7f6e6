"""Train a SentencePiece or byte-level BPE tokenizer on a corpus (T5's cannot be downloaded here).

  python -m moc_jax.data.train_tokenizer --input=embedded --kind=sentencepiece \
      --vocab_size=32000 --output=tokenizers/stdlib32k.model
  python -m moc_jax.data.train_tokenizer --input='data/*.jsonl' --kind=bpe \
      --vocab_size=32000 --output=tokenizers/bpe32k/tokenizer.json

The result plugs in as `--config.data.tokenizer=PATH`. Both kinds reproduce text exactly
(identity normalization, whitespace kept, unknown characters fall back to bytes), which matters
for code. `--input=embedded` uses only the embedded corpus' *training* split, so validation
perplexity is not flattered by a tokenizer fitted to it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator

from moc_jax.data import sources
from moc_jax.data.config import default_config
from moc_jax.data.errors import DataError

KINDS = ("sentencepiece", "bpe")
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3 in both kinds
_SP_MAX_PIECE_BYTES = 4000  # SentencePiece drops "sentences" longer than max_sentence_length


def load_corpus(spec: str, text_field: str = "text", max_chars: int = 0) -> list[str]:
  """Documents from 'embedded' (its train split) or comma-separated globs of text files."""
  if spec == "embedded":
    docs = [t for _, t in sources.load_documents(default_config(), "train")]
  else:
    docs = []
    for path in sources.expand_globs(spec, "--input"):
      docs.extend(t for _, t in sources.read_documents(path, text_field))
  if max_chars > 0:
    kept, total = [], 0
    for d in docs:
      if total >= max_chars:
        break
      kept.append(d[: max_chars - total])
      total += len(kept[-1])
    docs = kept
  if not any(d.strip() for d in docs):
    raise DataError(f"--input={spec!r} holds no text")
  return docs


def _line_chunks(docs: list[str]) -> Iterator[str]:
  """Documents as pieces of whole lines (newlines kept) short enough for SentencePiece."""
  for doc in docs:
    piece = ""
    for line in doc.splitlines(keepends=True):
      if piece and len(piece) + len(line) > _SP_MAX_PIECE_BYTES // 4:
        yield piece
        piece = ""
      piece += line[: _SP_MAX_PIECE_BYTES // 4]
    if piece:
      yield piece


def train_sentencepiece(docs: list[str], vocab_size: int, output: str, verbose: bool) -> None:
  """Unigram SentencePiece with byte fallback; ids: <unk>=0 <s>=1 </s>=2 <pad>=3."""
  import sentencepiece as spm

  if not output.endswith(".model"):
    raise DataError(f"--output={output!r}: a SentencePiece model file must end in .model")
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=_line_chunks(docs),
      model_prefix=output[: -len(".model")],
      vocab_size=vocab_size,
      hard_vocab_limit=False,  # a small corpus gets the largest vocabulary it supports
      model_type="unigram",
      character_coverage=0.9995,
      byte_fallback=True,
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      split_digits=True,
      max_sentence_length=_SP_MAX_PIECE_BYTES,
      input_sentence_size=2_000_000,
      shuffle_input_sentence=True,
      user_defined_symbols=["\n", "\t"],
      unk_id=0, bos_id=1, eos_id=2, pad_id=3,
      num_threads=os.cpu_count() or 1,
      minloglevel=0 if verbose else 2,
    )  # fmt: skip
  except RuntimeError as e:
    raise DataError(f"SentencePiece training failed: {e}") from e


def train_bpe(docs: list[str], vocab_size: int, output: str, verbose: bool) -> None:
  """Byte-level BPE (GPT-2 style: every string encodes, decode is exact)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  if not output.endswith(".json"):
    raise DataError(f"--output={output!r}: a tokenizers file must end in .json")
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + len(SPECIALS):
    raise DataError(
      f"--vocab_size={vocab_size} is below the {len(alphabet) + 4} a byte-level BPE needs"
    )
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=list(SPECIALS),
    initial_alphabet=alphabet,
    show_progress=verbose,
  )
  tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
  tok.save(output)


def _check_round_trip(path: str, docs: list[str]) -> tuple[int, float]:
  """Loads the result the way training will; returns (vocab_size, chars per token)."""
  from moc_jax.data.tokenizers import make_tokenizer

  tok = make_tokenizer(path)
  sample = docs[:: max(1, len(docs) // 50)][:50]
  chars = tokens = 0
  for doc in sample:
    ids = tok.encode(doc)
    if tok.decode(ids) != doc:
      raise DataError(f"{path}: the trained tokenizer does not reproduce its input text")
    chars, tokens = chars + len(doc), tokens + len(ids)
  return tok.vocab_size, chars / max(tokens, 1)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--input", required=True, help="'embedded' or comma-separated globs")
  p.add_argument("--kind", required=True, choices=KINDS)
  p.add_argument("--vocab_size", type=int, default=32000)
  p.add_argument("--output", required=True, help=".model (sentencepiece) or .json (bpe)")
  p.add_argument("--text_field", default="text", help="field of jsonl/json.gz records")
  p.add_argument("--max_chars", type=int, default=200_000_000, help="0 = no cap")
  p.add_argument("--verbose", action="store_true", help="the trainers' own logs")
  args = p.parse_args(argv)
  try:
    if args.vocab_size < 8:
      raise DataError(f"--vocab_size={args.vocab_size} is too small")
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
      raise DataError(f"--output={args.output!r}: directory {out_dir!r} is not writable")
    t0 = time.time()
    print(f"reading {args.input} ...", flush=True)
    docs = load_corpus(args.input, args.text_field, args.max_chars)
    size_mb = sum(len(d) for d in docs) / 1e6
    print(f"  {len(docs)} documents, {size_mb:.1f}M characters ({time.time() - t0:.1f}s)")
    print(f"training {args.kind} with vocab_size={args.vocab_size} ...", flush=True)
    t1 = time.time()
    train = train_sentencepiece if args.kind == "sentencepiece" else train_bpe
    train(docs, args.vocab_size, args.output, args.verbose)
    print(f"  trained in {time.time() - t1:.1f}s")
    vocab, cpt = _check_round_trip(args.output, docs)
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.output}: vocab_size={vocab} (with BOS/EOS/PAD), {cpt:.2f} characters/token")
  print(f"use it with --config.data.tokenizer={args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
