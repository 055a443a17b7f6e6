"""The convergence study's setup (benchmarks/convergence.py): LLaMA-60m on a code corpus.

C4 cannot be downloaded here, so the corpus is Python source (benchmarks/make_code_corpus.py)
with a 32k SentencePiece tokenizer trained on it; every variant shares seed, data order,
tokenizer and token budget. Build the corpus and tokenizer first:

  python benchmarks/make_code_corpus.py --out=.corpus --max_mb=170 /usr/lib/python3.11
  python -m moc_jax.data.train_tokenizer --input='.corpus/train-*.json.gz' \
      --kind=sentencepiece --vocab_size=32000 --max_chars=40000000 --output=.corpus/code32k.model
"""

from configs.base import base_config


def get_config():
  c = base_config("60m")
  c.train.steps = 2000
  c.train.batch_size = 256  # 65,536 tokens per step
  c.train.seq_len = 256
  c.train.lr = 2.5e-3
  c.train.grad_clip = 1.0
  c.train.log_every = 20
  c.eval.every = 100
  c.eval.batches = 8  # 524k validation tokens, the same rows for every run
  c.checkpoint.every = 500
  c.checkpoint.keep = 1
  c.data.source = "text"
  c.data.path = ".corpus/train-*.json.gz"
  c.data.val_path = ".corpus/val.json.gz"
  c.data.tokenizer = ".corpus/code32k.model"
  c.data.packing = "concat"
  c.data.num_workers = 6
  return c
