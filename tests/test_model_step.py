"""The interleaved step benchmark on the tiny preset: every variant timed in every round, the
order rotated, and ratios taken round by round against the reference."""

import argparse

from benchmarks import model_step


def _interleaved(**args) -> dict[str, dict]:
  """model_step.interleaved on the tiny preset, dense and MoC; rows by variant."""
  args = argparse.Namespace(
    preset="tiny", variants="dense,moc", backend="xla", seq=16, batch=2, warmup=1, steps=1,
    reference="dense", compiler_options="none", **args,
  )  # fmt: skip
  return {r["variant"]: r for r in model_step.interleaved(args)["rows"]}


def test_interleaved_rounds_and_ratios():
  rows = _interleaved(interleave=2, fit_steps="")
  assert set(rows) == {"dense", "moc"}
  for r in rows.values():
    assert len(r["step_ms_rounds"]) == 2 and all(t > 0 for t in r["step_ms_rounds"])
    assert r["step_ms"] == sum(r["step_ms_rounds"]) / 2  # the median of two rounds
  dense, moc = rows["dense"], rows["moc"]
  assert dense["vs_dense_rounds"] == [1.0, 1.0]
  expected = [d / m for d, m in zip(dense["step_ms_rounds"], moc["step_ms_rounds"], strict=True)]
  assert moc["vs_dense_rounds"] == expected
  assert abs(moc["tokens_per_s_vs_dense"] - sum(expected) / 2) < 1e-12  # median of two


def test_fit_steps_line_through_the_runs():
  rows = _interleaved(interleave=1, fit_steps="1,3")
  for r in rows.values():
    pts = r["fit_runs_ms"]
    assert sorted(n for n, _ in pts) == [1, 1, 3, 3]  # two repeats of each run length
    # The least-squares line through two run lengths passes through each length's mean.
    for n in (1, 3):
      mean = sum(t for k, t in pts if k == n) / 2
      assert abs(r["fixed_ms"] + n * r["steady_step_ms"] - mean) < 1e-6 * max(mean, 1)
    assert r["tokens_per_s_steady"] == 2 * 16 / (r["steady_step_ms"] / 1e3)
  assert rows["dense"]["steady_vs_dense"] == 1.0
  ratio = rows["dense"]["steady_step_ms"] / rows["moc"]["steady_step_ms"]
  assert rows["moc"]["steady_vs_dense"] == ratio


def test_step_variants_reset_the_forward_default_and_name_their_configs():
  """`configure` restores the shipped forward config after a `_split` variant set another (one
  process may build several variants); the forward-config variants trace under their own."""
  from benchmarks import step_variants
  from pallas_kernels import moc_train

  shipped = moc_train.FORWARD_DEFAULT
  try:
    step_variants.configure("moc_split")
    assert moc_train.FORWARD_DEFAULT is not shipped
    step_variants.configure("moc")
    assert moc_train.FORWARD_DEFAULT is shipped
  finally:
    moc_train.FORWARD_DEFAULT = shipped
  assert step_variants.wrap_step("moc_gcp_triton", len)._selection == "triton"
  assert step_variants.wrap_step("moc", len) is len
  assert step_variants.VARIANTS["moc_gcp_triton"] == {"ffn": "moc", "gcp": True}
