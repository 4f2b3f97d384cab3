"""``assignbench-report results/<grid>``: the tables and plots of one grid.

``write_report`` is what the training app calls at the end of a grid; ``main`` is the console
script (also ``python -m analysis.report``). Outputs, all in ``results/<grid>/``:
``table.md``, ``table.csv``, ``table.tex`` (analysis.tables: mean ± std over seeds, the paired
ΔAP [95% CI] against the grid's baseline variant from ``analysis.bootstrap``, the convergence mark), ``positives.png``, ``ap.png``,
``ap_curve.png`` and ``assignments.png`` (analysis.plots); ``errors.md``, ``errors.csv`` and
``errors.png``, the TIDE error analysis (analysis.errors); ``report.html``, all of it in one
self-contained page (analysis.html). A plot without data is skipped with
a log note; a missing grid directory or a grid without runs raises ``ResultsError``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from analysis.errors import write_errors
from analysis.html import REPORT_FILE, write_html
from analysis.plots import plot_ap, plot_ap_curve, plot_assignments, plot_positives
from analysis.runs import (
    DONE,
    AssignmentSnapshot,
    ResultsError,
    Run,
    ap_curve_frame,
    grid_baseline,
    load_runs,
    load_snapshot,
    runs_frame,
    stats_frame,
    variant_order,
)
from analysis.tables import write_tables

log = logging.getLogger(__name__)


def assignment_rows(runs: list[Run], order: list[str]) -> list[tuple[str, AssignmentSnapshot]]:
    """Per variant (in ``order``), the snapshot of its lowest-seed run that has a readable
    ``assignments.npz``, done runs first; labelled ``"<variant>\\nseed <seed>"``."""
    rows = []
    for variant in order:
        candidates = [r for r in runs if r.variant == variant and r.snapshot_path.is_file()]
        candidates.sort(key=lambda r: (r.status != DONE, r.seed if r.seed is not None else -1, r.name))
        for run in candidates:
            snapshot = load_snapshot(run.snapshot_path)
            if snapshot is not None:
                rows.append((f"{variant}\nseed {run.seed}", snapshot))
                break
    return rows


def detections_plot(runs: list[Run], order: list[str], path: Path) -> Path | None:
    """``assignbench-show`` of the lowest-seed done run of each variant that kept its ``detections.json``;
    None (with a log note) when no run has one (committed reference runs do not) or its data is not here."""
    from analysis.show import draw_detections

    chosen = []
    for variant in order:
        candidates = [r for r in runs if r.variant == variant and r.status == DONE and (r.path / "detections.json").is_file()]
        if candidates:
            chosen.append(min(candidates, key=lambda r: (r.seed if r.seed is not None else -1, r.name)).path)
    if not chosen:
        log.info("skipped %s: no run kept its detections.json", path.name)
        return None
    try:
        return draw_detections(chosen, path)
    except ResultsError as exc:
        log.info("skipped %s: %s", path.name, exc)
        return None


def write_report(grid_dir: Path) -> dict[str, Path]:
    """Write the tables and plots of ``results/<grid>/`` into it; returns file name -> path written.

    Raises ResultsError when ``grid_dir`` is not a directory or holds no run directories.
    """
    grid_dir = Path(grid_dir)
    runs = load_runs(grid_dir)
    frame = runs_frame(runs)
    order = variant_order(grid_dir, set(frame["variant"]))
    written = write_tables(grid_dir, frame, order, grid_runs=runs, baseline=grid_baseline(grid_dir, order))
    plots = {
        "positives.png": lambda path: plot_positives(stats_frame(runs), order, path),
        "ap.png": lambda path: plot_ap(frame, order, path),
        "ap_curve.png": lambda path: plot_ap_curve(ap_curve_frame(runs), order, path),
        "assignments.png": lambda path: plot_assignments(assignment_rows(runs, order), path),
    }
    for name, plot in plots.items():
        path = plot(grid_dir / name)
        if path is not None:
            written[name] = path
    written.update(write_errors(grid_dir, runs, order))
    detections = detections_plot(runs, order, grid_dir / "detections.png")
    if detections is not None:
        written["detections.png"] = detections
    written[REPORT_FILE] = write_html(grid_dir)  # last: it embeds everything above
    counts = frame["status"].value_counts()
    log.info(
        "%s: %d variants, %d runs (%d done, %d failed, %d incomplete)",
        grid_dir,
        len(order),
        len(frame),
        counts.get("done", 0),
        counts.get("failed", 0),
        counts.get("incomplete", 0),
    )
    return written


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 written, 1 no grid or no runs)."""
    parser = argparse.ArgumentParser(
        prog="assignbench-report",
        description="Write paper-style tables (table.md/.csv/.tex) and plots of one grid's runs into its directory.",
    )
    parser.add_argument("grid_dir", type=Path, help="a grid's results directory, e.g. results/runs/demo")
    parser.add_argument("--pair", nargs=2, action="append", metavar=("VARIANT", "BASELINE"), default=[],
                        help="also print the paired ΔAP [95%% CI] of VARIANT against BASELINE (labels; repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = write_report(args.grid_dir)
    except ResultsError as exc:
        print(f"assignbench-report: error: {exc}", file=sys.stderr)
        return 1
    for path in written.values():
        print(f"wrote {path}")
    for variant, baseline in args.pair:
        print(describe_pair(load_runs(args.grid_dir), variant, baseline))
    return 0


def describe_pair(runs: list[Run], variant: str, baseline: str) -> str:
    """One line: the paired bootstrap ΔAP [95% CI] of ``variant`` against ``baseline``."""
    from analysis.bootstrap import grid_deltas

    delta = grid_deltas(runs, baseline).get(variant)
    if delta is None:
        return f"{variant} − {baseline}: no paired runs with eval_matches.npz"
    mark = " (CI excludes 0)" if delta.excludes_zero else ""
    return (f"{variant} − {baseline}: ΔAP {delta.delta_AP:+.2f} [{delta.ci_low:+.2f}, {delta.ci_high:+.2f}]{mark}, "
            f"{delta.n_seeds} seeds × {delta.n_images} images, {delta.n_resamples} resamples")


if __name__ == "__main__":
    sys.exit(main())
