"""benchmarks/gpu_reference.sh on the CPU (its dry run), and benchmarks/convergence.py on hand-made grids."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks.convergence import convergence_rows
from benchmarks.convergence import main as convergence_main

REPO = Path(__file__).parents[2]
DEMO_RUNS = sorted(f"{v}-s{s}" for v in ("iou_none", "atss_centerness", "paa_iou") for s in (0, 1))


def reference(tmp_path: Path, name: str, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / name / "out"
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_WORK": str(tmp_path / name / "work"),
           "GPU_CHECK_PYTHON": sys.executable, "GPU_REFERENCE_GRIDS": "demo", "GPU_REFERENCE_SEEDS": "[0,1]",
           "GPU_CHECK_JOBS": "2", "GPU_REFERENCE_PRIOR": str(tmp_path / "prior"), **env}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_reference.sh"), "--dry-run", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc, out


def archived_runs(archive_path: Path) -> dict[str, dict]:
    with tarfile.open(archive_path) as archive:
        return {Path(m.name).parent.name: json.load(archive.extractfile(m))
                for m in archive.getmembers() if m.name.endswith("/metrics.json")}


@pytest.mark.slow
def test_reference_grids_train_resident_then_resume_from_the_prior_slot(tmp_path):
    _, out = reference(tmp_path, "first")
    assert [line.split()[0] for line in (out / "summary.txt").read_text().splitlines()] == ["env", "data", "demo"]
    runs = archived_runs(out / "demo_results.tgz")
    assert sorted(runs) == DEMO_RUNS and all(m["status"] == "done" for m in runs.values())
    with tarfile.open(out / "demo_results.tgz") as archive:
        names = set(archive.getnames())
        config = archive.extractfile("demo/paa_iou-s0/config.yaml").read().decode()
        archive.extractall(tmp_path / "prior", filter="data")
    assert "demo/table.md" in names and not any("checkpoints" in n for n in names)
    assert "resident: true" in config and "iters: 2" in config
    # The next slot starts from the landed results: every run is copied in and skipped, none retrained.
    proc, out = reference(tmp_path, "second")
    assert proc.stdout.count("already done, skipped") == len(DEMO_RUNS)
    assert archived_runs(out / "demo_results.tgz") == runs


@pytest.mark.slow
def test_a_spent_budget_trains_nothing_and_says_so(tmp_path):
    proc, out = reference(tmp_path, "spent", GPU_REFERENCE_BUDGET="0")
    # the budget counts from the script's start, so setting up already spent it
    assert re.search(r"demo: skipped, -\d+s of the budget left", (out / "summary.txt").read_text())
    assert not (out / "demo_results.tgz").exists()


@pytest.mark.slow
def test_converge_mode_trains_n_and_2n_and_prints_the_verdict(tmp_path):
    _, out = reference(tmp_path, "converge", "--converge", GPU_REFERENCE_SEEDS="[0]")
    assert {m["iters"] for m in archived_runs(out / "demo_2_results.tgz").values()} == {2}
    assert {m["iters"] for m in archived_runs(out / "demo_4_results.tgz").values()} == {4}
    text = (out / "convergence.txt").read_text()
    assert "verdict:" in text and len([line for line in text.splitlines() if " 2/4 " in line]) == 3


def fake_grid(root: Path, runs: dict[tuple[str, int], tuple[float, float | None]], iters: int) -> Path:
    for (variant, seed), (ap, iou_error) in runs.items():
        run = root / f"{variant}-s{seed}"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({
            "status": "done", "variant": variant, "variant_id": variant, "seed": seed, "AP": ap,
            "iou_pred_error": iou_error, "iters": iters}))
    return root


def test_convergence_rows_by_hand(tmp_path, capsys):
    # A: mean AP 50 -> 52 over seeds 0, 1 (+4.0%), no IoU head. B: 40 -> 41 (+2.5%) but IoU error 0.12 > 0.1.
    # C: 30 -> 33 (+10%). D: only in the short grid, so not compared.
    short = fake_grid(tmp_path / "n", {("A", 0): (49.0, None), ("A", 1): (51.0, None), ("B", 0): (40.0, 0.2),
                                       ("C", 0): (30.0, None), ("D", 0): (10.0, None)}, 100)
    long = fake_grid(tmp_path / "2n", {("A", 0): (51.0, None), ("A", 1): (53.0, None), ("B", 0): (41.0, 0.12),
                                       ("C", 0): (33.0, None)}, 200)
    rows = {r["variant"]: r for r in convergence_rows(short, long, max_rise=0.05, max_iou_error=0.1)}
    assert sorted(rows) == ["A", "B", "C"]
    assert rows["A"]["seeds"] == [0, 1] and rows["A"]["rise"] == pytest.approx(0.04) and rows["A"]["ok"]
    assert rows["B"]["rise"] == pytest.approx(0.025) and rows["B"]["iou_error"] == 0.12 and not rows["B"]["ok"]
    assert rows["C"]["rise"] == pytest.approx(0.1) and not rows["C"]["ok"]
    assert convergence_main([str(short), str(long)]) == 1
    assert "verdict: not converged" in capsys.readouterr().out
    assert convergence_main([str(short), str(long), "--max-rise", "0.2", "--max-iou-error", "0.15"]) == 0
