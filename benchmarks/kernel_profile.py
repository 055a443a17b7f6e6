"""Run one Pallas kernel twice (warm-up, then the call to profile), for Nsight Compute.

  python benchmarks/kernel_profile.py --kernel=select --config=row_c512_t
  bash benchmarks/kernel_profile.sh OUT_DIR row_default row_c512_t   # ncu on the GPU

`--kernel=decode`: the MoC and dense FFN decode kernels (1b shape, T = 1, default configs).
`--kernel=mgpu`: the Mosaic selects' words at (T, F), K, `--num_valid`, each twice and nothing
else launched between: `mgpu_select` with rows one ahead (the default), then without, then (F
<= 2048) `mgpu_select_warp`, else (no num_valid) the whole top-K `mgpu_select.select`; all
are named body_mosaic_gpu_kernel.
`--kernel=epilogue`: the bitmask train epilogues at the 1B layer (selection, forward streaming
pass, backward), the streaming passes walked as `--stream=MODE:WORDS:WARPS`.
The training kernels: `select` (topk.select) and `fwd` (the train forward
epilogue), on fresh random bf16 rows of (T, F), K channels, configs by their
`benchmarks/topk_variants.SWEEP` name. ncu's --launch-skip 1 --launch-count 1 then reads the
second launch: registers, occupancy, issue-stall reasons, memory throughput.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from benchmarks import topk_variants
from pallas_kernels import moc_train, topk


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--kernel", choices=("select", "fwd", "decode", "epilogue", "mgpu"), default="select"
  )
  p.add_argument("--stream", default="row:32:4", help="epilogue: MODE:WORDS:WARPS")
  p.add_argument("--config", default="row_default", help="a topk_variants.SWEEP name")
  p.add_argument("--t", type=int, default=16384)
  p.add_argument("--f", type=int, default=5632)
  p.add_argument("--k", type=int, default=1024)
  p.add_argument("--num_valid", type=int, default=None, help="mgpu: channels that may be selected")
  args = p.parse_args(argv)
  if args.kernel == "mgpu":
    return _mgpu_twice(args.t, args.f, args.k, args.num_valid)
  if args.kernel == "decode":  # MoC and dense FFN decode at the 1b shape, T = 1: all kernels
    return _decode_twice()
  if args.kernel == "epilogue":
    mode, words, warps = args.stream.split(":")
    return _epilogue_twice(mode, int(words), int(warps))
  if args.config not in topk_variants.SWEEP:
    p.error(f"unknown config {args.config!r}; see benchmarks/topk_variants.py")
  cfg = topk_variants.SWEEP[args.config]
  kg, ku = jax.random.split(jax.random.key(0))
  g = jax.random.normal(kg, (args.t, args.f), jnp.float32).astype(jnp.bfloat16)
  if args.kernel == "select":
    run = lambda: topk.select(g, args.k, config=cfg)
  else:
    u = jax.random.normal(ku, (args.t, args.f), jnp.float32).astype(jnp.bfloat16)
    run = lambda: moc_train.train_forward_epilogue(g, u, args.k, "moc", config=cfg)
  for _ in range(2):
    jax.block_until_ready(run())
  print(f"ran {args.kernel} {args.config} twice on {jax.devices()[0].device_kind}")


def _epilogue_twice(mode: str, words: int, warps: int) -> None:
  import dataclasses

  from pallas_kernels import moc_train_mask

  t, f, nv, k = 16384, 5504, 5461, 1024
  g, u, dz = (
    jax.random.normal(q, (t, f), jnp.float32).astype(jnp.bfloat16)
    for q in jax.random.split(jax.random.key(0), 3)
  )
  sc = moc_train_mask.StreamConfig(words, warps, mode)
  cfg = dataclasses.replace(
    moc_train.FORWARD_DEFAULT, apply_words=words, apply_warps=warps, apply_mode=mode
  )
  for _ in range(2):
    out = moc_train_mask.train_forward_bitmask(g, u, k, num_valid=nv, config=cfg, z_sel=True)
    jax.block_until_ready(out)
    back = moc_train_mask.train_backward_bitmask(dz, out[0], out[1], out[2], out[4], config=sc)
    jax.block_until_ready(back)
  print(f"ran the bitmask epilogues ({sc}) twice on {jax.devices()[0].device_kind}")


def _mgpu_twice(t: int, f: int, k: int, num_valid: int | None) -> None:
  from pallas_kernels import mgpu_select, mgpu_select_warp

  g = jax.block_until_ready(jax.random.normal(jax.random.key(0), (t, f), jnp.bfloat16))
  fns = [
    lambda: mgpu_select.words(g, k, num_valid=num_valid),
    lambda: mgpu_select.words(g, k, num_valid=num_valid, async_rows=False),
  ]
  if f <= mgpu_select_warp.MAX_F:
    fns.append(lambda: mgpu_select_warp.words(g, k, num_valid=num_valid))
  elif num_valid in (None, f) and k % 8 == 0:  # the whole top-K (its ballots kept by lanes)
    fns.append(lambda: mgpu_select.select(g, k))
  for fn in fns:
    for _ in range(2):
      jax.block_until_ready(fn())
  print(f"ran {len(fns)} Mosaic selects twice each on {jax.devices()[0].device_kind}")


def _decode_twice() -> None:
  from pallas_kernels import moc_decode

  d, f, k = 2048, 5464, 1024
  ks = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(ks[0], (1, d), jnp.bfloat16)
  wg, wu = ((jax.random.normal(q, (d, f)) * d**-0.5).astype(jnp.bfloat16) for q in ks[1:3])
  wd = (jax.random.normal(ks[3], (f, d)) * f**-0.5).astype(jnp.bfloat16)
  for _ in range(2):
    jax.block_until_ready(moc_decode.decode_ffn(x, wg, wu.T, wd, k, "moc"))
    jax.block_until_ready(moc_decode.dense_decode_ffn(x, wg, wu, wd))
  print(f"ran MoC and dense decode twice on {jax.devices()[0].device_kind}")


if __name__ == "__main__":
  main()
