"""benchmarks/gpu_check.sh in its CPU mode: every section runs, on tiny sizes, and reports."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
SECTIONS = ("env", "tests", "assign", "train", "grid", "table")


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == list(SECTIONS)
    assert all(line.endswith("ok") for line in summary), summary
    for name in ("gpu_check.log", "assign_cpu.csv", "train_cpu.csv", "demo_table.md", "demo_runs.txt"):
        assert (out / name).is_file(), name
    runs = (out / "demo_runs.txt").read_text().splitlines()
    assert sorted(line.split()[0] for line in runs) == ["atss_centerness-s0", "iou_none-s0", "paa_iou-s0"]


@pytest.mark.slow
def test_gpu_check_grid_only_with_parallel_jobs(tmp_path):
    """--grid-only runs just env, grid and table; GPU_CHECK_JOBS=2 trains through the joblib launcher."""
    out = tmp_path / "out"
    env = {
        **os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / "work"), "GPU_CHECK_PYTHON": sys.executable,
        "GPU_CHECK_GRID": "table1_separation", "GPU_CHECK_JOBS": "2",
    }
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--grid-only"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == ["env", "grid", "table"]
    assert "hydra/launcher=joblib" in (out / "gpu_check.log").read_text()
    runs = (out / "table1_separation_runs.txt").read_text().splitlines()
    # the grid file's seeds, [0, 1]
    assert sorted(line.split()[0] for line in runs) == sorted(f"paa_{s}_iou-s{seed}" for s in "abcd" for seed in (0, 1))
    assert all(" done " in line for line in runs), runs
    assert (out / "table1_separation_table.md").is_file()
    with tarfile.open(out / "table1_separation_results.tgz") as archive:
        names = set(archive.getnames())
    for run in (f"paa_{s}_iou-s0" for s in "abcd"):
        assert {f"table1_separation/{run}/metrics.json", f"table1_separation/{run}/stats.csv"} <= names
    assert {"table1_separation/table.md", "table1_separation/positives.png"} <= names
    assert not any("checkpoints" in name or name.endswith("detections.json") for name in names)
