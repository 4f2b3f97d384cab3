"""Reliability: bad input, crashes and numerical edge cases never lose results.

Helpers shared by the modules of this package: the overrides of a tiny digits run (96 px images,
a few dozen of them, a one-conv 32-channel head), composing them in-process, running the Hydra
app in a subprocess, and reading a run's files back.

Every run uses ``num_threads=1``: on a small, busy machine two intra-op threads make these tiny
steps about ten times slower than one.
"""

from __future__ import annotations

import contextlib
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]

TINY_RUN = [
    "schedule=debug",
    "model.fpn_channels=32",
    "model.num_convs=1",
    "data.num_workers=0",
    "eval.batch_size=6",
    "eval.curve_fractions=[1.0]",
    "eval.snapshots=false",
    "progress=false",
    "num_threads=1",
]
"""A tiny run on 96-px images; ``schedule=debug`` trains 4 iterations, logs each one and checkpoints every 2."""

DIGITS_PARAMS = {"image_size": 96, "num_train": 24, "num_val": 6}
"""What ``tiny_overrides`` changes in the digits config (``data.digits``); the rest stays as configured."""


def tiny_overrides(root: Path, *extra: str) -> list[str]:
    """A tiny digits run with data under ``root/data`` and results under ``root/results``, then ``extra``."""
    digits = [f"data.digits.{key}={value}" for key, value in DIGITS_PARAMS.items()]
    return [f"data.root={root / 'data'}", f"results_root={root / 'results'}", *TINY_RUN, *digits, *extra]


def tiny_coco_overrides(root: Path, coco_root: Path, *extra: str) -> list[str]:
    """A tiny run on the COCO-format folder ``coco_root`` (``data=coco``), results under ``root/results``."""
    return ["data=coco", f"data.root={coco_root}", f"results_root={root / 'results'}", *TINY_RUN, *extra]


def compose_tiny(overrides: list[str]) -> DictConfig:
    """The app's config for these overrides, composed in-process."""
    with initialize_config_module("experiments.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def build_tiny_digits(root: Path) -> Path:
    """Generate the digits set of ``tiny_overrides(root)`` as the engine would (same parameters, so the
    engine finds it complete and uses it as is); returns its folder under ``root/data``."""
    from experiments.data import build_digits

    cfg = compose_tiny(tiny_overrides(root))
    return build_digits(str(cfg.data.root), **OmegaConf.to_container(cfg.data.digits, resolve=True))


def run_dir(root: Path, run_name: str, grid: str = "single") -> Path:
    return root / "results" / grid / run_name


@contextlib.contextmanager
def restored_torch_threads():
    """The engine sets torch's thread count process-wide; give the rest of the test session its own back."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def execute_in_process(overrides: list[str], *, raise_on_failure: bool = False) -> dict | None:
    """``experiments.train.execute`` on the composed config, as the Hydra app calls it."""
    from experiments.train import execute

    with restored_torch_threads():
        return execute(compose_tiny(overrides), overrides, raise_on_failure=raise_on_failure)


def train_command(*args: str) -> list[str]:
    """The command line of the Hydra app (``assignbench-train``) with these arguments."""
    return [sys.executable, "-m", "experiments.train", *args]


def app_env() -> dict[str, str]:
    """Environment of an app subprocess: unbuffered output, so a killed process loses none of it, and
    Hydra's short error messages whatever the caller's ``HYDRA_FULL_ERROR``."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}


def start_app(*args: str, log: Path, new_session: bool = False) -> subprocess.Popen:
    """Start the app in the repository root, stdout and stderr to ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            train_command(*args), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=app_env(),
            start_new_session=new_session,
        )


def run_app(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the app to completion in the repository root; text output captured."""
    return subprocess.run(
        train_command(*args), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=app_env()
    )


def stats_iters(run: Path) -> list[int]:
    """The ``iter`` column of the run's ``stats.csv`` (rows parsed by ``csv``, header checked)."""
    from experiments.runfiles import STATS_FIELDS

    with open(run / "stats.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == STATS_FIELDS
        return [int(row["iter"]) for row in reader]


def count_stats_rows(run: Path) -> int:
    """Complete data rows in ``stats.csv`` now (0 while it does not exist); safe to poll mid-write."""
    try:
        text = (run / "stats.csv").read_text()
    except FileNotFoundError:
        return 0
    return max(0, text.count("\n") - 1)


def wait_until(
    condition, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None, interval: float = 0.05
) -> None:
    """Poll ``condition`` every ``interval`` s; fail on timeout or when ``process`` exits first (``log`` shown)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            pytest.fail(f"process exited with {process.returncode} first:\n{log.read_text()[-3000:] if log else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(interval)
