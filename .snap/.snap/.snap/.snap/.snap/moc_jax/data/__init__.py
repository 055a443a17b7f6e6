"""Data for moc-jax: sources, tokenizers, packing and resumable Grain iterators.

The trainer needs only the names exported here; see README.md in this directory.
"""

from moc_jax.data.config import default_config
from moc_jax.data.errors import DataError
from moc_jax.data.pipeline import TrainIterator, make_eval_batches, make_train_iterator
from moc_jax.data.tokenizers import Tokenizer, make_tokenizer

__all__ = [
  "DataError",
  "Tokenizer",
  "TrainIterator",
  "default_config",
  "make_eval_batches",
  "make_tokenizer",
  "make_train_iterator",
]
