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
# The forward's selection by the Mosaic GPU radix select (`TopKConfig.selection`; not a default).
MGPU = {"moc_mgpu": dict(ffn="moc"), "moc_gcp_mgpu": dict(ffn="moc", gcp=True)}
VARIANTS.update(MGPU)


def configure(variant: str) -> dict:
  """Set the module switches `variant` needs and return its model-config overrides. Every
  switch is set for every variant: one process may build several (`--interleave`)."""
  from moc_jax import moc
  from pallas_kernels import moc_train

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


def wrap_step(variant: str, step):
  """The step, traced under the variant's selection kernel where it has its own (MGPU): the
  first call compiles under the switch, later calls reuse that program."""
  if variant not in MGPU:
    return step
  from benchmarks import common

  def traced_under_mgpu(*args, **kwargs):
    with common.forward_selection("mgpu"):
      return step(*args, **kwargs)

  return traced_under_mgpu
