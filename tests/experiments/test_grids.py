"""Every grid runs end to end for 2 iterations per variant on tiny data (the sweep-test pattern),
writes one run per variant and seed, and ends with its report."""

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
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


def _submitit_task_pids(marker: str) -> list[int]:
    """Pids of submitit task processes (``python -u -m submitit.core._submit <folder>``) whose folder has marker."""
    pids = []
    for proc_dir in Path("/proc").iterdir():
        try:
            cmdline = (proc_dir / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        args = [a.decode(errors="replace") for a in cmdline]
        if "submitit.core._submit" in args and any(marker in a for a in args):
            pids.append(int(proc_dir.name))
    return pids


@pytest.mark.slow
def test_a_preempted_submitit_job_checkpoints_is_requeued_and_resumes_to_the_same_end(tmp_path):
    """SLURM preemption as submitit sees it: its signal (SIGUSR2) reaches the job's process mid-training. The
    run writes a checkpoint at that iteration (checkpoint_every is larger than the schedule, so no other
    checkpoint exists), submitit requeues the job, and the new process resumes there and ends at the same
    final iteration count, with one stats.csv row per iteration."""
    iters = 40
    cmd = [sys.executable, "-m", "experiments.train", "-m", "grid=single", "assigner=atss", "scorer=centerness",
           "hydra/launcher=submitit_local", f"data.root={tmp_path / 'data'}", f"results_root={tmp_path / 'results'}",
           *[o for o in TINY if not o.startswith("schedule.iters")], f"schedule.iters={iters}",
           "schedule.checkpoint_every=1000", "schedule.steps=[0.9]"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "results" / "single" / "atss_centerness-s0"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait for a few logged iterations (log_every 1)
            stats = run_dir / "stats.csv"
            if stats.is_file() and len(stats.read_text().splitlines()) >= 1 + 3:
                break
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        pids = _submitit_task_pids(str(tmp_path))
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGUSR2)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "done" and metrics["iters"] == iters
    logs = "".join(p.read_text() for p in (tmp_path / "results" / "single" / ".submitit").rglob("*_log.*"))
    interrupted = [int(m) for m in re.findall(r"signal SIGUSR2 at iteration (\d+): checkpoint written", logs)]
    resumed = [int(m) for m in re.findall(r"resuming \S+ from iteration (\d+)", logs)]
    assert len(interrupted) == 1 and 3 <= interrupted[0] < iters, logs[-3000:]
    assert resumed == interrupted, logs[-3000:]  # the new process started from that very checkpoint
    assert "Requeued job" in logs  # submitit's requeue, not a rerun by hand
    with open(run_dir / "stats.csv") as f:
        assert [int(row["iter"]) for row in csv.DictReader(f)] == list(range(1, iters + 1))


def test_the_readme_slurm_example_composes_to_the_launcher_settings_it_names():
    from hydra import compose, initialize_config_module

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = re.search(r"```bash\n(assignbench-train -m grid=table1_modules data=coco.*?)```", readme, re.S)
    assert block, "README's SLURM example is gone"
    args = shlex.split(block.group(1).replace("\\\n", " "))[2:]  # after "assignbench-train -m"
    with initialize_config_module(config_module="experiments.conf", version_base="1.3"):
        cfg = compose("config", overrides=args, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 1, 1)
    assert (launcher.timeout_min, launcher.signal_delay_s, launcher.max_num_timeout) == (720, 120, 5)
    assert launcher.additional_parameters == {"requeue": True}
    assert (cfg.data.name, cfg.grid.name) == ("coco", "table1_modules")
