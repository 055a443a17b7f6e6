"""The interleaved timer: every fn sampled once per trial, in an order rotated each trial; a fn
that fails is dropped and the rest still compared; ratios paired trial by trial."""

import jax.numpy as jnp
import pytest

from benchmarks import common


def test_interleaved_order_rotates_and_failures_are_dropped():
  calls = []

  def fn(name):
    def call(x):
      calls.append(name)
      return x + 1

    return call

  def broken(x):
    raise RuntimeError("no kernel for you")

  fns = {"a": fn("a"), "bad": broken, "b": fn("b"), "c": fn("c")}
  samples = common.time_interleaved(fns, [(jnp.ones(3),)], inner=1, trials=3, warmup=1)
  assert set(samples) == {"a", "b", "c"} and all(len(v) == 3 for v in samples.values())
  assert all(t > 0 for v in samples.values() for t in v)
  timed = calls[3:]  # after one warm-up call each
  assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


def test_paired_ratio_is_the_median_of_per_trial_ratios():
  assert common.paired_ratio([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == pytest.approx(3.0)
  assert common.paired_ratio(None, [1.0]) is None and common.paired_ratio([1.0], []) is None
