"""Fault injection: a training run killed with SIGKILL at random points, again and again, loses nothing.

A short run (36 iterations, a checkpoint every 5, a row per iteration, evaluations at 18 and 36)
is started, killed with SIGKILL and restarted six times. Kill points come from a seeded RNG: either
when ``stats.csv`` reaches a row count (random, increasing from kill to kill so the kills spread
over the whole run, plus a random few hundred ms, so some land in a row, checkpoint or evaluation
write), or a random 1-6 s after the start (some of those land in start-up or resume). The last
start runs to the end. The finished run must hold:
the planned iteration count, a ``stats.csv`` with exactly one complete row per iteration in
order (no duplicate, no torn line), one AP-curve point per evaluation, a valid ``metrics.json``
with status done, a checkpoint at the last iteration, and no temp file left behind.
"""

from __future__ import annotations

import json
import random
import signal
import time

import pytest
import torch

from experiments.runfiles import STATS_FIELDS

from . import build_tiny_digits, count_stats_rows, run_dir, start_app, stats_iters, tiny_overrides

ITERS = 36
KILLS = 6
SEED = 7


@pytest.mark.slow
def test_repeated_sigkill_and_restart_finishes_the_run_with_complete_files(tmp_path):
    build_tiny_digits(tmp_path)  # generated once, outside the kill loop
    overrides = tiny_overrides(
        tmp_path, f"schedule.iters={ITERS}", "schedule.checkpoint_every=5", "schedule.log_every=1",
        "eval.curve_fractions=[0.5,1.0]",
    )
    run = run_dir(tmp_path, "max_iou_none-s0")
    rng = random.Random(SEED)
    log = tmp_path / "train.log"
    row_targets = iter(sorted(rng.sample(range(2, ITERS - 2), KILLS)))
    kills = 0
    for _ in range(KILLS):
        by_rows, target_rows = rng.random() < 0.6, next(row_targets)
        process = start_app(*overrides, log=log)
        try:
            if by_rows:
                deadline = time.monotonic() + 120
                while count_stats_rows(run) < target_rows and process.poll() is None:
                    assert time.monotonic() < deadline, log.read_text()[-3000:]
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 0.3))
            else:
                time.sleep(rng.uniform(1.0, 6.0))
            assert process.poll() is None, f"the run ended before its kill:\n{log.read_text()[-3000:]}"
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
            kills += 1
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert kills >= 5

    final = start_app(*overrides, log=log)
    assert final.wait(timeout=240) == 0, log.read_text()[-3000:]

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "done" and metrics["error"] is None
    assert metrics["iters"] == ITERS and 0.0 <= metrics["AP"] <= 100.0
    assert [point[0] for point in metrics["ap_curve"]] == [ITERS // 2, ITERS]

    text = (run / "stats.csv").read_text()
    lines = text.split("\n")
    assert text.endswith("\n") and lines[-1] == ""
    assert lines[0] == ",".join(STATS_FIELDS)
    assert all(len(line.split(",")) == len(STATS_FIELDS) for line in lines[1:-1])
    assert stats_iters(run) == list(range(1, ITERS + 1))

    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert state["iter"] == ITERS
    assert not list(run.rglob("*.tmp"))
