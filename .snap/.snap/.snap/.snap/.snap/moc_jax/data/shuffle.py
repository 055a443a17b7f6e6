"""Per-epoch global shuffle that stays fast on small corpora.

Grain's `MapDataset.shuffle` uses a Feistel index shuffle that takes milliseconds per index
when the dataset has fewer than ~1000 elements (cycle-walking on a tiny domain), which makes a
validation split or a small user corpus crawl. Below `MAX_EXPLICIT` elements we keep an
explicit numpy permutation per epoch instead; above it Grain's shuffle is fast and O(1) memory.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import numpy as np

MAX_EXPLICIT = 1 << 20  # 8 MiB of int64 indices per cached epoch


class _SmallShuffleMapDataset(grain.MapDataset):
  """Like ShuffleMapDataset (a new order per epoch when repeated) with a cached permutation."""

  def __init__(self, parent: grain.MapDataset, *, seed: int):
    super().__init__(parent)
    self._seed = int(seed)

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"SmallShuffleMapDataset(seed={self._seed})"

  @functools.lru_cache(maxsize=2)  # noqa: B019 - one dataset object per pipeline, two epochs
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(len(self._parent))

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, index_in_epoch = divmod(int(index), len(self._parent))
    return self._parent[int(self._permutation(epoch)[index_in_epoch])]

  def _getitems(self, indices: Sequence[int]):
    return [self[i] for i in indices]


def shuffle(ds: grain.MapDataset, seed: int) -> grain.MapDataset:
  """A global shuffle of `ds` that reshuffles each epoch when followed by `.repeat()`."""
  if len(ds) <= MAX_EXPLICIT:
    return _SmallShuffleMapDataset(ds, seed=seed)
  return ds.shuffle(seed=seed)
