"""write_report and the assignbench-report CLI on hand-written grids (2 variants x 3 seeds + problems)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from analysis.plots import pick_iterations
from analysis.report import write_report
from analysis.runs import ResultsError
from experiments.runfiles import write_grid_file

REPO = Path(__file__).resolve().parents[2]
STATS_HEADER = "iter,loss_cls,loss_box,loss_quality,num_gt,num_pos,pos_per_gt_mean,pos_per_gt_std,pos_iou_mean,gt_without_pos,assign_ms\n"

# Per variant and seed 0, 1, 2: (AP, AP50, iou_pred_error, images/s, pos_per_gt_mean of the three stats rows).
RUNS = {
    "atss+iou": [
        (30.0, 48.0, None, 100.0, (8, 9, 10)),
        (32.0, 50.0, None, 110.0, (9, 10, 11)),
        (34.0, 52.0, None, 120.0, (10, 11, 12)),
    ],
    "paa+iou": [
        (40.0, 58.0, 0.10, 50.0, (4, 5, 6)),
        (41.0, 59.0, 0.12, 60.0, (5, 6, 7)),
        (45.0, 63.0, 0.14, 70.0, (6, 7, 8)),
    ],
}
FAILURE = "NonFiniteLossError: loss is nan at iter 12"


def _metrics(status, seed, assigner, ap=None, ap50=None, iou_err=None, ips=None, error=None):
    return {
        "status": status,
        "error": error,
        "AP": ap,
        "AP50": ap50,
        "AP75": ap,
        "APs": ap,
        "APm": ap,
        "APl": ap,
        "iou_pred_error": iou_err,
        "iters": 30,
        "train_seconds": 12.0,
        "images_per_second": ips,
        "peak_memory_mb": 100.0,
        "seed": seed,
        "assigner": assigner,
        "scorer": "iou",
        "overrides": [],
        "ap_curve": [[10, ap / 2], [30, ap]] if ap is not None else [],
    }


def _config(variant, seed):
    assigner = variant.split("+")[0]
    return (
        f"variant: {variant}\nseed: {seed}\nrun_name: {variant}-s{seed}\n"
        f"assigner:\n  name: {assigner}\n  topk: 9\nscorer:\n  name: iou\ngrid:\n  name: bench\n"
    )


def _snapshot(path, shift):
    """64x64 image, an 8x8 grid of 16x16 anchors (stride 8), two GTs, five recorded iterations."""
    centres = np.arange(4, 64, 8, dtype=np.float32)
    cx, cy = np.meshgrid(centres, centres)
    anchors = np.stack([cx - 8, cy - 8, cx + 8, cy + 8], axis=-1).reshape(-1, 4)
    arrays = {
        "image": (np.indices((64, 64)).sum(0) * 2).astype(np.uint8)[..., None].repeat(3, axis=-1),
        "anchors": anchors,
        "num_anchors_per_level": np.array([64]),
        "gt_boxes": np.array([[8, 8, 30, 30], [34, 30, 60, 60]], dtype=np.float32),
    }
    for it in (0, 10, 20, 30, 40):
        gt_index = np.full(64, -1, dtype=np.int64)
        gt_index[[9, 10, 17 + shift]] = 0
        gt_index[[45, 46, 53]] = 1
        gt_index[[18, 54]] = -2
        arrays[f"gt_index_{it}"] = gt_index
    np.savez_compressed(path, **arrays)


def build_grid(root: Path) -> Path:
    """results/bench/: 2 variants x 3 done seeds, a failed paa+iou-s3, an incomplete atss+iou-s3."""
    grid = root / "bench"
    for variant, seeds in RUNS.items():
        for seed, (ap, ap50, iou_err, ips, positives) in enumerate(seeds):
            run = grid / f"{variant}-s{seed}"
            run.mkdir(parents=True)
            (run / "config.yaml").write_text(_config(variant, seed))
            metrics = _metrics("done", seed, variant.split("+")[0], ap, ap50, iou_err, ips)
            (run / "metrics.json").write_text(json.dumps(metrics))
            rows = [
                f"{it},1.0,0.5,0.2,4,{4 * p},{p},1.0,0.6,{1 if variant == 'paa+iou' and it == 10 else 0},3.0\n"
                for it, p in zip((10, 20, 30), positives)
            ]
            (run / "stats.csv").write_text(STATS_HEADER + "".join(rows))
            if seed == 0:
                _snapshot(run / "assignments.npz", shift=1 if variant == "paa+iou" else 0)
    failed = grid / "paa+iou-s3"
    failed.mkdir()
    (failed / "config.yaml").write_text(_config("paa+iou", 3))
    (failed / "metrics.json").write_text(json.dumps(_metrics("failed", 3, "paa", error=FAILURE)))
    incomplete = grid / "atss+iou-s3"
    incomplete.mkdir()
    (incomplete / "config.yaml").write_text(_config("atss+iou", 3))
    (incomplete / "stats.csv").write_text(STATS_HEADER + "10,1.0,0.5,0.2,4,400,100,1.0,0.6,0,3.0\n")
    write_grid_file(grid, "bench", ["paa+iou", "atss+iou"], baseline="atss+iou")
    return grid


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    grid = build_grid(tmp_path_factory.mktemp("results"))
    return grid, write_report(grid)


def test_writes_every_output(report):
    grid, written = report
    names = ["table.md", "table.csv", "table.tex", "positives.png", "ap.png", "ap_curve.png", "assignments.png",
             "report.html"]
    assert list(written) == names
    for name in names:
        assert written[name] == grid / name and written[name].stat().st_size > 0
    for name in names[3:-1]:
        with Image.open(grid / name) as image:
            image.verify()
            assert image.format == "PNG"


def test_csv_holds_the_hand_computed_numbers(report):
    grid, _ = report
    table = pd.read_csv(grid / "table.csv").set_index("variant")
    assert table.index.tolist() == ["paa+iou", "atss+iou"]  # grid.json order
    # atss+iou AP 30, 32, 34 -> 32.0 ± 2.0; AP50 48, 50, 52 -> 50.0 ± 2.0.
    assert table.loc["atss+iou", "AP_mean"] == pytest.approx(32.0)
    assert table.loc["atss+iou", "AP_std"] == pytest.approx(2.0)
    assert table.loc["atss+iou", "AP50_mean"] == pytest.approx(50.0)
    # paa+iou AP 40, 41, 45 -> mean 42, deviations -2, -1, 3 -> std sqrt(14 / 2) = sqrt(7).
    assert table.loc["paa+iou", "AP_mean"] == pytest.approx(42.0)
    assert table.loc["paa+iou", "AP_std"] == pytest.approx(math.sqrt(7))
    # iou_pred_error 0.10, 0.12, 0.14 -> 0.12; atss+iou has none.
    assert table.loc["paa+iou", "iou_pred_error_mean"] == pytest.approx(0.12)
    assert math.isnan(table.loc["atss+iou", "iou_pred_error_mean"])
    # Positives per GT: run means 9, 10, 11 -> 10 and 5, 6, 7 -> 6 (the incomplete run's 100 is left out).
    assert table.loc["atss+iou", "positives_per_gt_mean"] == pytest.approx(10.0)
    assert table.loc["paa+iou", "positives_per_gt_mean"] == pytest.approx(6.0)
    assert table.loc["atss+iou", "images_per_second_mean"] == pytest.approx(110.0)
    assert table.loc["atss+iou", ["seeds", "failed", "incomplete"]].tolist() == [3, 0, 1]
    assert table.loc["paa+iou", ["seeds", "failed", "incomplete"]].tolist() == [3, 1, 0]


def test_markdown_and_latex(report):
    grid, _ = report
    markdown = (grid / "table.md").read_text()
    assert "| paa+iou | 42.0 ± 2.6 | 60.0 ± 2.6 |" in markdown
    assert "| atss+iou | 32.0 ± 2.0 | 50.0 ± 2.0 |" in markdown
    assert "| 0.120 | 6.0 | 60.0 | 3 | 1 | 0 |" in markdown
    assert "| – | 10.0 | 110.0 | 3 | 0 | 1 |" in markdown
    assert f"- paa+iou, seed 3 (`paa+iou-s3`): failed: `{FAILURE}`" in markdown
    assert "- atss+iou, seed 3 (`atss+iou-s3`): incomplete:" in markdown
    latex = (grid / "table.tex").read_text()
    assert r"paa+iou & 42.0 $\pm$ 2.6 & 60.0 $\pm$ 2.6" in latex
    assert r"\toprule" in latex and r"\bottomrule" in latex


def test_pick_iterations_keeps_ends_evenly_spaced():
    # linspace(0, 4, 4) = 0, 1.33, 2.67, 4 -> indices 0, 1, 3, 4.
    assert pick_iterations([0, 10, 20, 30, 40], 4) == [0, 10, 30, 40]
    assert pick_iterations([5, 7], 4) == [5, 7]


def test_only_failed_runs_still_write_a_table(tmp_path):
    grid = tmp_path / "broken"
    for seed in (0, 1):
        run = grid / f"fsr+iou-s{seed}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(_metrics("failed", seed, "fsr", error=f"error {seed}")))
    written = write_report(grid)
    assert set(written) == {"table.md", "table.csv", "table.tex", "report.html"}  # every plot skipped: no done run
    markdown = (grid / "table.md").read_text()
    assert "| fsr+iou | – |" in markdown and "| 0 | 2 | 0 |" in markdown
    assert "- fsr+iou, seed 0 (`fsr+iou-s0`): failed: `error 0`" in markdown
    assert "- fsr+iou, seed 1 (`fsr+iou-s1`): failed: `error 1`" in markdown
    assert pd.read_csv(grid / "table.csv").loc[0, "failed"] == 2


def test_report_without_stats_skips_the_positives_plot(tmp_path):
    grid = tmp_path / "nostats"
    (grid / "iou+none-s0").mkdir(parents=True)
    (grid / "iou+none-s0" / "metrics.json").write_text(json.dumps(_metrics("done", 0, "iou", 20.0, 35.0)))
    (grid / "positives.png").write_bytes(b"stale")  # from an earlier report: must not survive
    written = write_report(grid)
    assert set(written) == {"table.md", "table.csv", "table.tex", "ap.png", "ap_curve.png", "report.html"}
    assert not (grid / "positives.png").exists()


def test_missing_grid_raises():
    with pytest.raises(ResultsError):
        write_report(Path("/nonexistent/results/grid"))


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "analysis.report", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli(tmp_path):
    grid = tmp_path / "cli"
    (grid / "iou+none-s0").mkdir(parents=True)
    (grid / "iou+none-s0" / "metrics.json").write_text(json.dumps(_metrics("done", 0, "iou", 20.0, 35.0)))
    done = _cli(str(grid))
    assert done.returncode == 0, done.stderr
    assert f"wrote {grid / 'table.md'}" in done.stdout
    assert "skipped positives.png" in done.stderr
    assert "Traceback" not in done.stderr
    missing = _cli(str(tmp_path / "absent"))
    assert missing.returncode != 0
    assert "not a directory" in missing.stderr and "Traceback" not in missing.stderr


def test_analysis_does_not_import_torch():
    code = "import sys, analysis.report; assert 'torch' not in sys.modules, 'analysis imported torch'"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
