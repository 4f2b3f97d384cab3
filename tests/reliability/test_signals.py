"""SIGINT / SIGTERM during training: checkpoint, exit, resume, and nothing lost or doubled.

Defined behaviour: a SIGINT or SIGTERM during training, sent to the main process or to its whole
process group (as Ctrl-C, ``scancel`` or ``docker stop`` do, data workers included), finishes the
current iteration, writes a checkpoint and exits with status 130, writing no ``metrics.json`` (the
run is neither done nor failed). The rerun resumes from that checkpoint and ends at the planned
iteration count with exactly one ``stats.csv`` row per iteration. Checkpoints load with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from . import count_stats_rows, run_dir, start_app, stats_iters, tiny_overrides, wait_until


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_group_checkpoints_exits_and_the_rerun_resumes(tmp_path, signum):
    # One data worker, and the signal goes to the whole group: the worker must not take the run down.
    overrides = tiny_overrides(tmp_path, "schedule.iters=20", "schedule.checkpoint_every=100", "data.num_workers=1")
    run = run_dir(tmp_path, "max_iou_none-s0")
    log = tmp_path / "first.log"
    first = start_app(*overrides, log=log, new_session=True)
    try:
        wait_until(lambda: count_stats_rows(run) >= 3, timeout=120, process=first, log=log)
        os.killpg(first.pid, signum)
        assert first.wait(timeout=60) == 130, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    output = log.read_text()
    assert f"interrupted: signal {signum.name} at iteration" in output
    assert "Traceback" not in output
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    stopped_at = state["iter"]
    assert 3 <= stopped_at < 20
    assert stats_iters(run) == list(range(1, stopped_at + 1))
    assert not (run / "metrics.json").exists()  # interrupted is neither done nor failed

    log = tmp_path / "second.log"
    second = start_app(*overrides, log=log)
    assert second.wait(timeout=180) == 0, log.read_text()[-3000:]
    assert f"resuming {run} from iteration {stopped_at}" in log.read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "done" and metrics["iters"] == 20
    assert stats_iters(run) == list(range(1, 21))
    assert torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["iter"] == 20
