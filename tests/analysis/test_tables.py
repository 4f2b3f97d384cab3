"""analysis.tables on hand-built runs frames: mean ± sample std, counts, formats, escaping; the ΔAP
and convergence columns."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from analysis.bootstrap import PairedDelta, paired_bootstrap
from analysis.runs import load_runs, runs_frame
from analysis.tables import (
    latex_escape,
    problem_runs,
    run_converged,
    summarize,
    to_latex,
    to_markdown,
    variant_convergence,
    write_tables,
)
from experiments.matches import compute_matches, load_matches, save_matches
from tests.experiments.test_matches import random_detections, random_gt

NAN = math.nan


def _runs(rows):
    """A runs frame as analysis.runs.runs_frame builds it, from (variant, seed, status, error, AP, iou_err)."""
    records = []
    for variant, seed, status, error, ap, iou_err in rows:
        records.append(
            {
                "variant": variant,
                "seed": seed,
                "run": f"{variant}-s{seed}",
                "status": status,
                "error": error,
                "AP": ap,
                "AP50": ap,
                "AP75": ap,
                "APs": ap,
                "APm": ap,
                "APl": ap,
                "iou_pred_error": iou_err,
                "images_per_second": 100.0,
                "positives_per_gt": 9.0,
            }
        )
    return pd.DataFrame(records)


def test_mean_and_sample_std_over_done_seeds():
    runs = _runs(
        [
            ("b", 0, "done", None, 30.0, NAN),
            ("b", 1, "done", None, 32.0, NAN),
            ("b", 2, "done", None, 34.0, NAN),
            ("b", 3, "failed", "boom", NAN, NAN),
            ("a", 0, "done", None, 40.0, NAN),  # a single seed: std undefined
            ("a", 1, "incomplete", None, NAN, NAN),
        ]
    )
    summary = summarize(runs, ["b", "a"]).set_index("variant")
    # b: mean(30, 32, 34) = 32, sample std sqrt(((-2)^2 + 0 + 2^2) / 2) = 2.
    assert summary.loc["b", "AP_mean"] == pytest.approx(32.0)
    assert summary.loc["b", "AP_std"] == pytest.approx(2.0)
    assert summary.loc["b", ["seeds", "failed", "incomplete"]].tolist() == [3, 1, 0]
    assert summary.loc["a", "AP_mean"] == 40.0 and math.isnan(summary.loc["a", "AP_std"])
    assert summary.loc["a", ["seeds", "failed", "incomplete"]].tolist() == [1, 0, 1]
    assert summary.index.tolist() == ["b", "a"]
    assert "iou_pred_error_mean" not in summary.columns  # no run has one

    markdown = to_markdown(summary.reset_index(), problem_runs(runs, ["b", "a"]), "grid")
    assert "| b | 32.0 ± 2.0 | 32.0 ± 2.0 |" in markdown
    assert "| a | 40.0 ± – |" in markdown
    assert "| 9.0 | 100.0 | 3 | 1 | 0 |" in markdown  # pos/GT, img/s, seeds, failed, incomplete
    assert "- b, seed 3 (`b-s3`): failed: `boom`" in markdown
    assert "- a, seed 1 (`a-s1`): incomplete: `no metrics.json (still running, or killed)`" in markdown


def test_iou_pred_error_column_appears_when_a_run_has_it():
    # iou_pred_error 0.10, 0.14 -> mean 0.120, shown with three decimals.
    runs = _runs([("p", 0, "done", None, 40.0, 0.10), ("p", 1, "done", None, 41.0, 0.14)])
    summary = summarize(runs, ["p"])
    assert summary.loc[0, "iou_pred_error_mean"] == pytest.approx(0.12)
    markdown = to_markdown(summary, problem_runs(runs, ["p"]), "grid")
    assert (
        "| variant | AP | AP50 | AP75 | APs | APm | APl | IoU err | pos/GT | img/s | seeds | failed | incomplete |"
        in markdown
    )
    assert "| 0.120 |" in markdown
    assert "Failed and incomplete runs" not in markdown


def test_only_failed_runs_still_give_a_row():
    runs = _runs([("x", 0, "failed", "CUDA out of memory", NAN, NAN), ("x", 1, "failed", "line1\n  line2", NAN, NAN)])
    summary = summarize(runs, ["x"])
    assert summary.loc[0, ["seeds", "failed"]].tolist() == [0, 2]
    markdown = to_markdown(summary, problem_runs(runs, ["x"]), "grid")
    assert "| x | – | – | – | – | – | – | – | – | 0 | 2 | 0 |" in markdown
    assert "`CUDA out of memory`" in markdown and "`line1 line2`" in markdown


def test_latex_table():
    runs = _runs([("paa_c+iou", 0, "done", None, 30.0, NAN), ("paa_c+iou", 1, "done", None, 34.0, NAN)])
    # mean(30, 34) = 32, sample std sqrt((4 + 4) / 1) = 2.83 -> 2.8
    latex = to_latex(summarize(runs, ["paa_c+iou"]), "grid 50%")
    lines = latex.splitlines()
    assert lines[0] == r"% grid 50\%: mean $\pm$ sample std over seeds of done runs"
    assert lines[1] == r"\begin{tabular}{l" + "r" * 11 + "}"
    assert r"\toprule" in lines and r"\midrule" in lines and lines[-2:] == [r"\bottomrule", r"\end{tabular}"]
    assert r"Variant & AP & AP$_{50}$ & AP$_{75}$ & AP$_S$ & AP$_M$ & AP$_L$ & pos/GT & img/s" in latex
    assert r"paa\_c+iou & 32.0 $\pm$ 2.8 & " in latex
    assert latex_escape("a_b & 100% ± {x}") == r"a\_b \& 100\% $\pm$ \{x\}"


# ----------------------------------------------------------------------------- ΔAP and convergence


def _delta(variant, delta, low, high, seeds=3):
    return PairedDelta(variant=variant, baseline="b", delta_AP=delta, ci_low=low, ci_high=high, n_seeds=seeds,
                       n_images=500, n_resamples=1000, confidence=0.95, seeds=tuple(range(seeds)),
                       samples=np.zeros(1000))


def test_delta_column_marks_cis_that_exclude_zero():
    runs = _runs([(v, 0, "done", None, 30.0, NAN) for v in ("b", "up", "flat", "none")])
    deltas = {"up": _delta("up", 1.23, 0.41, 2.05), "flat": _delta("flat", -0.44, -1.2, 0.31)}
    summary = summarize(runs, ["b", "up", "flat", "none"], baseline="b", deltas=deltas)
    markdown = to_markdown(summary, problem_runs(runs, ["b"]), "grid")
    assert "| seeds | failed | incomplete | ΔAP [95% CI] |" in markdown
    assert "| 1 | 0 | 0 | baseline |" in markdown.splitlines()[4]  # the baseline row
    assert "| 1 | 0 | 0 | **+1.2 [+0.4, +2.0]** |" in markdown  # excludes 0: bold
    assert "| 1 | 0 | 0 | -0.4 [-1.2, +0.3] |" in markdown
    assert "| none | " in markdown and markdown.split("| none | ")[1].splitlines()[0].endswith("| – |")
    assert "AP minus the baseline's (`b`)" in markdown and "1000 resamples" in markdown
    rows = summary.set_index("variant")
    assert rows["is_baseline"].tolist() == [True, False, False, False]
    assert rows.loc["up", "delta_AP_excludes_zero"] and not rows.loc["flat", "delta_AP_excludes_zero"]
    assert pd.isna(rows.loc["none", "delta_AP_excludes_zero"]) and math.isnan(rows.loc["b", "delta_AP"])
    assert rows.loc["up", ["delta_AP_ci_low", "delta_AP_ci_high", "delta_AP_seeds"]].tolist() == [0.41, 2.05, 3]
    latex = to_latex(summary, "grid")
    assert r"& $\Delta$AP [95\% CI] \\" in latex
    assert r"& \textbf{+1.2 [+0.4, +2.0]} \\" in latex and r"& -0.4 [-1.2, +0.3] \\" in latex
    assert r"& baseline \\" in latex and r"& -- \\" in latex


def test_a_run_is_not_converged_when_the_last_quarter_raised_its_ap_by_over_ten_percent():
    # iters 600: the AP at 450 (the last point <= 0.75 * 600) against the final AP.
    curve = [[150, 2.7], [300, 5.4], [450, 7.4], [600, 9.2]]
    assert run_converged({"iters": 600, "AP": 9.2, "ap_curve": curve}) is False  # 1.8 > 0.92
    assert run_converged({"iters": 600, "AP": 8.1, "ap_curve": curve}) is True  # 0.7 <= 0.81
    assert run_converged({"iters": 600, "AP": 10.0, "ap_curve": [[450, 9.0], [600, 10.0]]}) is True  # 1.0: not more
    assert run_converged({"iters": 600, "ap_curve": curve}) is False  # no AP: the last point's 9.2
    assert run_converged({"iters": 600, "AP": 9.2, "ap_curve": [[451, 9.0], [600, 9.2]]}) is None  # none <= 450
    assert run_converged({"AP": 9.2, "ap_curve": curve}) is None  # no iters
    assert run_converged({"iters": 600, "AP": 9.2, "ap_curve": [[300, None], ["x", 1], [600, 9.2]]}) is None


def test_variant_convergence_and_the_note_it_brings():
    def run(variant, status, final):
        return SimpleNamespace(variant=variant, status=status,
                               metrics={"iters": 100, "AP": final, "ap_curve": [[75, 10.0], [100, final]]})

    runs = [run("fast", "done", 10.5), run("fast", "done", 10.2), run("slow", "done", 10.2),
            run("slow", "done", 20.0), run("slow", "failed", 30.0), run("odd", "done", 10.0),
            SimpleNamespace(variant="odd", status="done", metrics={"AP": 10.0})]
    convergence = variant_convergence(runs, ["fast", "slow", "odd", "absent"])
    assert convergence == {"fast": True, "slow": False, "odd": None, "absent": None}
    frame = _runs([(v, 0, "done", None, 30.0, NAN) for v in ("fast", "slow", "odd")])
    summary = summarize(frame, ["fast", "slow", "odd"], convergence=convergence)
    markdown = to_markdown(summary, problem_runs(frame, ["fast"]), "grid")
    assert "| seeds | failed | incomplete | converged |" in markdown
    assert [line.rsplit("|", 2)[1].strip() for line in markdown.splitlines()[4:7]] == ["yes", "no", "?"]
    assert "**Not converged at this budget: `slow`.** Orderings at this training budget measure learning speed" \
        in markdown
    converged = summarize(frame, ["fast"], convergence={"fast": True})
    assert "Not converged" not in to_markdown(converged, problem_runs(frame, ["fast"]), "grid")
    assert to_latex(summary, "grid").splitlines()[3].endswith(r"& Conv. \\")


def test_write_tables_with_the_grids_runs(tmp_path):
    coco = random_gt(0)
    for variant, seed in (("base", 0), ("base", 1), ("new", 0), ("new", 1), ("bare", 0)):
        run_dir = tmp_path / f"{variant}-s{seed}"
        run_dir.mkdir()
        results = random_detections(coco, 10 * len(variant) + seed)
        metrics = {"status": "done", "variant": variant, "seed": seed, "AP": 30.0, "iters": 100,
                   "ap_curve": [[50, 10.0], [100, 30.0]] if variant == "new" else [[75, 29.0], [100, 30.0]]}
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
        (run_dir / "config.yaml").write_text(f"variant: {variant}\nseed: {seed}\n")
        if variant != "bare":
            save_matches(run_dir / "eval_matches.npz", compute_matches(coco, results))
    grid_runs = load_runs(tmp_path)
    frame = runs_frame(grid_runs)
    order = ["base", "new", "bare"]
    paths = write_tables(tmp_path, frame, order, grid_runs=grid_runs, baseline="base")
    assert set(paths) == {"table.md", "table.csv", "table.tex"}
    markdown = paths["table.md"].read_text()
    table = pd.read_csv(paths["table.csv"]).set_index("variant")
    expected = paired_bootstrap(
        {v: {s: load_matches(tmp_path / f"{v}-s{s}" / "eval_matches.npz") for s in (0, 1)} for v in ("base", "new")},
        "base",
    )["new"]
    assert table.loc["new", "delta_AP"] == pytest.approx(expected.delta_AP)
    assert table.loc["new", "delta_AP_ci_low"] == pytest.approx(expected.ci_low)
    assert table.loc["new", "delta_AP_seeds"] == 2 and table.loc["base", "is_baseline"]
    assert table["converged"].tolist() == [True, False, True]
    assert "| baseline | yes |" in markdown and "| – | yes |" in markdown  # bare: no matches file
    assert "Not converged at this budget: `new`" in markdown
    assert r"$\Delta$AP [95\% CI]" in paths["table.tex"].read_text()
    plain = write_tables(tmp_path, frame, order)  # without the runs: the old three columns sets
    assert "ΔAP" not in plain["table.md"].read_text() and "converged" not in plain["table.md"].read_text()
    with pytest.raises(ValueError, match="baseline needs grid_runs"):
        write_tables(tmp_path, frame, order, baseline="base")
