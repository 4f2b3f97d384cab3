"""``assignbench-train``: the Hydra app that trains and evaluates one run per job.

    assignbench-train data=digits schedule=quick assigner=max_iou      # results/runs/single/max_iou_none-s0/
    assignbench-train -m grid=demo                                     # every variant of a grid

A run whose ``metrics.json`` says done is skipped; an interrupted run resumes from its
checkpoint; a failed run is recorded as failed and, in a multirun, the grid goes on (under torchrun a
failure on any rank ends the whole job instead: ``execute``).
"""

from __future__ import annotations

import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from . import engine
from .data import DatasetError
from .distributed import FailureWatch, as_on_rank_zero, setup_distributed
from .errors import ConfigError, DeadlineReached, NonFiniteLossError, RunInterrupted
from .runfiles import RunLock, RunPaths, read_metrics, remove_stale_temp_files, run_is_done, run_name

# Failures whose message says all there is to say (which value, file or iteration): no traceback.
EXPECTED_FAILURES = (ConfigError, DatasetError, NonFiniteLossError)


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(str(cfg.results_root)) / str(cfg.grid.name) / str(cfg.run_name)


def rescore_sibling(cfg: DictConfig, paths: RunPaths, overrides: list[str]) -> dict:
    """Re-score ``<grid>/<rescore_from>-s<seed>`` into this run; the two must train alike."""
    from .rescore import check_same_training, rescore_run

    source = paths.run_dir.parent / run_name(str(cfg.rescore_from), int(cfg.seed))
    if not RunPaths(source).config.is_file():
        raise ConfigError(f"rescore_from={cfg.rescore_from}: {source} has not run yet (list it before this variant)")
    check_same_training(source, cfg)
    return rescore_run(source, cfg, overrides)


def _claim_run(paths: RunPaths) -> tuple[str, RunLock | None]:
    """Whether this process trains the run: ("train", its held lock), ("done", None) or ("locked", None)."""
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    if run_is_done(paths.run_dir):
        return "done", None
    lock = RunLock(paths.run_dir)
    if not lock.acquire():
        return "locked", None
    if run_is_done(paths.run_dir):  # finished by another process between the check and the lock
        lock.release()
        return "done", None
    return "train", lock


def execute(cfg: DictConfig, overrides: list[str], raise_on_failure: bool) -> dict | None:
    """Run one job with skip/lock/failure handling; returns its metrics (None if skipped by lock).

    Under torchrun, rank 0 alone checks and locks the run directory and the other ranks follow its
    decision, so the processes of one job never take each other for a concurrent grid. A failure on
    any rank ends every rank of the job (``FailureWatch``; a multirun stops too: after one rank left a
    collective, the others cannot go on together), exit status 1: the first rank to fail records the
    run failed, its ``error`` naming the rank (``rank 1 of 2: DatasetError: ...``).
    """
    paths = RunPaths(run_dir_of(cfg))
    dist_info = setup_distributed()
    decision, lock = _claim_run(paths) if dist_info.is_main else ("", None)
    decision = as_on_rank_zero(decision, dist_info)
    if decision == "done":
        if dist_info.is_main:
            print(f"[assignbench] {paths.run_dir}: already done, skipped")
        return read_metrics(paths.metrics)
    if decision == "locked":
        if dist_info.is_main:
            print(f"[assignbench] {paths.run_dir}: another process holds its lock, skipped")
        return None
    watch = FailureWatch(dist_info, str(paths.run_dir)).start()
    try:
        if dist_info.is_main:
            remove_stale_temp_files(paths.run_dir)  # left by a process killed mid-write; we hold the lock
            engine.write_resolved_config(paths, cfg)
        try:
            if cfg.get("deadline") and time.time() >= float(cfg.deadline):
                raise DeadlineReached("deadline passed before the run started")
            if cfg.get("rescore_from"):  # a variant that re-scores a sibling run's weights (experiments.rescore)
                metrics = rescore_sibling(cfg, paths, overrides)
            else:
                metrics = engine.train_run(cfg, paths.run_dir, overrides)
        except DeadlineReached as exc:  # the grid goes on: its later runs stop (or skip) the same way
            print(f"[assignbench] {paths.run_dir}: stopped: {exc}", file=sys.stderr)
            return None
        except RunInterrupted as exc:
            print(f"[assignbench] {paths.run_dir}: interrupted: {exc}", file=sys.stderr)
            raise SystemExit(130) from None
        except Exception as exc:  # recorded; in one process it never takes the grid's other runs down
            error = f"{type(exc).__name__}: {exc}"
            if dist_info.world_size > 1:
                if not watch.claim():  # another rank failed first and recorded it: this is its consequence
                    print(f"[assignbench] {paths.run_dir}: {dist_info.describe()} stops after another rank's "
                          f"failure: {error}", file=sys.stderr, flush=True)
                    raise SystemExit(1) from None
                error = f"{dist_info.describe()}: {error}"
            engine.record_failure(paths, cfg, overrides, error)
            print(f"[assignbench] {paths.run_dir}: FAILED: {error}", file=sys.stderr, flush=True)
            if not isinstance(exc, EXPECTED_FAILURES):
                traceback.print_exc()
            watch.announce(error)  # after the record: the other ranks exit as soon as they read it
            if raise_on_failure or dist_info.world_size > 1:
                raise SystemExit(1) from None
            return read_metrics(paths.metrics)
        if dist_info.is_main:
            print(
                f"[assignbench] {paths.run_dir}: AP {metrics['AP']:.1f} (AP50 {metrics['AP50']:.1f}, "
                f"AP75 {metrics['AP75']:.1f}), {metrics['images_per_second']} img/s, "
                f"{metrics['train_seconds']:.0f} s training; results in {paths.run_dir}"
            )
        return metrics
    finally:
        watch.stop()
        if lock is not None:
            lock.release()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    multirun = hc.mode == RunMode.MULTIRUN
    metrics = execute(cfg, overrides, raise_on_failure=not multirun)
    if metrics and metrics.get("status") == "done":
        return metrics.get("AP")
    return None


if __name__ == "__main__":
    main()
