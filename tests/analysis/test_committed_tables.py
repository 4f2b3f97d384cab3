"""The committed reference tables come from the committed runs.

Every ``results/reference/<grid>/table.csv`` is recomputed from the ``metrics.json`` of the run
directories beside it (``analysis.tables.summarize``, the function the report writes it with):
same variants in the same order, same seeds and run counts, same means and stds. A run copied
into a grid without regenerating its report, or a table edited by hand, fails here. The paired
ΔAP columns are not recomputed (1000 bootstrap resamples per variant); their seed counts are
checked against the runs the baseline shares.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from analysis.runs import DONE, grid_baseline, load_runs, runs_frame, variant_order
from analysis.tables import summarize

REFERENCE = Path(__file__).parents[2] / "results" / "reference"
GRIDS = sorted(p.parent.name for p in REFERENCE.glob("*/table.csv"))
COMPARED = ("AP", "AP50", "AP75", "APs", "APm", "positives_per_gt", "images_per_second")


def test_reference_grids_are_found():
    # The grids the README's tables quote; a move of results/reference would silently empty GRIDS.
    assert {"table1_modules", "modern", "quality"} <= set(GRIDS)


def _same(a: float, b: float) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


@pytest.mark.parametrize("grid", GRIDS)
def test_committed_table_matches_its_runs(grid):
    grid_dir = REFERENCE / grid
    committed = pd.read_csv(grid_dir / "table.csv")
    frame = runs_frame(load_runs(grid_dir))
    order = variant_order(grid_dir, set(frame["variant"]))
    fresh = summarize(frame, order)
    assert list(committed["variant"]) == list(fresh["variant"]), f"{grid}: variants differ"
    committed, fresh = committed.set_index("variant"), fresh.set_index("variant")
    for variant in fresh.index:
        for column in ("seeds", "failed", "incomplete"):
            assert int(committed.at[variant, column]) == int(fresh.at[variant, column]), f"{grid} {variant} {column}"
        for key in COMPARED:
            for stat in ("mean", "std"):
                column = f"{key}_{stat}"
                if column not in fresh.columns:
                    continue
                assert _same(float(committed.at[variant, column]), float(fresh.at[variant, column])), (
                    f"{grid} {variant} {column}: table.csv {committed.at[variant, column]} "
                    f"against {fresh.at[variant, column]} from the runs"
                )
    baseline = grid_baseline(grid_dir, order)
    if baseline is None or "delta_AP_seeds" not in committed.columns:
        return
    done = frame[frame["status"] == DONE]
    base_seeds = set(done.loc[done["variant"] == baseline, "seed"])
    for variant in fresh.index:
        shared = base_seeds & set(done.loc[done["variant"] == variant, "seed"])
        recorded = committed.at[variant, "delta_AP_seeds"]
        if variant == baseline or pd.isna(recorded):
            continue
        assert int(recorded) == len(shared), f"{grid} {variant}: ΔAP over {recorded} seeds, runs share {len(shared)}"
