"""The 1b train-step variants `model_step.py` and `step_profile.py` compare: each a set of
model-config overrides, plus the module switches and forward config some of them need.

Kept apart from the timing so that what a variant *is* reads in one place.
"""

from __future__ import annotations

import json
import os

VARIANTS = {
  "dense": dict(ffn="dense"),
  "dense_remat_ffn": dict(ffn="dense", remat="ffn"),
  "dense_remat_full": dict(ffn="dense", remat="full"),
  "moc": dict(ffn="moc"),
  "moc_gcp": dict(ffn="moc", gcp=True),
  "moc_remat_ffn": dict(ffn="moc", remat="ffn"),
  "moc_remat_full": dict(ffn="moc", remat="full"),
}
DEFAULT_VARIANTS = "dense,dense_remat_ffn,moc,moc_gcp"
# Variants with another forward-epilogue config: the env MOC_SPLIT_CONFIG names one of
# `topk_variants.EPILOGUE`, or is the path of a topk_gpu_session.json whose fastest exact
# epilogue config (`fwd_epilogue_best`) to take.
FORWARD = {
  "moc_split": dict(ffn="moc"),
  "moc_gcp_split": dict(ffn="moc", gcp=True),
}
VARIANTS.update(FORWARD)
# The Pallas epilogues with the selection kept as indices instead of a bitmask (moc.py).
INDICES = {"moc_idx": dict(ffn="moc"), "moc_gcp_idx": dict(ffn="moc", gcp=True)}
VARIANTS.update(INDICES)
# The gate and up projections as two GEMMs (moc.FUSE_GATE_UP off; the default is one).
UNFUSED = {
  "dense_unfused": dict(ffn="dense"),
  "moc_unfused": dict(ffn="moc"),
  "moc_gcp_unfused": dict(ffn="moc", gcp=True),
}
VARIANTS.update(UNFUSED)
# The backward casting the FFN weights again (`moc_ffn(keep_weights=False)`; MoC's default holds
# the forward's cast weights, MoC+GCP's casts again) and the opposite choice for GCP.
RECAST = {
  "moc_recast": dict(ffn="moc", ffn_keep_weights=False),
  "moc_gcp_keep": dict(ffn="moc", gcp=True, ffn_keep_weights=True),
}
VARIANTS.update(RECAST)
# The forward's selection by the Triton kernel (the default's 'auto' takes the Mosaic GPU radix
# select on Hopper; `TopKConfig.selection`).
TRITON = {"moc_triton": dict(ffn="moc"), "moc_gcp_triton": dict(ffn="moc", gcp=True)}
VARIANTS.update(TRITON)
_SHIPPED_FORWARD = []  # moc_train.FORWARD_DEFAULT as imported, once `configure` has run


def configure(variant: str) -> dict:
  """Set the module switches `variant` needs and return its model-config overrides. Every
  switch is set for every variant: one process may build several (`--interleave`)."""
  from moc_jax import moc
  from pallas_kernels import moc_train

  if not _SHIPPED_FORWARD:
    _SHIPPED_FORWARD.append(moc_train.FORWARD_DEFAULT)
  moc_train.FORWARD_DEFAULT = _SHIPPED_FORWARD[0]  # a `_split` variant built before sets it
  if variant in FORWARD:
    from benchmarks import topk_variants

    name = os.environ.get("MOC_SPLIT_CONFIG", "split_c512_w32")
    if name.endswith(".json"):
      with open(name) as f:
        name = json.load(f).get("fwd_epilogue_best") or "split_c512_w32"
    print(f"forward epilogue config: {name}", flush=True)
    moc_train.FORWARD_DEFAULT = topk_variants.EPILOGUE[name]
  moc.BITMASK_RESIDUALS = variant not in INDICES
  moc.FUSE_GATE_UP = variant not in UNFUSED
  return dict(VARIANTS[variant])


class _UnderSelection:
  """A jitted step that is called and lowered under one forward selection kernel: the first
  call traces and compiles under it, later calls reuse that program."""

  def __init__(self, step, selection: str):
    self._step, self._selection = step, selection

  def __call__(self, *args, **kwargs):
    return self._under(self._step, *args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._under(self._step.lower, *args, **kwargs)

  def _under(self, fn, *args, **kwargs):
    from benchmarks import common

    with common.forward_selection(self._selection):
      return fn(*args, **kwargs)


def wrap_step(variant: str, step):
  """The step under the variant's own selection kernel (TRITON), else as it is."""
  return _UnderSelection(step, "triton") if variant in TRITON else step
