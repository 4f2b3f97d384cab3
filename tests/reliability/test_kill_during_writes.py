"""kill -9 in the middle of a checkpoint or ``metrics.json`` write leaves the previous complete file.

Defined behaviour: run files are written to a temp file, fsynced and renamed over the old one
(``runfiles.atomic_write_bytes``), so after a kill -9 at any instant each file is one complete
version, never older than the last one that was complete. The temp file a kill leaves behind is
removed by the next run of that run directory (``remove_stale_temp_files`` under its lock).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from experiments.runfiles import METRIC_FIELDS, remove_stale_temp_files

from . import REPO_ROOT, wait_until

WRITER = """
import sys
from pathlib import Path

import torch

from experiments.checkpoint import save_checkpoint
from experiments.runfiles import METRIC_FIELDS, write_metrics

directory, version = Path(sys.argv[1]), int(sys.argv[2])
while True:
    # A 4 MB checkpoint and a ~40 kB metrics.json per version; each file says its version throughout.
    save_checkpoint(directory / "checkpoints" / "last.pt", {"iter": version, "model": {"w": torch.full((1 << 20,), float(version))}})
    metrics = {field: None for field in METRIC_FIELDS}
    metrics.update(status="done", iters=version, ap_curve=[[version, float(version)]] * 2000)
    write_metrics(directory / "metrics.json", metrics)
    version += 1
"""


def read_versions(directory: Path) -> tuple[int, int]:
    """(checkpoint version, metrics version), each checked to be one complete, self-consistent file."""
    state = torch.load(directory / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    weights = state["model"]["w"]
    assert weights.numel() == 1 << 20 and bool((weights == float(state["iter"])).all())
    metrics = json.loads((directory / "metrics.json").read_text())
    assert list(metrics) == METRIC_FIELDS
    assert metrics["ap_curve"] == [[metrics["iters"], float(metrics["iters"])]] * 2000
    return state["iter"], metrics["iters"]


def writing(directory: Path) -> bool:
    """True while a write is in flight in ``directory``: one of ``atomic_write_bytes``' temp files exists."""
    return any(directory.glob(".*.tmp")) or any(directory.glob("checkpoints/.*.tmp"))


def test_kill_9_while_writing_leaves_the_previous_complete_file(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(20240601)
    directories = [tmp_path / f"run{i}" for i in range(5)]
    versions = {d: (-1, -1) for d in directories}
    # A kill comes at a random moment, or as soon as a temp file shows, i.e. inside a write. A kill
    # that lands inside a write leaves its temp file; rounds go on until one did, two rounds at least
    # (each writer is killed, restarted and killed again). A restarted writer resumes as the engine
    # does, from its checkpoint's version, so it rewrites that version's metrics: starting one past
    # it would skip them, and a kill right after the next checkpoint would then leave metrics two
    # versions behind.
    mid_write_kills, rounds = 0, 0
    while rounds < 2 or (mid_write_kills == 0 and rounds < 4):
        rounds += 1
        writers = {
            d: subprocess.Popen([sys.executable, str(script), str(d), str(max(versions[d][0], 0))], cwd=REPO_ROOT)
            for d in directories
        }
        try:
            for directory, writer in writers.items():
                wait_until(lambda d=directory: (d / "metrics.json").exists(), timeout=60, process=writer)
                if rng.random() < 0.5:
                    time.sleep(rng.uniform(0.0, 0.4))
                else:
                    wait_until(lambda d=directory: writing(d), timeout=30, process=writer, interval=0.0005)
                writer.send_signal(signal.SIGKILL)
                writer.wait(timeout=30)
        finally:
            for writer in writers.values():
                if writer.poll() is None:
                    writer.kill()
                    writer.wait()
        for directory in directories:
            checkpoint_version, metrics_version = read_versions(directory)
            # Never older than what was there before; the metrics of a version follow its checkpoint.
            assert checkpoint_version >= versions[directory][0] and metrics_version >= versions[directory][1]
            assert metrics_version in (checkpoint_version - 1, checkpoint_version)
            versions[directory] = (checkpoint_version, metrics_version)
            # What the next run of this directory does first: drop the half-written temp files.
            mid_write_kills += len(remove_stale_temp_files(directory))
            assert not list(directory.rglob("*.tmp"))
            assert read_versions(directory) == versions[directory]
    assert mid_write_kills > 0, "no kill landed inside a write"
