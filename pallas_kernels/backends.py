"""One switch for every kernel: `xla` (the jnp reference, always there) or a Pallas backend.

Each getter returns a callable with exactly the signature of its reference in
`reference.py`, so callers never branch on the backend themselves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax

from pallas_kernels import reference

BACKENDS = ("xla", "pallas")


def resolve(backend: str) -> str:
  """'auto' means Pallas on GPU and the jnp reference elsewhere."""
  if backend == "auto":
    return "pallas" if jax.default_backend() == "gpu" else "xla"
  if backend not in BACKENDS:
    raise ValueError(f"unknown kernel backend {backend!r}; expected one of {('auto', *BACKENDS)}")
  return backend


def select(backend: str) -> Callable:
  """(g_TxF, k, variant) -> (idx_TxK, val_TxK)."""
  if resolve(backend) == "xla":
    return reference.select
  from pallas_kernels import topk

  return topk.select


def train_forward_epilogue(backend: str) -> Callable:
  """(g_TxF, u_TxF, k, variant, *, num_valid=None, idx_dtype=int32) -> (idx, g_sel, u_sel, z)."""
  if resolve(backend) == "xla":
    return reference.train_forward_epilogue
  from pallas_kernels import moc_train

  return moc_train.train_forward_epilogue


def train_backward_epilogue(backend: str) -> Callable:
  """(dz_TxF, idx_TxK, g_sel, u_sel, z_sel=None) -> (dg_TxF, du_TxF, z_TxF)."""
  if resolve(backend) == "xla":
    return reference.train_backward_epilogue
  from pallas_kernels import moc_train

  return moc_train.train_backward_epilogue


def bitmask_epilogues(backend: str) -> tuple[Callable, Callable] | None:
  """The Pallas train epilogues that keep the selection as bits (moc_train_mask.py):
  (forward (g, u, k, variant, *, num_valid, z_sel) -> (words, g_sel, u_sel, z[, z_sel]),
  backward (dz, words, g_sel, u_sel, z_sel=None) -> (dg, du, z)); None on the xla backend."""
  if resolve(backend) == "xla":
    return None
  from pallas_kernels import moc_train_mask

  return moc_train_mask.train_forward_bitmask, moc_train_mask.train_backward_bitmask


def decode_ffn(backend: str, output_major: bool = False) -> Callable:
  """(x_TxD, w_gate, w_up_FxD, w_down_FxD, k, variant, *, warm=None) -> y_TxD, the gate
  weight D x F, or F x D with output_major; on Pallas with output_major also `norm=` and
  `residual=` (applied by the kernels)."""
  if resolve(backend) == "xla":
    if output_major:
      return lambda x, wg, *a, **kw: reference.decode_ffn(x, wg.T, *a, **kw)
    return reference.decode_ffn
  from pallas_kernels import moc_decode

  return functools.partial(moc_decode.decode_ffn, output_major=output_major)


def dense_decode_ffn(backend: str, output_major: bool = False) -> Callable:
  """(x_TxD, w_gate, w_up, w_down) -> y_TxD with Wg, Wu D x F and Wd F x D, or all three
  transposed with output_major; on Pallas GEMV kernels for T <= 16, XLA's dots past that, and
  with output_major also `norm=` and `residual=` (applied inside the kernels)."""
  if resolve(backend) == "xla":
    if output_major:
      return lambda x, wg, wu, wd: reference.dense_decode_ffn(x, wg.T, wu.T, wd.T)
    return reference.dense_decode_ffn
  from pallas_kernels import moc_decode

  return functools.partial(moc_decode.dense_decode_ffn, output_major=output_major)


def decode_linear(backend: str, num_tokens: int, output_major: bool = False) -> Callable:
  """(x_TxD, w, out_dtype=None) -> y_TxN with w D x N (the split-K GEMV on Pallas for
  T <= 16) or, output_major, N x D through XLA (the model calls the rowdot kernel itself, with
  the norm and residual it fuses: `decode_ops.decode_linear`)."""
  from pallas_kernels import _decode_gemv

  if output_major:
    return lambda x_TxD, w_NxD, out_dtype=None: reference.linear(x_TxD, w_NxD.T, out_dtype)
  if resolve(backend) == "xla" or num_tokens > _decode_gemv.MAX_TOKENS:
    return reference.linear
  return lambda x_TxD, w_DxN, out_dtype=None: _decode_gemv.linear(x_TxD, w_DxN, out_dtype=out_dtype)
