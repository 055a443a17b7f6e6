"""Convergence study report: validation perplexity, gap vs dense, throughput, memory, channel use.

  python benchmarks/convergence_report.py RUNS_DIR [--name=60m] [--reference=dense]

RUNS_DIR holds one subdirectory per run (a train.py workdir or an extracted bundle), named
after the variant. Each may hold (all optional but metrics.jsonl; missing keys become '-'):

  metrics.jsonl        train.py's records; `kind: eval` rows give validation perplexity
  config.json          train.py's config; model.ffn/k/gcp and train.batch_size/seq_len
  run_summary.json     the driver's record: tokens_per_sec, peak_bytes or peak_memory_gb,
                       steps, tokens, wall_s (each falls back to metrics.jsonl when missing)
  channel_usage.json   `python -m moc_jax.channel_usage` output

Writes benchmarks/results/convergence_<name>.{json,md}, convergence_<name>_ppl.png (perplexity
vs tokens trained, all runs, with a panel zoomed on the last half) and
convergence_<name>_usage.png (sorted per-channel share, one curve per layer, per MoC run).
The reference (default: the run named 'dense', else the first with model.ffn == 'dense') is
what the gap is taken against: gap % = 100 * (ppl / ppl_reference - 1).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from moc_jax import metrics  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      out = json.load(f)
    return out if isinstance(out, dict) else {}
  except (OSError, ValueError):
    return {}


def _get(d: dict, dotted: str) -> Any:
  for key in dotted.split("."):
    if not isinstance(d, dict) or key not in d:
      return None
    d = d[key]
  return d


def load_run(run_dir: str) -> dict[str, Any]:
  """Everything the report needs from one run directory, None where a file or key is missing."""
  config = _read_json(os.path.join(run_dir, "config.json"))
  summary = _read_json(os.path.join(run_dir, "run_summary.json"))
  usage = _read_json(os.path.join(run_dir, "channel_usage.json"))
  records = metrics.read_metrics(run_dir)
  # After a resume some steps are logged twice: the later record of a step wins.
  evals = {r["step"]: r for r in records if r.get("kind") == "eval" and "step" in r}
  trains = {r["step"]: r for r in records if r.get("kind") == "train" and "step" in r}
  batch, seq = _get(config, "train.batch_size"), _get(config, "train.seq_len")
  tokens_per_step = batch * seq if batch and seq else None
  curve = [
    [step * tokens_per_step if tokens_per_step else step, evals[step]["perplexity"]]
    for step in sorted(evals)
    if _finite(evals[step].get("perplexity"))
  ]
  last_step = max([*evals, *trains], default=None)
  rates = [r["tokens_per_sec"] for _, r in sorted(trains.items())[1:] if "tokens_per_sec" in r]
  peaks = [r["peak_memory_gb"] for r in trains.values() if _finite(r.get("peak_memory_gb"))]
  peak_bytes = summary.get("peak_bytes")
  layers = usage.get("layers") or []
  return {
    "name": os.path.basename(os.path.normpath(run_dir)),
    "ffn": _get(config, "model.ffn") or usage.get("ffn"),
    "k": _get(config, "model.k"),
    "gcp": _get(config, "model.gcp"),
    "x_is_tokens": tokens_per_step is not None,
    "curve": curve,
    "final_ppl": curve[-1][1] if curve else None,
    "final_step": max(evals) if evals else None,
    "tokens_per_sec": summary.get("tokens_per_sec")
    or (statistics.median(rates) if rates else None),
    "peak_gb": peak_bytes / 1e9
    if _finite(peak_bytes)
    else summary.get("peak_memory_gb") or (max(peaks) if peaks else None),
    "tokens": summary.get("tokens")
    or (last_step * tokens_per_step if last_step and tokens_per_step else None),
    "steps": summary.get("steps") or last_step,
    "wall_s": summary.get("wall_s"),
    "never_selected": sum(la.get("never_selected", 0) for la in layers) if layers else None,
    "channels": sum(la.get("d_ff", 0) for la in layers) if layers else None,
    "usage_layers": layers,
  }


def _finite(x: Any) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def pick_reference(runs: list[dict], name: str | None) -> dict | None:
  """The run named `name`, else the one named 'dense', else the first dense-FFN run."""
  by_name = {r["name"]: r for r in runs}
  if name:
    if name not in by_name:
      raise SystemExit(f"error: --reference={name!r} is not a run; runs: {', '.join(by_name)}")
    return by_name[name]
  return by_name.get("dense") or next((r for r in runs if r["ffn"] == "dense"), None)


def table(runs: list[dict], reference: dict | None) -> list[dict]:
  """One row per run; gap_pct = 100 * (ppl / reference ppl - 1), None without both."""
  ref_ppl = reference["final_ppl"] if reference else None
  rows = []
  for r in runs:
    gap = None
    if _finite(r["final_ppl"]) and _finite(ref_ppl) and ref_ppl > 0:
      gap = 100.0 * (r["final_ppl"] / ref_ppl - 1.0)
    rows.append(
      {
        "run": r["name"],
        "ffn": r["ffn"],
        "k": r["k"],
        "gcp": r["gcp"],
        "final_val_ppl": r["final_ppl"],
        "final_step": r["final_step"],
        "gap_vs_ref_pct": gap,
        "tokens_per_sec": r["tokens_per_sec"],
        "peak_memory_gb": r["peak_gb"],
        "tokens_trained": r["tokens"],
        "wall_s": r["wall_s"],
        "never_selected": r["never_selected"],
        "channels": r["channels"],
        "reference": reference is not None and r["name"] == reference["name"],
      }
    )
  return rows


def _cell(x: Any, fmt: str) -> str:
  """format(x, fmt) with an optional literal suffix after the spec ('+.2f%'); '-' for None."""
  spec, suffix = (fmt[:-1], "%") if fmt.endswith("%") else (fmt, "")
  return "-" if x is None else format(x, spec) + suffix


def markdown(rows: list[dict], reference: dict | None) -> str:
  ref = reference["name"] if reference else "none"
  lines = [
    f"Reference: `{ref}` (gap = ppl / reference ppl - 1).",
    "",
    "| run | FFN | final val ppl | gap vs ref | tokens/s | peak mem (GB) | tokens trained "
    "| channels never selected |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    ffn = r["ffn"] or "?"
    if r["ffn"] == "moc" and r["k"]:
      ffn += f" K={r['k']}"
    if r["gcp"]:
      ffn += " +GCP"
    dead = "-" if r["never_selected"] is None else f"{r['never_selected']} / {r['channels']}"
    gap = "ref" if r["reference"] else _cell(r["gap_vs_ref_pct"], "+.2f%")
    tokens = "-" if r["tokens_trained"] is None else f"{r['tokens_trained'] / 1e6:,.1f}M"
    lines.append(
      f"| {r['run']} | {ffn} | {_cell(r['final_val_ppl'], '.3f')} | {gap} | "
      f"{_cell(r['tokens_per_sec'], ',.0f')} | {_cell(r['peak_memory_gb'], '.2f')} | "
      f"{tokens} | {dead} |"
    )
  return "\n".join(lines) + "\n"


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def plot_perplexity(runs: list[dict], path: str, title: str) -> str | None:
  """Validation perplexity vs tokens, log-y: all of training, and the last 50% zoomed."""
  curves = [r for r in runs if r["curve"]]
  if not curves:
    return None
  plt = _pyplot()
  fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=110)
  x_max = max(r["curve"][-1][0] for r in curves)
  zoom_y = []
  for r in curves:
    xs, ys = zip(*r["curve"], strict=True)
    label = f"{r['name']} ({r['final_ppl']:.2f})"
    line = full.plot(xs, ys, "-o", markersize=2.5, label=label)[0]
    tail = [(x, y) for x, y in r["curve"] if x >= x_max / 2]
    if tail:
      zoom.plot(*zip(*tail, strict=True), "-o", markersize=3, color=line.get_color())
      zoom_y += [y for _, y in tail]
  x_label = "tokens trained" if all(r["x_is_tokens"] for r in curves) else "tokens (or step)"
  from matplotlib.ticker import FuncFormatter

  plain = FuncFormatter(lambda y, _: f"{y:g}")  # 28.5, not 2.85 x 10^1
  for ax, sub in ((full, "all"), (zoom, "last 50%")):
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel(x_label)
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"{title}: {sub}")
    ax.grid(alpha=0.3, which="both")
  if zoom_y:
    lo, hi = min(zoom_y), max(zoom_y)
    zoom.set_ylim(lo / 1.01, hi * 1.01)
  zoom.set_xlim(x_max / 2, x_max * 1.01)
  full.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def plot_usage(runs: list[dict], path: str, title: str) -> str | None:
  """Per MoC run, each layer's channel shares sorted high to low; dashed: uniform K/F."""
  moc_runs = [r for r in runs if r["usage_layers"]]
  if not moc_runs:
    return None
  plt = _pyplot()
  cols = min(3, len(moc_runs))
  rows = -(-len(moc_runs) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), dpi=110, squeeze=False)
  for ax, r in zip(axes.flat, moc_runs, strict=False):
    layers = r["usage_layers"]
    cmap = plt.get_cmap("viridis")
    for i, la in enumerate(layers):
      share = sorted(la.get("share") or [], reverse=True)
      color = cmap(i / max(len(layers) - 1, 1))
      ax.plot(share, color=color, lw=1, label=f"L{la.get('layer', i)}")
    first = layers[0]
    if first.get("k") and first.get("d_ff"):
      ax.axhline(first["k"] / first["d_ff"], ls="--", color="gray", lw=1, label="uniform K/F")
    dead = f", never selected {r['never_selected']}/{r['channels']}"
    ax.set_title(f"{r['name']}{dead}", fontsize=9)
    ax.set_xlabel("channel rank")
    ax.set_ylabel("share of tokens selecting it")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
  for ax in list(axes.flat)[len(moc_runs) :]:
    ax.axis("off")
  fig.suptitle(f"{title}: MoC channel usage on validation tokens")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def find_runs(runs_dir: str) -> list[str]:
  """Subdirectories that look like runs (hold metrics.jsonl), in name order."""
  if not os.path.isdir(runs_dir):
    raise SystemExit(f"error: {runs_dir!r} is not a directory")
  dirs = sorted(
    os.path.join(runs_dir, d)
    for d in os.listdir(runs_dir)
    if os.path.isfile(os.path.join(runs_dir, d, "metrics.jsonl"))
  )
  if not dirs:
    raise SystemExit(f"error: no run directories (with metrics.jsonl) under {runs_dir!r}")
  return dirs


def report(
  runs_dir: str, name: str, out_dir: str = RESULTS, reference: str | None = None
) -> dict[str, Any]:
  """Read every run, write the JSON, markdown and PNGs; returns the JSON payload."""
  runs = [load_run(d) for d in find_runs(runs_dir)]
  ref = pick_reference(runs, reference)
  rows = table(runs, ref)
  os.makedirs(out_dir, exist_ok=True)
  base = os.path.join(out_dir, f"convergence_{name}")
  title = f"convergence {name}"
  files = {
    "ppl_png": plot_perplexity(runs, base + "_ppl.png", title),
    "usage_png": plot_usage(runs, base + "_usage.png", title),
    "markdown": base + ".md",
    "json": base + ".json",
  }
  with open(files["markdown"], "w") as f:
    f.write(f"# Convergence study: {name}\n\n" + markdown(rows, ref))
  curves = {r["name"]: r["curve"] for r in runs}
  payload = {
    "runs_dir": os.path.abspath(runs_dir),
    "reference": ref["name"] if ref else None,
    "rows": rows,
    "curves": curves,
    "files": files,
  }
  with open(files["json"], "w") as f:
    json.dump(payload, f, indent=1)
  return payload


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("runs_dir", help="directory with one subdirectory per run")
  p.add_argument("--name", default="60m", help="suffix of the output files")
  p.add_argument("--reference", default=None, help="run the gap is taken against")
  p.add_argument("--out_dir", default=RESULTS)
  args = p.parse_args(argv)
  payload = report(args.runs_dir, args.name, args.out_dir, args.reference)
  with open(payload["files"]["markdown"]) as f:
    print(f.read())
  print("wrote " + ", ".join(v for v in payload["files"].values() if v))
  return 0


if __name__ == "__main__":
  sys.exit(main())
