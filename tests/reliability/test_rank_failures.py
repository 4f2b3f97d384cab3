"""A failure on one rank of a torchrun job ends every rank, and the run records which rank failed and why.

Defined behaviour (2 gloo processes on the CPU under ``torch.distributed.run``): when one rank fails
(a corrupt image that only its shard reads, a non-finite loss that only it sees), that rank records
the run ``failed`` in ``metrics.json`` with ``error`` = ``rank <r> of <W>: <the error>``, and every
rank ends within seconds, not at the communication timeout (30 min): the job exits non-zero well
within 60 s of the failure. The failure reaches the other ranks through the job's c10d store
(``experiments.distributed.FailureWatch``), also when the failing rank stays alive and the others
are blocked in a collective (as with NCCL, or ranks on other nodes).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from experiments.build import build_datasets

from . import REPO_ROOT, app_env, build_tiny_digits, compose_tiny, run_dir, tiny_overrides

WITHIN = 60.0  # seconds from the failure to the end of the job


def torchrun(*args: str, timeout: float = 400) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 <args>`` in the repository root,
    one intra-op thread a process; (the finished process, the time.time() it ended). The timeout is for
    a busy machine's start-up; what is asserted is the time from the failure to the end."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(command, cwd=REPO_ROOT, env={**app_env(), "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=timeout)
    return proc, time.time()


def failed_record(tmp_path: Path, ended: float) -> str:
    """The ``error`` of the failed run, checked to be recorded at most ``WITHIN`` s before the job ended."""
    metrics_file = run_dir(tmp_path, "max_iou_none-s0") / "metrics.json"
    metrics = json.loads(metrics_file.read_text())
    assert metrics["status"] == "failed" and metrics["AP"] is None, metrics
    assert ended - metrics_file.stat().st_mtime < WITHIN
    return metrics["error"]


@pytest.mark.slow
def test_a_corrupt_image_only_one_rank_reads_ends_every_rank_and_names_the_rank(tmp_path):
    build_tiny_digits(tmp_path)
    overrides = tiny_overrides(tmp_path)
    # The first image of rank 1's first batch (batch 2 over 2 ranks: 1 image per rank), as the engine's
    # DistributedSampler deals it (seed 0, epoch seed * 100003 = 0); rank 0 never reads it.
    train_set = build_datasets(compose_tiny(overrides))[0]
    shards = []
    for rank in (0, 1):
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sampler.set_epoch(0)
        shards.append(list(sampler))
    index = shards[1][0]
    assert index not in shards[0]
    image_id = train_set.ids[index]
    broken = train_set.image_path(image_id)
    broken.write_bytes(b"\x89PNG but not really")

    proc, ended = torchrun("-m", "experiments.train", *overrides)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    error = failed_record(tmp_path, ended)
    assert error.startswith(f"rank 1 of 2: DatasetError: cannot read image {broken} (image id {image_id})"), error


NAN_ON_RANK_1 = """
    import os

    import detector
    from experiments.train import main

    real_call, calls = detector.DetectionLoss.__call__, []

    def call(self, *args, **kwargs):  # rank 1's loss is NaN at its second step; rank 0's stays finite
        losses, info = real_call(self, *args, **kwargs)
        calls.append(None)
        if os.environ["RANK"] == "1" and len(calls) == 2:
            losses = {**losses, "loss_cls": losses["loss_cls"] * float("nan")}
        return losses, info

    detector.DetectionLoss.__call__ = call
    main()
"""


@pytest.mark.slow
def test_a_non_finite_loss_on_one_rank_ends_every_rank_and_names_the_rank(tmp_path):
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(textwrap.dedent(NAN_ON_RANK_1))
    proc, ended = torchrun(str(script), *tiny_overrides(tmp_path))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    error = failed_record(tmp_path, ended)
    assert error.startswith("rank 1 of 2: NonFiniteLossError: non-finite loss at iteration 2: loss_cls=nan"), error


BLOCKED_RANK_0 = """
    import sys
    import time

    import torch.distributed as dist
    from experiments.distributed import FailureWatch, setup_distributed

    info = setup_distributed()
    watch = FailureWatch(info, "scope").start()
    dist.barrier()
    if info.rank == 1:  # fails, records, announces, and stays alive: its sockets stay open
        assert watch.claim()
        print("rank 1 announces", time.time(), flush=True)
        watch.announce(f"{info.describe()}: boom")
        time.sleep(600)
    else:
        dist.barrier()  # waits for rank 1, which never comes: only the watch can end this process
        sys.exit(0)
"""


@pytest.mark.slow
def test_the_watch_ends_a_rank_blocked_in_a_collective_while_the_failing_rank_lives(tmp_path):
    script = tmp_path / "blocked_rank_0.py"
    script.write_text(textwrap.dedent(BLOCKED_RANK_0))
    proc, ended = torchrun(str(script))
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "[assignbench] scope: rank 0 of 2 stops: rank 1 of 2: boom" in output, output[-3000:]
    announced = float(output.split("rank 1 announces ", 1)[1].split()[0])
    assert ended - announced < WITHIN  # one poll (1 s), the exit, torchrun ending rank 1: seconds when idle
