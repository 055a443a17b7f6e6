"""What the Pallas-Triton kernels of a jitted function compile to on an H100/H200, without a GPU.

Why: device time is scarce, and our kernels are bound by instruction count and latency, not
bytes. Registers, barriers, instruction and memory-op counts from the real SASS rank ideas
before they are timed (they do not replace the timing: a kernel with a third of the barriers
has lost by 40%, NOTES_kernels.md 2026-12-03g).

Two halves, two Pythons:
  1. this project's environment lowers the function for CUDA (`lowering_platforms=("cuda",)`,
     no GPU needed) and writes each `__gpu$xla.gpu.triton` call's Triton module (MLIR bytecode)
     with its warps and stages;
  2. a Python with `triton` (3.6, as on the GPU machine: `python3 -m venv /tmp/tvenv &&
     /tmp/tvenv/bin/pip install triton==3.6.0`) compiles each for sm_90 with Triton's bundled
     ptxas and reads the SASS with its cuobjdump.

  python benchmarks/sass_report.py --kernel=topk --f=5632 --k=1024 [--triton_python=...]
  python benchmarks/sass_report.py --kernel=forward --f=5504 --k=1024 --num_valid=5461
  python benchmarks/sass_report.py --kernel=forward_bitmask --f=5504 --k=1024 --num_valid=5461
  python benchmarks/sass_report.py --kernel=decode_attention --t=1 --f=256   (batch, slots)
  python benchmarks/sass_report.py --kernel=decode_ffn --t=1 --f=5464 --k=1024
  python benchmarks/sass_report.py --kernel=rowdot --t=1 --f=5464 --k=2048   (T, D, N)
  python benchmarks/sass_report.py --kernel=swiglu --t=1 --f=2048 --k=5464   (T, D, F)
  python benchmarks/sass_report.py --kernel=attend_qkv --t=1 --f=256 --set warm_mb=16
  python benchmarks/sass_report.py --kernel=decode_step_ffn --t=1 --f=5464 --k=1024 \
      --set "list_sum='kernel'"

The same config fields as `TopKConfig` can be set with --set name=value (e.g.
--set apply_mode=row --set apply_warps=4); values are parsed as Python literals. For rowdot
they are `RowdotConfig`'s (default: `rowdot_config`'s pick, as for swiglu), for decode_step_ffn
`DecodeConfig`'s (default: `moc_config`'s), for attend_qkv `warm_mb` (MB of two weights, the
1b o-projection and gate, to warm L2 with) and `prefetch` (True: K, V one block ahead).
"""

from __future__ import annotations

import argparse
import ast
import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRITON_TARGET = "__gpu$xla.gpu.triton"
# SASS opcode families worth counting (the part of the mnemonic before the first '.').
COUNTED = ("BAR", "LDG", "STG", "LDS", "STS", "SHFL", "ATOMG", "BRA", "POPC", "FLO")


def _config(base, settings: list[str]):
  changes = {}
  for item in settings:
    name, _, value = item.partition("=")
    try:
      changes[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      changes[name] = value
  return dataclasses.replace(base, **changes)


def _function(args):
  """The jitted function to lower and its input shapes."""
  import jax
  import jax.numpy as jnp

  from pallas_kernels import moc_train, topk

  t, f, k = args.t, args.f, args.k
  bf16 = jax.ShapeDtypeStruct((t, f), jnp.bfloat16)
  if args.kernel == "topk":
    cfg = _config(topk.default_config(f), args.set)
    return (lambda g: topk.select(g, k, config=cfg, interpret=False)), (bf16,)
  if args.kernel == "forward_bitmask":  # the model's form: one (T, 2F) [G | U] buffer
    from pallas_kernels import moc_train_mask

    cfg = _config(moc_train.forward_config(f), args.set)
    nv = args.num_valid or f
    fn = lambda gu: moc_train_mask.train_forward_bitmask(
      gu, None, k, num_valid=nv, config=cfg, interpret=False, z_sel=True
    )
    return fn, (jax.ShapeDtypeStruct((t, 2 * f), jnp.bfloat16),)
  if args.kernel == "forward":
    cfg = _config(moc_train.forward_config(f), args.set)
    nv = args.num_valid or f
    fn = lambda g, u: moc_train.train_forward_epilogue(
      g, u, k, "moc", num_valid=nv, config=cfg, interpret=False
    )
    return fn, (bf16, bf16)
  if args.kernel == "decode_attention":  # batch --t, --f cache slots, the 1b preset's heads
    from pallas_kernels import decode_attention

    q = jax.ShapeDtypeStruct((t, 16, 128), jnp.bfloat16)
    cache = jax.ShapeDtypeStruct((t, f, 16, 128), jnp.bfloat16)
    pos = jax.ShapeDtypeStruct((t,), jnp.int32)
    fn = lambda q, kc, vc, p, kn, vn: (
      decode_attention.attend(q, kc, vc, p, interpret=False),
      decode_attention.attend(q, kc, vc, p, (kn, vn), interpret=False),
    )
    return fn, (q, cache, cache, pos, q, q)
  if args.kernel == "decode_ffn":  # --t tokens, d = 2048, --f channels, --k kept: MoC, dense
    from pallas_kernels import moc_decode

    x = jax.ShapeDtypeStruct((t, 2048), jnp.bfloat16)
    w_df, w_fd = (jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((2048, f), (f, 2048)))
    fn = lambda x, wg, wu, wut, wd: (
      moc_decode.decode_ffn(x, wg, wut, wd, k, "moc", interpret=False),
      moc_decode.dense_decode_ffn(x, wg, wu, wd, interpret=False),
    )
    return fn, (x, w_df, w_df, w_fd, w_fd)
  if args.kernel in DECODE_STEP:
    return _decode_step_function(args)
  raise SystemExit(
    f"unknown --kernel {args.kernel!r}; expected topk, forward, decode_attention, decode_ffn, "
    f"or one of {', '.join(DECODE_STEP)}"
  )


DECODE_STEP = ("rowdot", "swiglu", "attend_qkv", "decode_step_ffn")


def _decode_step_function(args):
  """The decode step's kernels as the model calls them on GPU (output-major weights, norms
  and residual adds inside), at d = 2048 and the 1b heads unless --f / --k say otherwise."""
  import jax
  import jax.numpy as jnp

  from pallas_kernels import _decode_rowdot, decode_attention, moc_decode

  t, f, k = args.t, args.f, args.k
  bf16 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  if args.kernel == "rowdot":  # T = --t, D = --f, N = --k, with a residual
    pick = _decode_rowdot.rowdot_config(t, f, k)
    cfg = _config(pick, args.set) if args.set else pick
    fn = lambda x, w, r: _decode_rowdot.rowdot(x, w, config=cfg, residual=r, interpret=False)
    return fn, (bf16(t, f), bf16(k, f), bf16(t, k))
  if args.kernel == "swiglu":  # the dense FFN's first half: T = --t, D = --f, F = --k, norm
    pick = _decode_rowdot.rowdot_config(t, f, k, weights=2)
    cfg = _config(pick, args.set) if args.set else pick
    fn = lambda x, wg, wu, scale: _decode_rowdot.swiglu(
      x, wg, wu, config=cfg, norm=(scale, 1e-5), interpret=False
    )
    return fn, (bf16(t, f), bf16(k, f), bf16(k, f), jax.ShapeDtypeStruct((f,), jnp.float32))
  if args.kernel == "attend_qkv":  # batch --t, --f cache slots; warm_mb of two 1b weights
    settings = dict(item.partition("=")[::2] for item in args.set)
    warm_bytes = int(settings.get("warm_mb", 0)) << 20
    f32 = jax.ShapeDtypeStruct((t, 64), jnp.float32)
    pos = jax.ShapeDtypeStruct((t,), jnp.int32)

    prefetch = settings.get("prefetch", "False") == "True"

    def fn(qkv, kc, vc, p, cos, sin, w_o, w_g):
      warm = dict(warm=(w_o, w_g), warm_bytes=(warm_bytes // 2,) * 2) if warm_bytes else {}
      return decode_attention.attend_qkv(
        qkv, kc, vc, p, cos, sin, interpret=False, prefetch=prefetch, **warm
      )

    cache = bf16(t, f, 16, 128)
    return fn, (bf16(t, 3, 16, 128), cache, cache, pos, f32, f32, bf16(2048, 2048), bf16(f, 2048))
  cfg = _config(moc_decode.moc_config(t, 2048, f), args.set)  # decode_step_ffn
  scale = jax.ShapeDtypeStruct((2048,), jnp.float32)

  def fn(x, wg_t, wu_t, wd, s, nxt):  # nxt: the next layer's q, k, v, warmed into L2
    kw = dict(output_major=True, norm=(s, 1e-6), residual=x, warm=nxt)
    return moc_decode.decode_ffn(x, wg_t, wu_t, wd, k, "moc", config=cfg, interpret=False, **kw)

  weights = (bf16(f, 2048), bf16(f, 2048), bf16(f, 2048))
  return fn, (bf16(t, 2048), *weights, scale, bf16(6144, 2048))


def _as_text(bytecode: bytes) -> str:
  """A Triton module's MLIR bytecode (as Pallas serialises it) as generic-form text."""
  from jax._src.interpreters import mlir
  from jax._src.lib import triton
  from jax._src.lib.mlir import ir

  with mlir.make_ir_context() as ctx:
    triton.dialect.register_dialect(ctx)
    text = ir.Module.parse(bytecode).operation.get_asm(print_generic_op_form=True)
  # jaxlib's newer MLIR gives gpu.barrier a scope Triton 3.6's does not know (workgroup is
  # what a plain barrier means there)
  return re.sub(r'("gpu\.barrier"\(\)) <\{scope = #gpu\.barrier_scope<workgroup>\}>', r"\1", text)


def extract(args, out_dir: str) -> list[dict]:
  """Lower for CUDA; write every Triton call's module as <i>_<name>.ttir."""
  import jax

  fn, shapes = _function(args)
  module = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
  calls: list[dict] = []

  def walk(op) -> None:
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          attrs = child.operation.attributes
          if child.operation.name == "stablehlo.custom_call" and (
            str(attrs["call_target_name"]).strip('"') == TRITON_TARGET
          ):
            config = {named.name: named.attr for named in attrs["mhlo.backend_config"]}
            name = str(config["name"]).strip('"')
            path = os.path.join(out_dir, f"{len(calls)}_{name}.ttir")
            with open(path, "w") as f:  # generic form: Triton 3.6's parser reads it
              f.write(_as_text(config["ir"].value_bytes))
            warps, stages = (int(str(config[n]).split(":")[0]) for n in ("num_warps", "num_stages"))
            calls.append({"name": name, "path": path, "num_warps": warps, "num_stages": stages})
          walk(child.operation)

  walk(module.operation)
  return calls


def compile_calls(calls: list[dict]) -> list[dict]:
  """(Run under the Python with triton.) Compile each module for sm_90; count its SASS."""
  import triton
  from triton.backends.compiler import GPUTarget

  target = GPUTarget("cuda", 90, 32)
  bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
  rows = []
  for call in calls:
    options = {"num_warps": call["num_warps"], "num_stages": call["num_stages"]}
    kernel = triton.compile(call["path"], target=target, options=options)
    cubin = call["path"] + ".cubin"
    with open(cubin, "wb") as f:
      f.write(kernel.asm["cubin"])
    sass = subprocess.run(
      [os.path.join(bin_dir, "cuobjdump"), "-sass", cubin], capture_output=True, text=True
    ).stdout
    usage = subprocess.run(
      [os.path.join(bin_dir, "cuobjdump"), "-res-usage", cubin], capture_output=True, text=True
    ).stdout
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    counts = collections.Counter(ops)
    regs = re.search(r"REG:(\d+)", usage)
    shared = re.search(r"SHARED:(\d+)", usage)
    row = {
      "name": call["name"],
      "warps": call["num_warps"],
      "registers": int(regs.group(1)) if regs else None,
      "shared_bytes": int(shared.group(1)) if shared else None,
      "instructions": len(ops),
    }
    row.update({family: counts.get(family, 0) for family in COUNTED})
    rows.append(row)
  return rows


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--kernel",
    default="topk",
    help="topk | forward | forward_bitmask | decode_attention | decode_ffn | rowdot | swiglu | "
    "attend_qkv | decode_step_ffn",
  )
  p.add_argument("--t", type=int, default=16384)
  p.add_argument("--f", type=int, default=5632)
  p.add_argument("--k", type=int, default=1024)
  p.add_argument("--num_valid", type=int, default=0)
  p.add_argument("--set", action="append", default=[], help="TopKConfig field=value")
  p.add_argument("--triton_python", default="/tmp/tvenv/bin/python")
  p.add_argument("--compile_json", default="", help=argparse.SUPPRESS)  # the second half
  args = p.parse_args()
  if args.compile_json:
    with open(args.compile_json) as f:
      print(json.dumps(compile_calls(json.load(f))))
    return
  if not os.path.exists(args.triton_python):
    raise SystemExit(
      f"no Python with triton at {args.triton_python}: python3 -m venv /tmp/tvenv && "
      "/tmp/tvenv/bin/pip install triton==3.6.0, or pass --triton_python"
    )
  out_dir = tempfile.mkdtemp(prefix="sass_report_")
  calls = extract(args, out_dir)
  listing = os.path.join(out_dir, "calls.json")
  with open(listing, "w") as f:
    json.dump(calls, f)
  done = subprocess.run(
    [args.triton_python, os.path.abspath(__file__), "--compile_json", listing],
    capture_output=True,
    text=True,
  )
  if done.returncode:
    raise SystemExit(f"compiling with {args.triton_python} failed:\n{done.stderr[-3000:]}")
  rows = json.loads(done.stdout.strip().splitlines()[-1])
  cols = ["name", "warps", "registers", "shared_bytes", "instructions", *COUNTED]
  print("  ".join(f"{c:>12}" for c in cols))
  for row in rows:
    print("  ".join(f"{row[c]!s:>12}" for c in cols))


if __name__ == "__main__":
  main()
