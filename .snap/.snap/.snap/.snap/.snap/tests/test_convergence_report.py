"""The convergence report on synthetic run directories: gaps, fallbacks for missing files and
keys, and that both PNGs and the tables are written."""

import json
import os

import pytest

from benchmarks import convergence_report as cr


def _run(root, name, ffn, ppls, summary=None, usage=None, k=None):
  d = root / name
  d.mkdir()
  config = {"model": {"ffn": ffn, "k": k, "gcp": False}, "train": {"batch_size": 4, "seq_len": 8}}
  (d / "config.json").write_text(json.dumps(config))
  lines = []
  for i, ppl in enumerate(ppls, start=1):
    lines.append(
      {
        "kind": "train",
        "step": 10 * i,
        "loss": 1.0,
        "tokens_per_sec": 100.0 * i,
        "peak_memory_gb": 1.5,
      }
    )
    lines.append({"kind": "eval", "step": 10 * i, "perplexity": ppl, "tokens": 999})
  text = "\n".join(json.dumps(r) for r in lines) + '\n{"kind": "ev'  # a half-written line
  (d / "metrics.jsonl").write_text(text)
  if summary is not None:
    (d / "run_summary.json").write_text(json.dumps(summary))
  if usage is not None:
    (d / "channel_usage.json").write_text(json.dumps(usage))


def _usage(never, f=8, k=2):
  share = [0.5] * (f - never) + [0.0] * never
  return {
    "ffn": "moc",
    "layers": [
      {"layer": i, "k": k, "d_ff": f, "never_selected": never, "share": share} for i in range(2)
    ],
  }


def test_report_gaps_fallbacks_and_files(tmp_path):
  runs = tmp_path / "runs"
  runs.mkdir()
  _run(
    runs,
    "dense",
    "dense",
    [50.0, 30.0, 20.0],
    summary={"tokens_per_sec": 1000.0, "peak_bytes": 3e9, "steps": 30, "tokens": 960},
  )
  # The driver's key names (peak_memory_gb); no tokens: steps x batch x seq from the metrics.
  moc_summary = {"tokens_per_sec": 800.0, "peak_memory_gb": 2.5}
  _run(runs, "moc", "moc", [52.0, 31.0, 21.0], k=2, usage=_usage(1), summary=moc_summary)
  _run(runs, "moc_2of8", "moc_2of8", [55.0, 33.0, 22.5], usage=_usage(0))  # no summary
  (runs / "not_a_run").mkdir()
  out = tmp_path / "out"
  payload = cr.report(str(runs), "t", str(out))
  rows = {r["run"]: r for r in payload["rows"]}
  assert payload["reference"] == "dense" and set(rows) == {"dense", "moc", "moc_2of8"}
  assert rows["dense"]["gap_vs_ref_pct"] == 0.0 and rows["dense"]["reference"]
  assert rows["moc"]["gap_vs_ref_pct"] == pytest.approx(5.0)
  assert rows["moc_2of8"]["gap_vs_ref_pct"] == pytest.approx(12.5)
  assert rows["dense"]["peak_memory_gb"] == 3.0 and rows["moc"]["peak_memory_gb"] == 2.5
  assert rows["moc"]["tokens_trained"] == 30 * 32 and rows["moc"]["tokens_per_sec"] == 800.0
  assert rows["moc_2of8"]["peak_memory_gb"] == 1.5  # max over train records
  assert rows["moc_2of8"]["tokens_per_sec"] == 250.0  # median of train records after the first
  assert rows["moc"]["never_selected"] == 2 and rows["moc"]["channels"] == 16
  assert rows["dense"]["never_selected"] is None
  assert payload["curves"]["moc"][-1] == [960, 21.0]
  for key in ("ppl_png", "usage_png", "markdown", "json"):
    assert os.path.getsize(payload["files"][key]) > 0, key
  md = (out / "convergence_t.md").read_text()
  assert "| moc | moc K=2 | 21.000 | +5.00% | 800 | 2.50 |" in md and "| ref |" in md
  assert json.loads((out / "convergence_t.json").read_text())["rows"] == payload["rows"]


def test_reference_by_flag_and_missing_reference(tmp_path):
  _run(tmp_path, "a", "moc", [20.0], k=2)
  _run(tmp_path, "b", "moc", [22.0], k=2)
  rows = {r["run"]: r for r in cr.report(str(tmp_path), "x", str(tmp_path), "a")["rows"]}
  assert rows["b"]["gap_vs_ref_pct"] == pytest.approx(10.0)
  no_ref = cr.report(str(tmp_path), "y", str(tmp_path))
  assert no_ref["reference"] is None and no_ref["rows"][0]["gap_vs_ref_pct"] is None
  with pytest.raises(SystemExit, match="not a run"):
    cr.report(str(tmp_path), "z", str(tmp_path), "nope")


def _trace(root, name, losses, eval_loss=2.0):
  d = root / name
  d.mkdir()
  rows = [{"kind": "train", "step": s, "loss": x, "grad_norm": 0.5} for s, x in losses]
  rows.append({"kind": "eval", "step": losses[-1][0], "loss": eval_loss})
  (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut')
  return str(d)


def test_compare_traces_is_bitwise(tmp_path):
  from benchmarks import compare_traces

  a = _trace(tmp_path, "a", [(10, 3.0), (20, 2.5)])
  same = _trace(tmp_path, "same", [(10, 3.0), (20, 2.5)])
  off = _trace(tmp_path, "off", [(10, 3.0), (20, 2.5 + 1e-7)])
  verdict = compare_traces.compare(a, same)
  assert verdict["identical"] and verdict["values_compared"] == 5 and verdict["last_step"] == 20
  verdict = compare_traces.compare(a, off)
  assert not verdict["identical"]
  assert verdict["first_differences"] == [
    {"kind": "train", "step": 20, "field": "loss", "a": 2.5, "b": 2.5 + 1e-7}
  ]
  short = _trace(tmp_path, "short", [(10, 3.0)], eval_loss=9.0)
  assert not compare_traces.compare(a, short)["identical"]  # a step only one run logged
  out = tmp_path / "v.json"
  assert compare_traces.main([a, off, f"--out={out}"]) == 1 and json.loads(out.read_text())
