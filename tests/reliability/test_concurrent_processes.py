"""Two processes started on the same grid never train the same run, nor corrupt each other's files.

Defined behaviour: each run is trained by exactly one process; the other skips it, because it
finds the run's ``RunLock`` held or the run already done, and moves on to the next run. The
files of every run are complete (``metrics.json`` done, one ``stats.csv`` row per iteration).
The processes of one torchrun job are one trainer, not competitors: rank 0 takes the lock and
the other ranks follow its decision.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from . import REPO_ROOT, app_env, run_dir, start_app, stats_iters, tiny_overrides


@pytest.mark.slow
def test_two_processes_on_one_grid_train_each_run_exactly_once(tmp_path):
    overrides = tiny_overrides(tmp_path, "schedule.iters=12")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    processes = [start_app("-m", *overrides, "assigner=max_iou,atss", log=log) for log in logs]
    try:
        for process, log in zip(processes, logs):
            assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    outputs = [log.read_text() for log in logs]
    for run_name in ("max_iou_none-s0", "atss_none-s0"):
        run = run_dir(tmp_path, run_name)
        trained = [output.count(f"{run}: AP ") for output in outputs]
        skipped = [
            output.count(f"{run}: another process holds its lock, skipped") + output.count(f"{run}: already done, skipped")
            for output in outputs
        ]
        assert sorted(trained) == [0, 1] and sorted(skipped) == [0, 1], (run_name, outputs)
        assert trained.index(1) == skipped.index(0)
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["status"] == "done" and metrics["iters"] == 12
        assert stats_iters(run) == list(range(1, 13))


@pytest.mark.slow
def test_the_ranks_of_one_torchrun_job_train_the_run_together(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "experiments.train", *tiny_overrides(tmp_path)]
    proc = subprocess.run(command, cwd=REPO_ROOT, env={**app_env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=150)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    run = run_dir(tmp_path, "max_iou_none-s0")
    assert "skipped" not in output
    assert output.count(f"{run}: AP ") == 1  # reported once, by rank 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "done" and metrics["iters"] == 4
    assert stats_iters(run) == [1, 2, 3, 4]
