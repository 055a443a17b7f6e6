"""The step profiler's trace reading on a synthetic Perfetto trace: GPU timelines only, ops
summed per step, kinds, and the busy time as a union of overlapping intervals."""

from benchmarks import step_profile as sp


def _trace():
  meta = [
    {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
    {"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}},
  ]
  x = lambda ts, dur, name, op=None: {
    "ph": "X", "pid": 7, "tid": 1, "ts": ts, "dur": dur, "name": name,
    **({"args": {"hlo_op": op}} if op else {}),
  }  # fmt: skip
  events = [
    x(0, 1000, "sm90_xmma_gemm_bf16", "dot.3"),
    x(500, 1000, "ncclDevKernel_AllReduce", "all-reduce.1"),  # overlaps the GEMM by 500
    x(3000, 2000, "moc_select_moc", "custom-call.5"),
    x(6000, 1000, "loop_fusion", "fusion.9"),
    x(8000, 1000, "sm90_xmma_gemm_bf16", "dot.3"),
    {"ph": "X", "pid": 1, "tid": 1, "ts": 0, "dur": 99999, "name": "PjitFunction(step)"},
  ]
  return {"traceEvents": meta + events}


def test_summary_per_step_by_op_and_kind():
  s = sp.summarize(_trace(), steps=2)
  assert s["events"] == 5  # the host event is not device time
  assert s["device_ms_per_step"] == 3.0  # 6000 us over 2 steps
  assert s["busy_ms_per_step"] == 2.75  # union: 1500 + 2000 + 1000 + 1000
  top = {"op": "dot.3", "kernel": "sm90_xmma_gemm_bf16", "kind": "gemm", "ms": 1.0}
  assert s["top_ops_ms"][0] == top
  assert s["by_kind_ms"] == {"gemm": 1.0, "pallas": 1.0, "collective": 0.5, "fusion/other": 0.5}


def test_kinds():
  assert sp.kind_of("reduce-scatter.2") == "collective"
  assert sp.kind_of("cudnn$fmha_fwd") == "attention"
  assert sp.kind_of("moc_train_fwd_moc") == "pallas"
  assert sp.kind_of("copy.4") == "copy" and sp.kind_of("multiply_fusion") == "fusion/other"


def test_command_buffer_kernels_are_grouped_by_kernel_name():
  """In a CUDA graph every kernel carries the graph's op name; the kernel names tell them apart."""
  ev = lambda ts, name: {
    "ph": "X", "pid": 7, "tid": 1, "ts": ts, "dur": 100, "name": name,
    "args": {"hlo_op": "command_buffer_3"},
  }  # fmt: skip
  meta = [{"ph": "M", "pid": 7, "name": "process_name", "args": {"name": "/device:GPU:0"}}]
  trace = {
    "traceEvents": [*meta, ev(0, "nvjet_gemm"), ev(200, "decode_rows"), ev(400, "nvjet_gemm")]
  }
  ops = {o["op"]: o for o in sp.summarize(trace, steps=1)["top_ops_ms"]}
  assert set(ops) == {"nvjet_gemm", "decode_rows"}
  assert ops["nvjet_gemm"]["ms"] == 0.2 and ops["nvjet_gemm"]["kind"] == "gemm"


def test_idle_gaps_are_charged_to_the_op_that_follows():
  s = sp.summarize(_trace(), steps=2)
  assert s["idle_ms_per_step"] == 1.75  # 1500 + 1000 + 1000 us over 2 steps
  first = s["idle_before_op"][0]
  assert first == {"op": "custom-call.5", "ms": 0.75, "gaps": 0.5}  # one gap in 2 steps
  assert {o["op"] for o in s["idle_before_op"]} == {"custom-call.5", "fusion.9", "dot.3"}
  assert s["idle_before_kind_ms"] == {"pallas": 0.75, "fusion/other": 0.5, "gemm": 0.5}


def test_hlo_of_finds_fusions_and_their_bodies():
  text = """HloModule m

%fused_computation.7 (param_0: f32[4]) -> f32[8] {
  %param_0 = f32[4]{0} parameter(0)
  ROOT %concatenate.1 = f32[8]{0} concatenate(%param_0, %param_0), dimensions={0}
}

ENTRY %main (p: f32[4]) -> f32[8] {
  %p = f32[4]{0} parameter(0)
  ROOT %input_concatenate_fusion.23 = f32[8]{0} fusion(%p), kind=kInput, calls=%fused_computation.7
}
"""
  got = sp.hlo_of(text, ["input_concatenate_fusion_23", "absent_op"])
  assert list(got) == ["input_concatenate_fusion_23"]
  lines = got["input_concatenate_fusion_23"].splitlines()
  assert lines[0].startswith("ROOT %input_concatenate_fusion.23 = f32[8]")
  assert "concatenate(%param_0, %param_0)" in lines[2] and lines[-1] == "}"
