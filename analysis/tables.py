"""Paper-style tables of a grid: one row per variant, AP metrics as mean ± std over seeds.

``summarize`` turns the runs frame (``analysis.runs.runs_frame``) into numbers; the writers
only format them: ``table.csv`` keeps every number (``AP_mean``, ``AP_std``, ...) for machines,
``table.md`` and ``table.tex`` print one decimal like the papers' tables (PAA paper Tables 1-6).
Statistics are over the *done* runs of a variant; failed and incomplete runs are counted in
their own columns and listed under the Markdown table.

Two optional columns, given the grid's ``Run`` objects (``write_tables(..., grid_runs=...)``):
``ΔAP [95% CI]`` versus the grid's baseline variant (``analysis.bootstrap``: paired bootstrap over
the val images and the seeds, from each run's ``eval_matches.npz``), bold where the CI excludes 0;
and ``converged``: no when a done run's AP rose by more than 10% of its final AP over the last
quarter of training (``metrics.json``'s ``ap_curve``), in which case the table's orderings measure
learning speed at this budget rather than the methods.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.bootstrap import CONFIDENCE, N_RESAMPLES, PairedDelta, grid_deltas
from analysis.runs import DONE, FAILED, INCOMPLETE, Run
from experiments.runfiles import MATCHES_FILE

log = logging.getLogger(__name__)

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
# Columns of ``summarize(..., baseline=...)``: ΔAP versus the baseline and its paired bootstrap CI.
DELTA_COLUMNS = (
    "is_baseline",
    "delta_AP",
    "delta_AP_ci_low",
    "delta_AP_ci_high",
    "delta_AP_excludes_zero",
    "delta_AP_seeds",
    "delta_AP_images",
    "delta_AP_resamples",
    "delta_AP_confidence",
)
CONVERGED = "converged"  # column of ``summarize(..., convergence=...)``: True, False or None (unknown)
# A run is not converged when its AP rose by more than RISE x its final AP over the last TAIL of training.
CONVERGENCE_TAIL = 0.25
CONVERGENCE_RISE = 0.10


# ----------------------------------------------------------------------------- convergence


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def run_converged(metrics: Mapping[str, Any]) -> bool | None:
    """Whether one run had converged, from its ``metrics.json``; None when the curve cannot tell.

    Not converged (False): the final AP (``AP``, else the last ``ap_curve`` point) exceeds the AP
    at the last ``ap_curve`` point at or before 75% of ``iters`` by more than 10% of the final AP.
    None: no such point, no ``iters`` or no final AP.
    """
    points = []
    for point in metrics.get("ap_curve") or []:
        if isinstance(point, list | tuple) and len(point) == 2:
            it, ap = _finite(point[0]), _finite(point[1])
            if it is not None and ap is not None:
                points.append((it, ap))
    points.sort(key=lambda point: point[0])  # stable: of equal iterations the later listed counts
    iters = _finite(metrics.get("iters"))
    final = _finite(metrics.get("AP"))
    if final is None and points:
        final = points[-1][1]
    if iters is None or iters <= 0 or final is None:
        return None
    early = [ap for it, ap in points if it <= (1.0 - CONVERGENCE_TAIL) * iters]
    if not early:
        return None
    return not (final - early[-1] > CONVERGENCE_RISE * final)


def variant_convergence(runs: Iterable[Run], order: Sequence[str]) -> dict[str, bool | None]:
    """Per variant of ``order``: False when any of its done runs is not converged, True when every
    one is (and it has one), else None (unknown)."""
    verdicts: dict[str, list[bool | None]] = {variant: [] for variant in order}
    for run in runs:
        if run.status == DONE and run.variant in verdicts:
            verdicts[run.variant].append(run_converged(run.metrics))
    out: dict[str, bool | None] = {}
    for variant, runs_verdicts in verdicts.items():
        if False in runs_verdicts:
            out[variant] = False
        elif runs_verdicts and all(v is True for v in runs_verdicts):
            out[variant] = True
        else:
            out[variant] = None
    return out


# ----------------------------------------------------------------------------- summary


def summarize(
    runs: pd.DataFrame,
    order: list[str],
    *,
    baseline: str | None = None,
    deltas: Mapping[str, PairedDelta] | None = None,
    convergence: Mapping[str, bool | None] | None = None,
) -> pd.DataFrame:
    """One row per variant (in ``order``): ``variant``, ``<key>_mean`` and ``<key>_std`` per value
    column, ``seeds`` (done runs), ``failed`` and ``incomplete`` (run counts).

    Means and sample stds (ddof=1) are over the done runs that have the value; the std is NaN
    for fewer than two such runs. The iou_pred_error columns appear only when a done run has one.
    With ``baseline``, the DELTA_COLUMNS follow: ``is_baseline``, and from ``deltas[variant]``
    (``analysis.bootstrap``) ΔAP, its CI, whether the CI excludes 0, and the seeds, images,
    resamples and confidence behind it (NaN / NA where a variant has no delta). With
    ``convergence`` (``variant_convergence``), a ``converged`` column: True, False or None.
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
    summary = pd.DataFrame(rows, columns=columns)
    if baseline is not None:
        summary = _with_deltas(summary, baseline, deltas or {})
    if convergence is not None:
        summary[CONVERGED] = pd.Series([convergence.get(v) for v in summary["variant"]], dtype=object)
    return summary


def _with_deltas(summary: pd.DataFrame, baseline: str, deltas: Mapping[str, PairedDelta]) -> pd.DataFrame:
    """``summary`` plus the DELTA_COLUMNS; the baseline's row has no delta of its own."""
    rows = []
    for variant in summary["variant"]:
        delta = deltas.get(variant) if variant != baseline else None
        rows.append(
            {
                "is_baseline": variant == baseline,
                "delta_AP": delta.delta_AP if delta else math.nan,
                "delta_AP_ci_low": delta.ci_low if delta else math.nan,
                "delta_AP_ci_high": delta.ci_high if delta else math.nan,
                "delta_AP_excludes_zero": delta.excludes_zero if delta else pd.NA,
                "delta_AP_seeds": delta.n_seeds if delta else pd.NA,
                "delta_AP_images": delta.n_images if delta else pd.NA,
                "delta_AP_resamples": delta.n_resamples if delta else pd.NA,
                "delta_AP_confidence": delta.confidence if delta else math.nan,
            }
        )
    extra = pd.DataFrame(rows, columns=list(DELTA_COLUMNS), index=summary.index)
    extra = extra.astype({"delta_AP_excludes_zero": "boolean", "delta_AP_seeds": "Int64",
                          "delta_AP_images": "Int64", "delta_AP_resamples": "Int64"})
    return pd.concat([summary, extra], axis=1)


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


def _ci_percent(summary: pd.DataFrame) -> str:
    """The deltas' confidence as "95" (the default when no row has a delta)."""
    levels = summary["delta_AP_confidence"].dropna()
    return f"{100.0 * (float(levels.iloc[0]) if len(levels) else CONFIDENCE):g}"


def _delta_cell(row: pd.Series, bold, missing: str) -> str:
    """``+1.2 [+0.4, +2.0]`` (``bold(...)`` when the CI excludes 0), "baseline", or ``missing``."""
    if bool(row["is_baseline"]):
        return "baseline"
    if pd.isna(row["delta_AP"]):
        return missing
    text = f"{row['delta_AP']:+.1f} [{row['delta_AP_ci_low']:+.1f}, {row['delta_AP_ci_high']:+.1f}]"
    excludes_zero = row["delta_AP_excludes_zero"]
    return bold(text) if not pd.isna(excludes_zero) and bool(excludes_zero) else text


def _converged_cell(value: object) -> str:
    if value is None or pd.isna(value):
        return "?"
    return "yes" if bool(value) else "no"


def _extra_columns(summary: pd.DataFrame) -> tuple[bool, bool]:
    """Whether the summary has the ΔAP columns and the converged column."""
    return "delta_AP" in summary.columns, CONVERGED in summary.columns


def _one_line(text: object, limit: int = 300) -> str:
    """Collapse whitespace (tracebacks span lines) and cut to ``limit`` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def to_markdown(summary: pd.DataFrame, problems: pd.DataFrame, title: str) -> str:
    """The Markdown table, a note on what the numbers are, and the list of failed/incomplete runs."""
    shown = _shown_columns(summary)
    with_deltas, with_convergence = _extra_columns(summary)
    header = ["variant", *(c.markdown for c in shown), *COUNT_COLUMNS]
    header += [f"ΔAP [{_ci_percent(summary)}% CI]"] if with_deltas else []
    header += [CONVERGED] if with_convergence else []
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
        cells += [_delta_cell(row, lambda text: f"**{text}**", MISSING_MD)] if with_deltas else []
        cells += [_converged_cell(row[CONVERGED])] if with_convergence else []
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "AP columns: mean ± sample std (ddof=1) over the seeds of done runs, in percent; "
        f"{MISSING_MD} where undefined (no done run, or one seed). "
        "pos/GT: positives per GT averaged over training (stats.csv); img/s: training throughput. "
        "seeds: done runs; failed / incomplete: runs without a result.",
    ]
    if with_deltas:
        baseline = summary.loc[summary["is_baseline"].astype(bool), "variant"]
        resamples = summary["delta_AP_resamples"].dropna()
        lines += [
            "",
            f"ΔAP [{_ci_percent(summary)}% CI]: AP minus the baseline's "
            f"(`{baseline.iloc[0] if len(baseline) else '?'}`), in AP points, mean over the seeds both have; "
            "the CI is a paired percentile bootstrap over the val images and those seeds "
            f"({int(resamples.max()) if len(resamples) else N_RESAMPLES} resamples, from each run's per-image "
            f"COCOeval matches, {MATCHES_FILE}). **Bold**: the CI excludes 0. "
            f"{MISSING_MD}: no per-image matches, or no seed shared with the baseline.",
        ]
    if with_convergence:
        lines += [
            "",
            f"converged: no when a done run's AP rose by more than {CONVERGENCE_RISE:.0%} of its final AP over "
            f"the last {CONVERGENCE_TAIL:.0%} of training (metrics.json ap_curve); ? when the curve cannot tell.",
        ]
        not_converged = [str(v) for v, c in zip(summary["variant"], summary[CONVERGED]) if c is False]
        if not_converged:
            names = ", ".join(f"`{v}`" for v in not_converged)
            lines += [
                "",
                f"**Not converged at this budget: {names}.** Orderings at this training budget measure "
                "learning speed, not the methods.",
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
    with_deltas, with_convergence = _extra_columns(summary)
    header = ["Variant", *(c.latex for c in shown), *COUNT_COLUMNS]
    header += [f"$\\Delta$AP [{_ci_percent(summary)}\\% CI]"] if with_deltas else []
    header += ["Conv."] if with_convergence else []
    lines = [
        f"% {latex_escape(title)}: mean $\\pm$ sample std over seeds of done runs"
        + ("; bold: the paired bootstrap CI of $\\Delta$AP excludes 0" if with_deltas else ""),
        r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for _, row in summary.iterrows():
        cells = [latex_escape(str(row["variant"]))]
        cells += [_cell(row, c, r" $\pm$ ", MISSING_TEX) for c in shown]
        cells += [str(int(row[c])) for c in COUNT_COLUMNS]
        cells += [_delta_cell(row, lambda text: f"\\textbf{{{text}}}", MISSING_TEX)] if with_deltas else []
        cells += [_converged_cell(row[CONVERGED])] if with_convergence else []
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(
    grid_dir: Path,
    runs: pd.DataFrame,
    order: list[str],
    *,
    grid_runs: Sequence[Run] | None = None,
    baseline: str | None = None,
) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` and ``table.tex`` into ``grid_dir``; returns name -> path.

    runs: the runs frame (``analysis.runs.runs_frame``). With ``grid_runs`` (the same runs as
    ``analysis.runs.Run`` objects) the tables gain the ``converged`` column, and with ``baseline``
    too the ΔAP [95% CI] column (``analysis.bootstrap.grid_deltas``: 1000 resamples, fixed RNG
    seed). A baseline without runs in ``order`` is left out with a warning.
    """
    grid_dir = Path(grid_dir)
    if baseline is not None and grid_runs is None:
        raise ValueError("write_tables: a baseline needs grid_runs (the runs' matches files)")
    if baseline is not None and baseline not in order:
        log.warning("%s: baseline %r has no runs: no ΔAP column", grid_dir, baseline)
        baseline = None
    convergence = variant_convergence(grid_runs, order) if grid_runs is not None else None
    deltas = grid_deltas(grid_runs, baseline) if baseline is not None else None
    summary = summarize(runs, order, baseline=baseline, deltas=deltas, convergence=convergence)
    title = f"assignbench grid `{grid_dir.name}`"
    paths = {name: grid_dir / name for name in ("table.md", "table.csv", "table.tex")}
    paths["table.md"].write_text(to_markdown(summary, problem_runs(runs, order), title), encoding="utf-8")
    summary.to_csv(paths["table.csv"], index=False)
    paths["table.tex"].write_text(to_latex(summary, f"assignbench grid {grid_dir.name}"), encoding="utf-8")
    return paths
