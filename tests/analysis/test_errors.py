"""The grid's error analysis report (analysis.errors) on hand-written runs."""

import json

import pandas as pd
import pytest

from analysis.errors import write_errors
from analysis.runs import load_runs
from experiments.runfiles import MAIN_ERRORS


def _run(grid, variant, seed, errors, status="done"):
    run = grid / f"{variant}-s{seed}"
    run.mkdir(parents=True)
    metrics = {"status": status, "error": None, "variant": variant, "seed": seed, "AP": 10.0, "errors": errors}
    (run / "metrics.json").write_text(json.dumps(metrics))


def _errors(scale):
    values = {kind: scale * (index + 1) for index, kind in enumerate(MAIN_ERRORS)}
    return {"ap": 20.0 * scale, **values, "fp": 3.0 * scale, "fn": 4.0 * scale, "counts": dict.fromkeys(MAIN_ERRORS, 1)}


def test_table_and_plot_hold_each_variants_mean_over_seeds(tmp_path):
    grid = tmp_path / "g"
    _run(grid, "A", 0, _errors(1.0))
    _run(grid, "A", 1, _errors(3.0))  # mean scale 2
    _run(grid, "B", 0, _errors(0.5))
    _run(grid, "B", 1, None)  # written before error analyses existed: left out
    _run(grid, "B", 2, _errors(9.0), status="failed")  # not done: left out
    written = write_errors(grid, load_runs(grid), ["B", "A"])
    assert set(written) == {"errors.md", "errors.csv", "errors.png"}
    table = pd.read_csv(written["errors.csv"])
    assert list(table["variant"]) == ["B", "A"] and list(table["seeds"]) == [1, 2]
    # A: cls = mean(1, 3) = 2, miss (6th) = 2 * 6 = 12, fn = 2 * 4 = 8; B: ap = 10.
    a, b = table.iloc[1], table.iloc[0]
    assert (a["cls"], a["miss"], a["fn"], b["ap"]) == pytest.approx((2.0, 12.0, 8.0, 10.0))
    markdown = written["errors.md"].read_text()
    assert "| A | 2 | 40.00 | 2.00 | 4.00 |" in markdown and "classification" in markdown
    assert written["errors.png"].stat().st_size > 0


def test_nothing_without_error_analyses(tmp_path):
    grid = tmp_path / "g"
    _run(grid, "A", 0, None)
    (grid / "errors.md").write_text("stale")
    assert write_errors(grid, load_runs(grid), ["A"]) == {}
    assert not (grid / "errors.md").exists()
