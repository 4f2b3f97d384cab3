"""A grid's progress: after every run, one line with the runs finished, the time spent and the time left.

    [assignbench] grid demo: 2/3 runs finished (0 failed), elapsed 9m12s, about 4m36s left

A Hydra callback (registered for every sweep in ``conf/config.yaml``). It reads the state from the
grid directory, not from memory, so it gives the same answer in the parallel launchers' worker
processes: the runs of ``grid.variants`` x ``seeds`` whose metrics.json says done or failed, and the
sweep's start time and the runs finished before it (``.progress.json``, written when the sweep
starts). The time left is the time per run finished in this sweep so far (elapsed / finished since
the start, so parallel jobs count as they overlap) times the runs left; runs skipped as already done
do not count as finished in this sweep.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .runfiles import DONE, FAILED, METRICS_FILE, atomic_write_text, read_metrics, run_name

PROGRESS_FILE = ".progress.json"
log = logging.getLogger("experiments.engine")


def expected_runs(config: DictConfig) -> list[str]:
    """Run names of the grid: every variant of ``grid.variants`` with every seed of ``seeds``."""
    variants = list(config.grid.get("variants") or [])
    seeds = list(config.get("seeds") or [config.get("seed", 0)])
    return [run_name(str(v), int(s)) for v in variants for s in seeds]


def finished_runs(grid_dir: Path, names: list[str]) -> tuple[int, int]:
    """(finished, failed) among the runs ``names`` of ``grid_dir``: metrics.json status done or failed."""
    statuses = [(read_metrics(grid_dir / name / METRICS_FILE) or {}).get("status") for name in names]
    return sum(s in (DONE, FAILED) for s in statuses), sum(s == FAILED for s in statuses)


def format_seconds(seconds: float) -> str:
    """``1h02m03s``, ``4m05s`` or ``7s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(grid: str, finished: int, failed: int, total: int, elapsed: float, finished_in_sweep: int) -> str:
    """The progress line; the time left is unknown until a run has finished in this sweep."""
    left = total - finished
    if left <= 0:
        eta = "none left"
    elif finished_in_sweep > 0:
        eta = f"about {format_seconds(left * elapsed / finished_in_sweep)} left"
    else:
        eta = "time left unknown yet"
    return (f"[assignbench] grid {grid}: {finished}/{total} runs finished ({failed} failed), "
            f"elapsed {format_seconds(elapsed)}, {eta}")


class GridProgress(Callback):
    """Writes the sweep's start when it starts; logs ``progress_line`` after each run."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        names = expected_runs(config)
        if not names:
            return
        grid_dir = Path(str(config.results_root)) / str(config.grid.name)
        grid_dir.mkdir(parents=True, exist_ok=True)
        finished, _ = finished_runs(grid_dir, names)
        atomic_write_text(grid_dir / PROGRESS_FILE, json.dumps({"start": time.time(), "finished_before": finished}))

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        grid_dir = Path(str(config.results_root)) / str(config.grid.name)
        names = expected_runs(config)
        try:
            sweep = json.loads((grid_dir / PROGRESS_FILE).read_text())
        except (OSError, ValueError):  # a single run, or a sweep started before this callback existed
            return
        finished, failed = finished_runs(grid_dir, names)
        line = progress_line(str(config.grid.name), finished, failed, len(names), time.time() - float(sweep["start"]),
                             finished - int(sweep["finished_before"]))
        log.info(line)  # Hydra's job logging shows it on the console and writes it to the log


__all__ = ["GridProgress", "expected_runs", "finished_runs", "format_seconds", "progress_line"]
