"""benchmarks/gemm_report.py: GEMMs and their FLOPs from optimized HLO text (GPU-style and
XLA:CPU's own), the join with profiled per-op times, and the CLI on the tiny preset."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import gemm_report as gr  # noqa: E402
from benchmarks import hlo_gemms  # noqa: E402

# GPU-style HLO: a cuBLAS custom call (tuple result with its s8 workspace, operand shapes
# inline, contraction dims as JSON strings), a Triton GEMM fusion and its computation, a
# dot in a while body, a batched dot printed without '%' or layouts, a cuDNN custom call, a
# loop fusion holding a dot and one holding none.
HLO = """\
HloModule jit_step, is_scheduled=true, entry_computation_layout={(bf16[2048,4096]{1,0})->bf16[]}

%gemm_fusion_dot.1_computation (parameter_0: bf16[512,256],\
 parameter_1: bf16[256,1024]) -> bf16[512,1024] {
  %parameter_0 = bf16[512,256]{1,0} parameter(0)
  %parameter_1 = bf16[256,1024]{1,0} parameter(1)
  ROOT %dot.1 = bf16[512,1024]{1,0} dot(bf16[512,256]{1,0} %parameter_0,\
 bf16[256,1024]{1,0} %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0},\
 metadata={op_name="jit(step)/dot_general"}
}

%body (p: (s32[], f32[32,16], f32[16,8])) -> (s32[], f32[32,16], f32[16,8]) {
  %p = (s32[], f32[32,16]{1,0}, f32[16,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[32,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,8]{1,0} get-tuple-element(%p), index=2
  %dot.2 = f32[32,8]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[32,16]{1,0}, f32[16,8]{1,0}) tuple(%i, %x, %w)
}

%cond (q: (s32[], f32[32,16], f32[16,8])) -> pred[] {
  %q = (s32[], f32[32,16]{1,0}, f32[16,8]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

fused_dot (param_0: f32[8,64,32], param_1: f32[8,32,128]) -> f32[8,64,128] {
  param_0 = f32[8,64,32] parameter(0)
  param_1 = f32[8,32,128] parameter(1)
  dot.5 = f32[8,64,128] dot(param_0, param_1), lhs_batch_dims={0}, lhs_contracting_dims={2},\
 rhs_batch_dims={0}, rhs_contracting_dims={1}
  ROOT multiply.1 = f32[8,64,128] multiply(dot.5, dot.5)
}

%fused_add (a0: f32[16], a1: f32[16]) -> f32[16] {
  %a0 = f32[16]{0} parameter(0)
  %a1 = f32[16]{0} parameter(1)
  ROOT %add.9 = f32[16]{0} add(%a0, %a1)
}

ENTRY %main.10 (a: bf16[2048,4096], b: bf16[4096,1024], c: bf16[512,256], d: bf16[256,1024],\
 e: bf16[8,64,32], f: bf16[8,32,128]) -> bf16[] {
  %a = bf16[2048,4096]{1,0} parameter(0)
  %b = bf16[4096,1024]{1,0} parameter(1)
  %c = bf16[512,256]{1,0} parameter(2)
  %d = bf16[256,1024]{1,0} parameter(3)
  e = bf16[8,64,32] parameter(4)
  f = bf16[8,32,128] parameter(5)
  %custom-call.3 = (bf16[2048,1024]{1,0}, s8[4194304]{0}) custom-call(bf16[2048,4096]{1,0} %a,\
 bf16[4096,1024]{1,0} %b), custom_call_target="__cublas$gemm",\
 backend_config={"operation_queue_id":"0","wait_on_operation_queues":[],\
"gemm_backend_config":{"alpha_real":1,"beta":0,\
"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],\
"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"alpha_imag":0,"epilogue":"DEFAULT"},\
"force_earliest_schedule":false}
  %custom-call.4 = (bf16[4096,4096]{1,0}, s8[1048576]{0}) custom-call(%a, %a),\
 custom_call_target="__cublas$lt$matmul",\
 backend_config={"gemm_backend_config":{"dot_dimension_numbers":\
{"lhs_contracting_dimensions":["0"],"rhs_contracting_dimensions":["0"]}}}
  %gemm_fusion_dot.1 = bf16[512,1024]{1,0} fusion(%c, %d), kind=kCustom,\
 calls=%gemm_fusion_dot.1_computation,\
 backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_gemm",\
"triton_gemm_config":{"block_m":"64","block_n":"128","block_k":"64","split_k":"1",\
"num_stages":"3","num_warps":"4","num_ctas":"1"}}}
  %init = (s32[], f32[32,16]{1,0}, f32[16,8]{1,0}) tuple(%i0, %x0, %w0)
  %while.1 = (s32[], f32[32,16]{1,0}, f32[16,8]{1,0}) while(%init), condition=%cond, body=%body,\
 backend_config={"known_trip_count":{"n":"4"}}
  dot.4 = bf16[8,64,128] dot(e, f), lhs_batch_dims={0}, lhs_contracting_dims={2},\
 rhs_batch_dims={0}, rhs_contracting_dims={1}
  %loop_fusion = f32[8,64,128]{2,1,0} fusion(%e32, %f32), kind=kLoop, calls=fused_dot
  %add_fusion = f32[16]{0} fusion(%v, %v), kind=kLoop, calls=%fused_add
  %custom-call.7 = (bf16[8,4,64,32]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %v),\
 custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config":{}}
  ROOT %r = bf16[] constant(0)
}
"""


def test_gemms_of_handwritten_hlo():
  g = hlo_gemms.gemms_of_hlo(HLO)
  assert set(g) == {
    "custom-call.3",
    "custom-call.4",
    "gemm_fusion_dot.1",
    "dot.2",
    "dot.4",
    "loop_fusion",
    "custom-call.7",
  }
  cublas = g["custom-call.3"]
  assert cublas["kind"] == "cublas" and cublas["out_shape"] == [2048, 1024]
  assert cublas["k"] == 4096 and cublas["batch"] == 1 and cublas["dtype"] == "bf16"
  assert cublas["flops"] == 2 * 2048 * 1024 * 4096
  assert cublas["operand_shapes"] == [["bf16", [2048, 4096]], ["bf16", [4096, 1024]]]
  at_a = g["custom-call.4"]  # aᵀa: contraction on dim 0, operand shapes from their definitions
  assert at_a["k"] == 2048 and at_a["flops"] == 2 * 4096 * 4096 * 2048
  triton = g["gemm_fusion_dot.1"]
  assert triton["kind"] == "triton_gemm" and triton["out_shape"] == [512, 1024]
  assert triton["k"] == 256 and triton["flops"] == 2 * 512 * 1024 * 256
  loop = g["dot.2"]  # in the while body: listed once, its runs come from the trace
  assert loop["kind"] == "dot" and loop["k"] == 16 and loop["flops"] == 2 * 32 * 8 * 16
  assert loop["operand_shapes"] == [["f32", [32, 16]], ["f32", [16, 8]]]
  assert loop["runs_per_step"] == 4 and cublas["runs_per_step"] == 1
  batched = g["dot.4"]
  assert batched["out_shape"] == [8, 64, 128] and batched["batch"] == 8 and batched["k"] == 32
  assert (batched["m"], batched["n"]) == (64, 128)
  assert batched["flops"] == 2 * 8 * 64 * 128 * 32
  fused = g["loop_fusion"]
  assert fused["kind"] == "fusion_dot" and fused["flops"] == 2 * 8 * 64 * 128 * 32
  assert g["custom-call.7"]["kind"] == "cudnn" and g["custom-call.7"]["flops"] is None
  assert g["custom-call.7"]["out_shape"] == [8, 4, 64, 32]


# Older printers: backend_config as an escaped JSON string, or with unquoted keys; and a
# cuBLAS call inside a dynamic-slice fusion (a layer's weights sliced from a stacked array).
HLO_OLD = """\
HloModule old_printers

%dynamic-slice-fusion (p0: bf16[24,2048,5504], p1: bf16[512,2048], p2: s32[]) ->\
 (bf16[512,5504], s8[4194304]) {
  %p0 = bf16[24,2048,5504]{2,1,0} parameter(0)
  %p1 = bf16[512,2048]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %zero = s32[] constant(0)
  %ds = bf16[1,2048,5504]{2,1,0} dynamic-slice(%p0, %p2, %zero, %zero),\
 dynamic_slice_sizes={1,2048,5504}
  %w = bf16[2048,5504]{1,0} bitcast(%ds)
  ROOT %cublas = (bf16[512,5504]{1,0}, s8[4194304]{0}) custom-call(%p1, %w),\
 custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":\
{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
}

ENTRY %e (x: f32[3,2,4], y: f32[4,5], a: f32[7,2], b: f32[7,2]) -> f32[] {
  %x = f32[3,2,4]{2,1,0} parameter(0)
  %y = f32[4,5]{1,0} parameter(1)
  %a = f32[7,2]{1,0} parameter(2)
  %b = f32[7,2]{1,0} parameter(3)
  %escaped = f32[3,2,5]{2,1,0} custom-call(%x, %y), custom_call_target="__cublas$gemm",\
 backend_config="{\\"alpha_real\\":1,\\"dot_dimension_numbers\\":\
{\\"lhs_contracting_dimensions\\":[\\"2\\"],\\"rhs_contracting_dimensions\\":[\\"0\\"],\
\\"lhs_batch_dimensions\\":[],\\"rhs_batch_dimensions\\":[]}}"
  %unquoted = f32[2,2]{1,0} custom-call(%a, %b), custom_call_target="__cublas$gemm",\
 backend_config="{selected_algorithm:3,alpha:1,dot_dimension_numbers:\
{lhs_contracting_dimensions:[0],rhs_contracting_dimensions:[0],lhs_batch_dimensions:[],\
rhs_batch_dimensions:[]},batch_size:1}"
  %ds_fusion = (bf16[512,5504]{1,0}, s8[4194304]{0}) fusion(%w3, %h, %i), kind=kCustom,\
 calls=%dynamic-slice-fusion, backend_config={"fusion_backend_config":{"kind":"__custom_fusion",\
"custom_fusion_config":{"name":"dynamic_address_computation"}}}
  ROOT %r = f32[] constant(0)
}
"""


def test_gemms_of_older_printers_and_dynamic_slice_fusion():
  g = hlo_gemms.gemms_of_hlo(HLO_OLD)
  assert set(g) == {"escaped", "unquoted", "ds_fusion"}
  assert g["escaped"]["k"] == 4 and g["escaped"]["flops"] == 2 * 30 * 4
  assert (g["escaped"]["m"], g["escaped"]["n"]) == (6, 5)
  assert g["unquoted"]["k"] == 7 and g["unquoted"]["flops"] == 2 * 4 * 7
  ds = g["ds_fusion"]  # the fusion is the op that runs; the GEMM inside it is cuBLAS
  assert ds["kind"] == "cublas" and ds["out_shape"] == [512, 5504] and ds["k"] == 2048
  assert ds["operand_shapes"][1] == ["bf16", [2048, 5504]]
  assert ds["flops"] == 2 * 512 * 5504 * 2048


def test_gemms_of_cpu_compiled_program():
  """XLA:CPU wraps each dot in a `__ynn_fusion` (or leaves it a plain dot); FLOPs add up."""
  spec = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.float32)
  a, b, c, d = spec(64, 48), spec(48, 32), spec(4, 16, 8), spec(4, 8, 24)
  f = lambda a, b, c, d: (a @ b, jnp.einsum("bmk,bkn->bmn", c, d))
  g = hlo_gemms.gemms_of_hlo(jax.jit(f).lower(a, b, c, d).compile().as_text())
  assert sum(e["flops"] for e in g.values()) == 2 * 64 * 32 * 48 + 2 * 4 * 16 * 24 * 8
  assert sorted(e["k"] for e in g.values()) == [8, 48]
  assert {e["kind"] for e in g.values()} <= {"dot", "fusion_dot"}


def test_gemm_table_rates_sorting_and_loop_calls():
  gemms = {
    "fast": {"kind": "cublas", "out_shape": [1000, 1000], "k": 1000, "batch": 1},
    "looped": {"kind": "triton_gemm", "out_shape": [100, 100], "k": 100, "batch": 1},
    "unseen": {"kind": "dot", "out_shape": [10, 10], "k": 10, "batch": 1},
    "attn": {"kind": "cudnn", "out_shape": [2, 8], "k": None, "batch": None, "flops": None},
  }
  for e in gemms.values():
    e.setdefault("flops", e["k"] and 2 * e["out_shape"][0] * e["out_shape"][1] * e["k"])
    e.setdefault("dtype", "bf16")
  # 2 steps; "looped" runs 4 times a step (a while loop over layers)
  times = {"fast": 4000.0, "looped": 6000.0, "attn": 1000.0, "copy.1": 50.0}
  calls = {"fast": 2, "looped": 8, "attn": 2, "copy.1": 2}
  rows = gr.gemm_table(gemms, times, calls, steps=2)
  assert [r["name"] for r in rows] == ["looped", "fast", "attn", "unseen"]
  looped, fast, attn, unseen = rows
  assert looped["calls_per_step"] == 4 and looped["ms_per_step"] == 3.0
  assert looped["tflops_per_call_total"] == pytest.approx(4 * 2e6 / 1e12)
  assert looped["tflops_per_s"] == pytest.approx(8e6 / 3e-3 / 1e12)
  assert fast["tflops_per_s"] == pytest.approx(2e9 / 2e-3 / 1e12)  # 1 TFLOP/s
  assert unseen["ms_per_step"] == 0 and unseen["tflops_per_s"] is None
  assert attn["tflops_per_s"] is None
  s = gr.summary(rows, peak_tflops=2.0)
  assert s["ms_per_step"] == 5.0 and s["timed"] == 2 and s["ms_without_flops"] == 0.5
  assert s["tflop_per_step"] == pytest.approx((2e9 + 8e6) / 1e12)
  assert s["tflops_per_s"] == pytest.approx(2.008e9 / 5e-3 / 1e12)
  assert s["share_of_peak"] == pytest.approx(s["tflops_per_s"] / 2.0)
  assert s["by_kind"]["cublas"]["tflops_per_s"] == pytest.approx(1.0)
  assert s["by_kind"]["dot"]["timed"] == 0 and s["by_kind"]["dot"]["tflops_per_s"] is None


def test_gemm_table_falls_back_to_kernel_names():
  """With command buffers on, a Triton GEMM is seen only as its kernel, '.' turned to '_'."""
  gemms = {"gemm_fusion_dot.3": {"kind": "triton_gemm", "out_shape": [8], "k": 1, "batch": 1}}
  gemms["gemm_fusion_dot.3"].update(flops=16e6, dtype="bf16")
  (row,) = gr.gemm_table(gemms, {"gemm_fusion_dot_3": 16.0}, {"gemm_fusion_dot_3": 1}, steps=1)
  assert row["ms_per_step"] == 0.016 and row["tflops_per_s"] == pytest.approx(1.0)


def test_op_times_counts_one_call_per_multi_kernel_op():
  ev = lambda name, op, dur: {"name": name, "dur": dur, "args": {"hlo_op": op}}
  events = [
    ev("sm90_gemm", "custom-call.1", 10),
    ev("splitKreduce", "custom-call.1", 2),
    ev("sm90_gemm", "custom-call.1", 10),
    ev("splitKreduce", "custom-call.1", 2),
    {"name": "ynn_fusion.3", "dur": 5},  # XLA:CPU: the event's name is the op
  ]
  times, calls = gr.op_times(events)
  assert times == {"custom-call.1": 24, "ynn_fusion.3": 5}
  assert calls == {"custom-call.1": 2, "ynn_fusion.3": 1}


def test_cli_tiny_profile(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # restored afterwards
  out = tmp_path / "gemms.json"
  argv = [
    "--preset=tiny",
    "--batch=2",
    "--seq=16",
    "--vocab=256",
    "--profile",
    "--warmup=1",
    "--steps=1",
  ]
  assert gr.main([*argv, f"--out={out}"]) == 0
  r = json.loads(out.read_text())
  assert r["gemms"] and r["info"]["platform"] == "cpu"
  # the HLO's GEMMs are the model's FLOPs: 6 × matmul params + attention, per token
  assert r["hlo_gemm_tflop_per_step"] == pytest.approx(r["model_tflop_per_step"], rel=0.02)
  timed = [row for row in r["table"] if row["ms_per_step"] > 0]
  assert timed and all(row["tflops_per_s"] > 0 for row in timed if row["flops"])
  assert r["summary"]["tflops_per_s"] > 0 and r["summary"]["share_of_peak"] is None
  assert "TFLOP/s" in capsys.readouterr().out
