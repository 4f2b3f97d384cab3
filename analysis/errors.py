"""The error analysis of a grid: TIDE's dAP per error type and variant (``metrics.json`` "errors", written
by ``experiments.tide``), as a table (``errors.md``, ``errors.csv``) and a stacked bar plot (``errors.png``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from analysis.plots import _save, _skip
from analysis.runs import DONE, Run
from experiments.runfiles import ERROR_NAMES, MAIN_ERRORS, SPECIAL_ERRORS

log = logging.getLogger(__name__)
COLUMNS = ["ap", *MAIN_ERRORS, *SPECIAL_ERRORS]


def errors_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per done run with an error analysis: variant, seed, TIDE's AP at IoU 0.5 (``ap``) and each dAP."""
    rows = []
    for run in runs:
        errors = run.metrics.get("errors")
        if run.status == DONE and isinstance(errors, dict):
            rows.append({"variant": run.variant, "seed": run.seed, **{k: errors.get(k) for k in COLUMNS}})
    return pd.DataFrame(rows, columns=["variant", "seed", *COLUMNS])


def error_summary(frame: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Per variant (in ``order``), the mean over seeds of each column, and the number of seeds."""
    present = [v for v in order if v in set(frame["variant"])]
    grouped = frame.groupby("variant")[COLUMNS].mean().reindex(present)
    grouped.insert(0, "seeds", frame.groupby("variant")["seed"].count().reindex(present))
    return grouped.reset_index()


def to_markdown(summary: pd.DataFrame, grid: str) -> str:
    header = ["variant", "seeds", "AP50 (TIDE)", *(ERROR_NAMES[k] for k in (*MAIN_ERRORS, *SPECIAL_ERRORS))]
    lines = [f"# assignbench grid `{grid}`: where the AP goes (TIDE)", "",
             "| " + " | ".join(header) + " |", "|:--|" + "--:|" * (len(header) - 1)]
    for _, row in summary.iterrows():
        values = [f"{row[k]:.2f}" for k in COLUMNS]
        lines.append(f"| {row['variant']} | {int(row['seeds'])} | " + " | ".join(values) + " |")
    lines += ["", "dAP in AP points at IoU 0.5, mean over seeds: the AP gained by fixing only the errors of that type "
              "(Bolya et al., ECCV 2020; experiments/tide.py). An assigner shows mostly in missed and background "
              "errors, a quality score in localisation and duplicate ones. false positives / negatives: every false "
              "positive scored 0 / every missed GT removed (they overlap the six main types)."]
    return "\n".join(lines) + "\n"


def plot_errors(summary: pd.DataFrame, path: Path) -> Path | None:
    """Stacked horizontal bars: the six main dAPs of each variant."""
    if summary.empty:
        _skip(path, "no run has an error analysis")
        return None
    colors = sns.color_palette("Set2", len(MAIN_ERRORS))
    fig = Figure(figsize=(8, 0.5 * len(summary) + 1.5), layout="constrained")
    ax = fig.subplots()
    left = pd.Series(0.0, index=summary.index)
    for kind, color in zip(MAIN_ERRORS, colors):
        ax.barh(summary["variant"], summary[kind], left=left, color=color, label=ERROR_NAMES[kind])
        left = left + summary[kind].fillna(0.0)
    ax.invert_yaxis()
    ax.set_xlabel("dAP (AP50 points gained by fixing the error type)")
    ax.legend(ncols=3, fontsize="small", loc="lower center", bbox_to_anchor=(0.5, 1.0))
    return _save(fig, path)


def write_errors(grid_dir: Path, runs: list[Run], order: list[str]) -> dict[str, Path]:
    """``errors.md``, ``errors.csv`` and ``errors.png`` in ``grid_dir`` (nothing without error analyses)."""
    summary = error_summary(errors_frame(runs), order)
    written: dict[str, Path] = {}
    if summary.empty:
        _skip(grid_dir / "errors.md", "no run has an error analysis")
        return written
    (grid_dir / "errors.md").write_text(to_markdown(summary, grid_dir.name), encoding="utf-8")
    summary.to_csv(grid_dir / "errors.csv", index=False)
    written["errors.md"], written["errors.csv"] = grid_dir / "errors.md", grid_dir / "errors.csv"
    plot = plot_errors(summary, grid_dir / "errors.png")
    if plot is not None:
        written["errors.png"] = plot
    return written


__all__ = ["error_summary", "errors_frame", "plot_errors", "write_errors"]
