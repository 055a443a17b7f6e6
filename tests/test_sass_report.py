"""benchmarks/sass_report.py's first half (the project's own environment, no GPU, no triton):
the CUDA lowering's Triton modules come out as generic-form text that Triton 3.6 can parse."""

import argparse

from benchmarks import sass_report


def test_extracts_every_triton_call_as_text(tmp_path):
  args = argparse.Namespace(kernel="topk", t=64, f=1376, k=256, num_valid=0, set=[])
  calls = sass_report.extract(args, str(tmp_path))
  assert [c["name"] for c in calls] == ["moc_mask_moc", "moc_compact_gather"]
  assert [c["num_warps"] for c in calls] == [4, 4]
  text = (tmp_path / "1_moc_compact_gather.ttir").read_text()
  assert text.startswith('"builtin.module"()') and '"tt.func"()' in text
  assert '"gpu.barrier"()' in text and "barrier_scope" not in text  # the scope shim


def test_config_fields_parse_as_literals():
  from pallas_kernels import topk

  cfg = sass_report._config(topk.GAUSS, ["apply_warps=8", "apply_mode=gather", "compact=True"])
  assert (cfg.apply_warps, cfg.apply_mode, cfg.compact) == (8, "gather", True)


def test_extracts_the_decode_step_kernels(tmp_path):
  """rowdot, the warming attention and the MoC FFN as the model calls them (its select's launch
  warming the next weight, the Pallas sum of the rows' partials with list_sum='kernel') each
  come out as the Triton calls expected."""
  names = {}
  for kernel, sets in [
    ("rowdot", ["block_d=2048"]),
    ("attend_qkv", ["warm_mb=16"]),
    ("decode_step_ffn", ["list_sum='kernel'"]),
  ]:
    args = argparse.Namespace(
      kernel=kernel, t=1, f=256 if kernel == "attend_qkv" else 1376, k=250, num_valid=0, set=sets
    )
    out = tmp_path / kernel
    out.mkdir()
    names[kernel] = [c["name"] for c in sass_report.extract(args, str(out))]
  assert names["rowdot"] == ["decode_rowdot"]
  assert names["attend_qkv"] == ["decode_attention_warm"]
  assert set(names["decode_step_ffn"]) == {
    "decode_rowdot",
    "moc_select_warm",
    "decode_rows",
    "decode_rows_sum",
  }
