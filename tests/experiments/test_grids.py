"""Every grid runs end to end for 2 iterations per variant on tiny data (the sweep-test pattern),
writes one run per variant and seed, and ends with its report."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

GRIDS = sorted(p.stem for p in (Path(__file__).parents[2] / "experiments" / "conf" / "grid").glob("*.yaml")
               if p.stem != "single")

TINY = [
    "schedule=debug",
    "schedule.iters=2",
    "model.fpn_channels=32",
    "model.num_convs=1",
    "data.digits.image_size=96",
    "data.digits.num_train=16",
    "data.digits.num_val=4",
    "data.num_workers=0",
    "eval.curve_fractions=[1.0]",
    "eval.snapshots=false",
    "progress=false",
    "seeds=[0]",
]


@pytest.mark.slow
@pytest.mark.parametrize("grid", GRIDS)
def test_grid_runs_every_variant_and_writes_the_report(grid, tmp_path):
    cmd = [sys.executable, "-m", "experiments.train", "-m", f"grid={grid}", f"data.root={tmp_path / 'data'}",
           f"results_root={tmp_path / 'results'}", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    grid_dir = tmp_path / "results" / grid
    from omegaconf import OmegaConf

    variants = OmegaConf.load(Path(__file__).parents[2] / "experiments" / "conf" / "grid" / f"{grid}.yaml").grid.variants
    # One progress line per run (experiments.progress), the last with every run finished.
    progress = [line for line in proc.stdout.splitlines() if f"[assignbench] grid {grid}: " in line and "finished (" in line]
    assert len(progress) == len(variants), proc.stdout[-3000:]
    assert f"{len(variants)}/{len(variants)} runs finished (0 failed)" in progress[-1] and progress[-1].endswith("none left")
    runs = sorted(p.name for p in grid_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert runs == sorted(f"{v}-s0" for v in variants)
    for run in runs:
        metrics = json.loads((grid_dir / run / "metrics.json").read_text())
        assert metrics["status"] == "done", (run, metrics["error"])
        assert metrics["iters"] == 2
        assert (grid_dir / run / "eval_matches.npz").is_file()
        source = OmegaConf.load(Path(__file__).parents[2] / "experiments" / "conf" / "variants"
                                / f"{run.rsplit('-s', 1)[0]}.yaml").get("rescore_from")
        if source:  # a variant that only changes inference shares its sibling's weights
            assert metrics["rescored_from"] == f"{source}-s0", run
    for name in ("table.md", "table.csv", "table.tex", "grid.json", "errors.md", "errors.png", "detections.png",
                 "report.html"):
        assert (grid_dir / name).exists(), name
    grid_file = json.loads((grid_dir / "grid.json").read_text())
    assert len(grid_file["variants"]) == len(variants) and grid_file["baseline"] in grid_file["variants"]


@pytest.mark.slow
def test_a_grid_runs_through_the_submitit_launcher_and_resumes(tmp_path):
    """The cluster path (``hydra/launcher=submitit_slurm``) with Hydra's ``submitit_local`` launcher: the same
    plugin, with local processes instead of SLURM jobs. Every run done, the report written; a rerun trains
    nothing (the metrics files are not rewritten)."""
    cmd = [sys.executable, "-m", "experiments.train", "-m", "grid=demo", "hydra/launcher=submitit_local",
           f"data.root={tmp_path / 'data'}", f"results_root={tmp_path / 'results'}", *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    grid_dir = tmp_path / "results" / "demo"
    metrics = sorted(grid_dir.glob("*-s0/metrics.json"))
    assert [m.parent.name for m in metrics] == ["atss_centerness-s0", "iou_none-s0", "paa_iou-s0"]
    assert all(json.loads(m.read_text())["status"] == "done" for m in metrics)
    assert (grid_dir / "table.md").is_file() and (grid_dir / "report.html").is_file()
    assert (grid_dir / ".submitit").is_dir()  # the jobs went through submitit
    written = {m: m.stat().st_mtime_ns for m in metrics}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {m: m.stat().st_mtime_ns for m in metrics} == written
    logs = "".join(p.read_text() for p in (grid_dir / ".submitit").rglob("*_log.out"))
    assert logs.count("already done, skipped") == 3
