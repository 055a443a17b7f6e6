"""The interleaved timer: every fn sampled once per trial, in an order rotated each trial; a fn
that fails is dropped and the rest still compared; ratios paired trial by trial."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import pytest

from benchmarks import common
from pallas_kernels import _triton_utils as tu


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


def test_topk_ab_checks_exactness_and_pairs_configs(tmp_path):
  """benchmarks/topk_ab.py on a tiny shape (interpret mode on CPU): each config checked exact,
  timed in turn, its ratio to the first written; an unknown config name is refused."""
  import json

  from benchmarks import topk_ab

  out = tmp_path / "ab.json"
  names = ["cmp_gather_g1", "cmp_gather_g1_w8"]
  topk_ab.main([*names, "--t=8", "--f=304", "--k=40", "--trials=2", "--inner=1", f"--out={out}"])
  rows = json.loads(out.read_text())["rows"]
  assert [rows[n]["exact"] for n in names] == [True, True]
  assert rows[names[0]]["ratio_to_base"] == pytest.approx(1.0)
  assert len(rows[names[1]]["samples_us"]) == 2 and rows[names[1]]["median_us"] > 0
  with pytest.raises(SystemExit):
    topk_ab.main(["no_such_config"])


def test_hlo_moves_reports_copies_and_custom_calls():
  """A parsed HLO text: a copy's shape and size, and a custom call's target; a real compiled
  program's text parses too (whatever XLA chose to emit)."""
  text = (
    "%copy.1 = bf16[1024,512]{0,1} copy(bf16[1024,512]{1,0} %p)\n"
    '%cc = f32[8]{0} custom-call(f32[8]{0} %x), custom_call_target="mosaic_gpu"\n'
  )
  moves = common.hlo_moves(text)
  assert moves["copies"] == [{"shape": "bf16[1024,512]", "mb": 1.0}]
  assert moves["copy_mb"] == 1.0 and moves["custom_calls"] == ["mosaic_gpu"]
  x = jnp.ones((64, 32), jnp.float32)
  compiled = jax.jit(lambda a: a * 2.0).lower(x).compile().as_text()
  assert common.hlo_moves(compiled)["custom_calls"] == []


def test_hlo_moves_says_which_custom_calls_sit_in_command_buffers():
  """A module with one command buffer holding a Triton call while the Mosaic call runs in
  ENTRY, between graphs."""
  text = """HloModule m

%command_buffer (p: bf16[8]) -> bf16[8] {
  %p = bf16[8]{0} parameter(0)
  ROOT %t = bf16[8]{0} custom-call(bf16[8]{0} %p), custom_call_target="__gpu$xla.gpu.triton"
}

ENTRY %main (a: bf16[8]) -> bf16[8] {
  %a = bf16[8]{0} parameter(0)
  %m = bf16[8]{0} custom-call(bf16[8]{0} %a), custom_call_target="mosaic_gpu_v2"
  ROOT %c = bf16[8]{0} call(bf16[8]{0} %m), to_apply=%command_buffer
}
"""
  moves = common.hlo_moves(text)
  assert moves["command_buffers"] == 1
  assert moves["custom_calls"] == ["__gpu$xla.gpu.triton", "mosaic_gpu_v2"]
  assert moves["custom_calls_in_command_buffers"] == ["__gpu$xla.gpu.triton"]


def test_decode_chain_sums_one_call_per_weight_set():
  """`decode_timing.chain(fn)` sums one call per (input, weight set)."""
  from benchmarks import decode_timing

  xs = [jnp.ones((1, 4)), 2 * jnp.ones((1, 4))]
  sets = [(jnp.eye(4),), (3 * jnp.eye(4),)]
  run = decode_timing.chain(lambda x, w: x @ w)
  assert jnp.allclose(run(xs, sets), 7 * jnp.ones((1, 4)))


def test_decode_attention_bench_runs_both_paths(tmp_path, monkeypatch):
  """--quick (interpret mode): every row timed, none failed, the kernel's o close to XLA's."""
  import json
  import sys

  from benchmarks import decode_attention_bench

  out = tmp_path / "attn.json"
  monkeypatch.setattr(sys, "argv", ["x", "--quick", "--trials=1", "--reps=1", f"--out={out}"])
  decode_attention_bench.main()
  rows = json.loads(out.read_text())["rows"]
  names = {"xla", "kernel", "kernel_c128"}  # 64 and 256 slots; the 128-slot chunk below 256
  assert {r["method"] for r in rows} == names and len(rows) == 2 * 2 + 2 * 3
  assert all("error" not in r and r["time_s"] > 0 and r["rel_err_vs_xla"] < 2e-2 for r in rows)


def test_decode_e2e_interleaved_rounds_give_paired_ratios(tmp_path, monkeypatch):
  """decode_e2e --quick --interleave: every variant compiled first, then one call each per
  round; per-row ratios to the reference and best MoC over best dense, paired round by round."""
  import json
  import sys

  from benchmarks import common, decode_e2e

  out = tmp_path / "e2e.json"
  argv = ["x", "--quick", "--only=dense_kernel,moc_kernel", "--interleave=2", f"--out={out}"]
  monkeypatch.setattr(sys, "argv", argv)
  decode_e2e.main()
  result = json.loads(out.read_text())
  rows = result["rows"]
  assert set(rows) == {"dense_kernel", "moc_kernel"} and result["interleave"] == 2
  dense, moc = (rows[n]["rounds_tokens_per_s"] for n in ("dense_kernel", "moc_kernel"))
  assert len(dense) == len(moc) == 2 and min(dense + moc) > 0
  assert rows["dense_kernel"]["over_dense_kernel_rounds"] == 1.0
  assert rows["moc_kernel"]["over_dense_kernel_rounds"] == common.paired_ratio(moc, dense)
  assert result["moc_over_dense_rounds"] == common.paired_ratio(moc, dense)
  assert all(len(r["tokens"]) == result["new_tokens"] for r in rows.values())
  monkeypatch.setattr(sys, "argv", ["x", "--quick", "--only=dense_kernel,nope"])
  with pytest.raises(SystemExit):
    decode_e2e.main()


def test_decode_e2e_records_a_variant_that_fails_to_build(tmp_path, monkeypatch):
  """A variant whose model cannot be built gets an error row (the run goes on); a bad --d_ff
  is one error line before anything is built."""
  import json
  import sys

  from benchmarks import decode_e2e

  def no_memory(*args, **kwargs):
    raise RuntimeError("no device memory")

  monkeypatch.setattr(decode_e2e.model, "Transformer", no_memory)
  out = tmp_path / "e2e.json"
  monkeypatch.setattr(sys, "argv", ["x", "--quick", "--only=moc_kernel", f"--out={out}"])
  decode_e2e.main()
  row = json.loads(out.read_text())["rows"]["moc_kernel"]
  assert row["error"] == "RuntimeError: no device memory" and row["k"] == 64
  monkeypatch.setattr(sys, "argv", ["x", "--quick", "--d_ff=0", f"--out={out}"])
  with pytest.raises(SystemExit):
    decode_e2e.main()


def test_decode_e2e_attention_warm_rows(tmp_path, monkeypatch):
  """--attn_warm_mb=1:8 adds a MoC row whose attention warms L2 (1 MB on 8 programs, patched
  only while that row compiles), with the same tokens as the default row (16 MB on 264) and
  the row warming nothing (`moc_kernel_before`)."""
  import json
  import sys

  from benchmarks import decode_e2e

  real, calls = decode_e2e.decode_attention.attend_qkv, []
  monkeypatch.setattr(
    decode_e2e.decode_attention,
    "attend_qkv",
    lambda *a, **kw: calls.append((kw["warm_bytes"], kw["warm_programs"])) or real(*a, **kw),
  )
  out = tmp_path / "e2e.json"
  only = "--only=moc_kernel,moc_kernel_awarm1p8,moc_kernel_before"
  argv = ["x", "--quick", "--trials=1", "--attn_warm_mb=1:8", only, f"--out={out}"]
  monkeypatch.setattr(sys, "argv", argv)
  decode_e2e.main()
  rows = json.loads(out.read_text())["rows"]
  assert "error" not in rows["moc_kernel_awarm1p8"]
  tokens = rows["moc_kernel"]["tokens"]
  assert rows["moc_kernel_awarm1p8"]["tokens"] == tokens == rows["moc_kernel_before"]["tokens"]
  assert {p for b, p in calls if b} == {8, 264} and decode_e2e.decode_attention.WARM_PROGRAMS == 264
  assert any(not b for b, _ in calls)  # moc_kernel_before's


def test_decode_e2e_variants_patch_and_restore_the_kernel_knobs():
  """Each knob row compiles under its own settings (the one rowdot config, the loads one step
  ahead, the resident grid; MoC's XLA sum, the Mosaic select warmed from the rows kernel or
  not at all) and leaves them as they were."""
  from benchmarks import decode_e2e

  d = decode_e2e
  pick, default = d._decode_rowdot.rowdot_config, d.moc_decode.moc_config(1, 2048, 5464)
  seen = {}
  for name in ("dense_kernel_rowdot0", "moc_kernel_rdpf", "moc_kernel_xsum", "moc_kernel_before"):
    with d._patched(name):
      seen[name] = (
        d.moc_decode.moc_config(1, 2048, 5464),
        d._decode_rowdot.rowdot_config(1, 5464, 2048),
        d._decode_rowdot.rowdot_config(1, 2048, 5464, weights=2).prefetch,
      )
  assert seen["dense_kernel_rowdot0"][1] == d._decode_rowdot.RowdotConfig()
  assert seen["moc_kernel_rdpf"][1].prefetch and seen["moc_kernel_rdpf"][1].block_d == 2048
  assert not seen["moc_kernel_rdpf"][2]  # the SwiGLU's two weights keep their config
  assert default.list_sum == "kernel" and default.topk.selection == "triton"
  assert (
    seen["moc_kernel_xsum"][0] == replace(default, list_sum="xla") == seen["moc_kernel_before"][0]
  )
  with d._patched("dense_kernel_rds"):  # a resident grid: 2 programs per SM at 2048 wide
    sms = tu.sm_count()
    assert d._decode_rowdot.rowdot_config(1, 5464, 2048).programs == 2 * sms
    assert d._decode_rowdot.rowdot_config(1, 2048, 6144).programs == 4 * sms
    assert d._decode_rowdot.rowdot_config(1, 2048, 5464, weights=2).programs == 2 * sms
    assert d._decode_rowdot.rowdot_config(4, 2048, 6144).programs == 0
  for name in ("moc_kernel_mgpu", "moc_kernel_mgpu_cold", "moc_kernel_mgpusw"):
    with d._patched(name):
      mosaic = d.moc_decode.moc_config(1, 2048, 5464)
    assert mosaic.topk.selection == "mgpu"
    assert mosaic.warm_from == ("select" if name.endswith("sw") else "rows")
    assert bool(mosaic.warm_bytes) == (name != "moc_kernel_mgpu_cold")
  assert d.moc_decode.moc_config(1, 2048, 5464) == default
  assert d._decode_rowdot.rowdot_config is pick


def test_a_swapped_rowdot_config_reaches_the_moc_gate_after_a_default_call(monkeypatch):
  """`decode_timing.rowdot_streaming` swaps `rowdot_config`; MoC's decode picks its gate
  GEMV's tile before its jit, so a call after the swap (same shapes, same DecodeConfig) is
  traced again with the swapped tile: read inside, jit's cache kept the first trace's (the
  `*_rds`, `*_rdpf` and `*_rowdot0` rows would have timed the default gate GEMV)."""
  from benchmarks import decode_timing
  from pallas_kernels import _decode_rowdot, moc_decode

  seen = []
  rowdot = _decode_rowdot._rowdot
  monkeypatch.setattr(
    _decode_rowdot,
    "_rowdot",
    lambda x, ws, cfg, *a: seen.append(cfg.programs) or rowdot(x, ws, cfg, *a),
  )
  x, w = jnp.ones((1, 72), jnp.bfloat16), jnp.ones((211, 72), jnp.bfloat16)  # no other test's
  run = lambda: moc_decode.decode_ffn(x, w, w, w, 24, "moc", interpret=True, output_major=True)
  run()
  assert seen == [0]
  with decode_timing.rowdot_streaming():
    run()
  sms = tu.sm_count()
  assert seen == [0, 4 * sms]
