"""Paper-style tables of a grid: one row per variant, AP metrics as mean ± std over seeds.

``summarize`` turns the runs frame (``analysis.runs.runs_frame``) into numbers; the writers
only format them: ``table.csv`` keeps every number (``AP_mean``, ``AP_std``, ...) for machines,
``table.md`` and ``table.tex`` print one decimal like the papers' tables (PAA paper Tables 1-6).
Statistics are over the *done* runs of a variant; failed and incomplete runs are counted in
their own columns and listed under the Markdown table.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd

from analysis.runs import DONE, FAILED, INCOMPLETE

MISSING_MD = "–"  # en dash: undefined value (no done run, or the std of a single seed)
MISSING_TEX = "--"


@dataclasses.dataclass(frozen=True)
class Column:
    """A value column of the tables: ``<key>_mean`` (and ``<key>_std``) in the summary frame."""

    key: str
    markdown: str
    latex: str
    decimals: int
    with_std: bool  # Markdown/LaTeX print "mean ± std"; else the mean only


VALUE_COLUMNS = (
    Column("AP", "AP", "AP", 1, True),
    Column("AP50", "AP50", "AP$_{50}$", 1, True),
    Column("AP75", "AP75", "AP$_{75}$", 1, True),
    Column("APs", "APs", "AP$_S$", 1, True),
    Column("APm", "APm", "AP$_M$", 1, True),
    Column("APl", "APl", "AP$_L$", 1, True),
    # Mean |predicted IoU - true IoU| of the IoU-prediction head; only when some run has it.
    Column("iou_pred_error", "IoU err", "IoU err.", 3, False),
    # Mean over training of stats.csv's pos_per_gt_mean (PAA paper Fig. 4b, one number).
    Column("positives_per_gt", "pos/GT", "pos/GT", 1, False),
    Column("images_per_second", "img/s", "img/s", 1, False),
)
COUNT_COLUMNS = ("seeds", FAILED, INCOMPLETE)


def summarize(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """One row per variant (in ``order``): ``variant``, ``<key>_mean`` and ``<key>_std`` per value
    column, ``seeds`` (done runs), ``failed`` and ``incomplete`` (run counts).

    Means and sample stds (ddof=1) are over the done runs that have the value; the std is NaN
    for fewer than two such runs. The iou_pred_error columns appear only when a done run has one.
    """
    done = runs[runs["status"] == DONE]
    keys = [c.key for c in VALUE_COLUMNS if c.key != "iou_pred_error" or done["iou_pred_error"].notna().any()]
    rows = []
    for variant in order:
        of_variant = runs[runs["variant"] == variant]
        done_of_variant = of_variant[of_variant["status"] == DONE]
        row: dict[str, object] = {"variant": variant}
        for key in keys:
            values = done_of_variant[key].dropna()
            row[f"{key}_mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        row["seeds"] = len(done_of_variant)
        row[FAILED] = int((of_variant["status"] == FAILED).sum())
        row[INCOMPLETE] = int((of_variant["status"] == INCOMPLETE).sum())
        rows.append(row)
    columns = ["variant", *(f"{k}_{s}" for k in keys for s in ("mean", "std")), *COUNT_COLUMNS]
    return pd.DataFrame(rows, columns=columns)


def problem_runs(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """The failed and incomplete runs (variant, seed, run, status, error), in variant order then seed."""
    problems = runs[runs["status"] != DONE]
    rank = {variant: i for i, variant in enumerate(order)}
    problems = problems.assign(_rank=problems["variant"].map(rank))
    return problems.sort_values(["_rank", "seed", "run"]).drop(columns="_rank")[
        ["variant", "seed", "run", "status", "error"]
    ]


# ----------------------------------------------------------------------------- formatting


def _shown_columns(summary: pd.DataFrame) -> list[Column]:
    return [c for c in VALUE_COLUMNS if f"{c.key}_mean" in summary.columns]


def _number(value: float, decimals: int, missing: str) -> str:
    return missing if pd.isna(value) else f"{value:.{decimals}f}"


def _cell(row: pd.Series, column: Column, plus_minus: str, missing: str) -> str:
    mean = _number(row[f"{column.key}_mean"], column.decimals, missing)
    if not column.with_std or mean == missing:
        return mean
    return f"{mean}{plus_minus}{_number(row[f'{column.key}_std'], column.decimals, missing)}"


def _one_line(text: object, limit: int = 300) -> str:
    """Collapse whitespace (tracebacks span lines) and cut to ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def to_markdown(summary: pd.DataFrame, problems: pd.DataFrame, title: str) -> str:
    """The Markdown table, a note on what the numbers are, and the list of failed/incomplete runs."""
    shown = _shown_columns(summary)
    header = ["variant", *(c.markdown for c in shown), *COUNT_COLUMNS]
    lines = [
        f"# {title}",
        "",
        "| " + " | ".join(header) + " |",
        "|:--" + "|--:" * (len(header) - 1) + "|",
    ]
    for _, row in summary.iterrows():
        cells = [str(row["variant"]).replace("|", r"\|")]
        cells += [_cell(row, c, " ± ", MISSING_MD) for c in shown]
        cells += [str(int(row[c])) for c in COUNT_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "AP columns: mean ± sample std (ddof=1) over the seeds of done runs, in percent; "
        f"{MISSING_MD} where undefined (no done run, or one seed). "
        "pos/GT: positives per GT averaged over training (stats.csv); img/s: training throughput. "
        "seeds: done runs; failed / incomplete: runs without a result.",
    ]
    if len(problems):
        lines += ["", "## Failed and incomplete runs", ""]
        for _, run in problems.iterrows():
            seed = "?" if pd.isna(run["seed"]) else int(run["seed"])
            if not pd.isna(run["error"]):
                reason = _one_line(run["error"])
            elif run["status"] == INCOMPLETE:
                reason = "no metrics.json (still running, or killed)"
            else:
                reason = "no error message"
            reason = reason.replace("`", "'")
            lines.append(f"- {run['variant']}, seed {seed} (`{run['run']}`): {run['status']}: `{reason}`")
    return "\n".join(lines) + "\n"


_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "–": "--",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters for text mode (``+`` needs none: it prints as is)."""
    return "".join(_LATEX_SPECIALS.get(char, char) for char in text)


def to_latex(summary: pd.DataFrame, title: str) -> str:
    """A booktabs ``tabular`` of the summary (needs ``\\usepackage{booktabs}``)."""
    shown = _shown_columns(summary)
    header = ["Variant", *(c.latex for c in shown), *COUNT_COLUMNS]
    lines = [
        f"% {latex_escape(title)}: mean $\\pm$ sample std over seeds of done runs",
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for _, row in summary.iterrows():
        cells = [latex_escape(str(row["variant"]))]
        cells += [_cell(row, c, r" $\pm$ ", MISSING_TEX) for c in shown]
        cells += [str(int(row[c])) for c in COUNT_COLUMNS]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(grid_dir: Path, runs: pd.DataFrame, order: list[str]) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` and ``table.tex`` into ``grid_dir``; returns name -> path."""
    grid_dir = Path(grid_dir)
    summary = summarize(runs, order)
    title = f"assignbench grid `{grid_dir.name}`"
    paths = {name: grid_dir / name for name in ("table.md", "table.csv", "table.tex")}
    paths["table.md"].write_text(to_markdown(summary, problem_runs(runs, order), title), encoding="utf-8")
    summary.to_csv(paths["table.csv"], index=False)
    paths["table.tex"].write_text(to_latex(summary, f"assignbench grid {grid_dir.name}"), encoding="utf-8")
    return paths
