"""analysis.tables on hand-built runs frames: mean ± sample std, counts, formats, escaping."""

import math

import pandas as pd
import pytest

from analysis.tables import latex_escape, problem_runs, summarize, to_latex, to_markdown

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
