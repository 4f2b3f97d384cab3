"""The trainer's hooks, one periodic job each (detectron2's ``engine/hooks.py`` is the model).

The engine registers them in this order, which is also the order they act in after a step:
``AssignerIterationHook`` (tells the assigner the next iteration, for schedules such as TAL's
ATSS warm-up), ``ProgressHook``, ``StatsHook`` (stats.csv rows and log lines), ``FiniteWeightsHook``,
``EvalHook`` (evaluation, ``ap_curve``), ``SnapshotHook`` (assignment of a fixed val image),
``LoggerHook`` (``logger=tensorboard``, ``experiments.loggers``), ``CheckpointHook``,
``StopSignalHook`` (SIGINT/SIGTERM -> checkpoint and ``RunInterrupted``; under submitit its
preemption signal -> checkpoint and submitit's requeue).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import check_finite_state, save_checkpoint
from .errors import DeadlineReached, RunInterrupted
from .runfiles import LOSS_FIELDS, StatsWriter
from .trainer import HookBase

log = logging.getLogger("experiments.engine")


class AssignerIterationHook(HookBase):
    """Tells ``assigner.set_iteration`` the index (0-based) of the step about to run: before training
    (the resumed iteration) and after each step. Assigners without a schedule ignore it."""

    def __init__(self, assigner: Any):
        self.assigner = assigner

    def _tell(self) -> None:
        set_iteration = getattr(self.assigner, "set_iteration", None)
        if set_iteration is not None:
            set_iteration(self.trainer.state.iter)

    def before_train(self) -> None:
        self._tell()

    def after_step(self) -> None:
        self._tell()


class ProgressHook(HookBase):
    """A tqdm bar over the iterations; while it shows, log lines are printed above it."""

    def __init__(self, desc: str, total_batch: int):
        self.desc, self.total_batch = desc, total_batch
        self.bar = None
        self._redirect = contextlib.ExitStack()

    def before_train(self) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        state = self.trainer.state
        self.bar = tqdm(total=state.max_iter, initial=state.iter, desc=self.desc, dynamic_ncols=True, leave=False)
        self._redirect.enter_context(logging_redirect_tqdm())

    def after_step(self) -> None:
        step = self.trainer.step_output
        self.bar.update(1)
        if step.synced:  # reading the loss of an unsynced step would make the host wait for the device
            self.bar.set_postfix(loss=f"{float(step.total.detach()):.3f}", ips=f"{self.total_batch / step.seconds:.1f}")

    def after_train(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self._redirect.close()


class StatsHook(HookBase):
    """Every ``log_every`` iterations (and the last): one stats.csv row of window means, one log line.

    writer: a ``StatsWriter`` (None on ranks other than 0: they keep no statistics).
    total_batch: images per step over all processes (for the img/s of the log line).
    quiet: log the line at DEBUG (a progress bar shows the run) instead of INFO.

    Nothing is read from the device between logged iterations: each step leaves its detached loss
    terms, its assignment (with the GT and anchors it was made from, without the predictions) and
    its ``AssignTimer`` in the window, and the row is computed from them when it is written. The
    values are the same as reading them step by step.
    """

    def __init__(self, writer: StatsWriter | None, log_every: int, total_batch: int, quiet: bool):
        self.writer = writer
        self.log_every = max(1, int(log_every))
        self.total_batch = total_batch
        self.quiet = quiet
        self.window: list[tuple[dict, Any, Any, Any]] = []
        self.window_seconds = 0.0
        self.last_row: dict[str, float] | None = None  # the row last written, for loggers (LoggerHook)
        self.last_images_per_second = float("nan")

    def after_step(self) -> None:
        step, state = self.trainer.step_output, self.trainer.state
        if self.writer is not None:
            inputs = dataclasses.replace(step.info["inputs"], cls_logits=None, pred_boxes=None)
            losses = {k: v.detach() for k, v in step.losses.items()}
            self.window.append((losses, inputs, step.info["assignment"], step.info["assign_ms"]))
        self.window_seconds += step.seconds
        if state.iter % self.log_every == 0 or state.iter == state.max_iter:
            if self.writer is not None:
                self._write(state.iter, state.max_iter)
            self.window.clear()
            self.window_seconds = 0.0

    def _rows(self) -> list[dict[str, float]]:
        from assigners import assignment_stats

        rows = []
        for losses, inputs, assignment, timer in self.window:
            row = {k: float(v) for k, v in losses.items()}
            row.update(assignment_stats(inputs, assignment))
            row["assign_ms"] = float(timer)
            rows.append(row)
        return rows

    def _write(self, it: int, iters: int) -> None:
        rows = self._rows()
        means = {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}
        self.last_row = {"iter": it, **means}
        self.last_images_per_second = len(rows) * self.total_batch / self.window_seconds
        self.writer.write(self.last_row)
        # stats.csv has the contract's loss columns; the log line names every loss term the model trains
        # (a two-stage model's box-head losses, loss_roi_*, too) and sums them all.
        loss_names = [*LOSS_FIELDS, *sorted(k for k in means if k.startswith("loss_") and k not in LOSS_FIELDS)]
        log.log(logging.DEBUG if self.quiet else logging.INFO,
                "iter %d/%d  loss %.4f (%s)  pos/GT %.2f  GT without pos %g  %.1f img/s",
                it, iters, sum(means[k] for k in loss_names), "  ".join(
                    f"{k.removeprefix('loss_')} {means[k]:.4f}" for k in loss_names),
                means["pos_per_gt_mean"], means["gt_without_pos"], self.last_images_per_second)

    def after_train(self) -> None:
        if self.writer is not None:
            self.writer.close()


def requeue_signal() -> signal.Signals | None:
    """The signal submitit sends a job before its preemption or time limit and answers by requeueing it:
    SIGUSR2, or the one ``SUBMITIT_PREEMPT_SIGNAL`` names (submitit's ``JobEnvironment.USR_SIG``); None when
    that name is no signal."""
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


class StopSignalHook(HookBase):
    """Turns SIGINT/SIGTERM into a flag; after the step it arrived in, checkpoint and raise RunInterrupted.
    The same after the first step that ends past ``deadline`` (a Unix time), raising DeadlineReached.

    Under a scheduler's job (submitit, as Hydra's ``submitit_slurm``/``submitit_local`` launchers run it), the
    preemption signal (``requeue_signal``) already has a handler, submitit's, which resubmits the job and exits
    the process. The hook takes that signal over too: after the step it arrived in, it writes the checkpoint,
    gives the handlers back and calls submitit's, so the resubmitted job resumes from exactly that iteration
    (SIGTERM, which SLURM also sends on ``scancel``, keeps its meaning: stop, checkpoint written).

    checkpoint: writes the checkpoint (``CheckpointHook.save``).
    """

    def __init__(self, checkpoint: Callable[[], None], deadline: float | None = None):
        self.checkpoint = checkpoint
        self.deadline = deadline
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def before_train(self) -> None:
        signals = [signal.SIGINT, signal.SIGTERM]
        requeue = requeue_signal()
        if requeue is not None and requeue not in signals and callable(signal.getsignal(requeue)):
            signals.append(requeue)  # a Python handler is there: the scheduler's (submitit's)
        for s in signals:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread (e.g. a launcher's worker thread)
                pass

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def after_step(self) -> None:
        state = self.trainer.state
        if state.iter >= state.max_iter:
            return
        if self.signum is not None:
            self.checkpoint()
            scheduler_handler = self._old.get(self.signum) if self.signum == requeue_signal() else None
            if callable(scheduler_handler):
                log.warning("signal %s at iteration %d: checkpoint written, handing over to the scheduler's "
                            "handler (requeue)", signal.Signals(self.signum).name, state.iter)
                self.after_train()  # its handlers back first: the resubmission may be signalled again
                scheduler_handler(self.signum, None)  # submitit: requeues the job and exits this process
            raise RunInterrupted(
                f"signal {signal.Signals(self.signum).name} at iteration {state.iter}; checkpoint written, "
                "rerun to resume"
            )
        if self.deadline is not None and time.time() >= self.deadline:
            self.checkpoint()
            raise DeadlineReached(f"deadline passed at iteration {state.iter}; checkpoint written, rerun to resume")

    def after_train(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


class FiniteWeightsHook(HookBase):
    """Before anything scores or saves the model (evaluation, checkpoint, stop), check its weights are finite."""

    def __init__(self, eval_iters: frozenset[int], checkpoint_every: int, stop: StopSignalHook):
        self.eval_iters, self.checkpoint_every, self.stop = eval_iters, int(checkpoint_every), stop

    def after_step(self) -> None:
        it = self.trainer.state.iter
        if it in self.eval_iters or it % self.checkpoint_every == 0 or self.stop.signum is not None:
            check_finite_state(self.trainer.model, it)


class EvalHook(HookBase):
    """At each of ``eval_iters``: evaluate, append [iter, AP] to ``ap_curve``; the last one is the result.

    evaluate: () -> (AP dict, IoU-prediction error or None, COCO results list); every rank calls it
    (``engine.make_evaluator``: the same AP on every rank, the results on rank 0).
    """

    def __init__(self, evaluate: Callable[[], tuple[dict, float | None, list]], eval_iters: frozenset[int],
                 run_name: str, is_main: bool):
        self.evaluate, self.eval_iters, self.run_name, self.is_main = evaluate, eval_iters, run_name, is_main
        self.last_ap: dict | None = None  # the latest evaluation and its iteration, for loggers (LoggerHook)
        self.last_iter = -1

    def run(self) -> dict:
        """Evaluate now; the state keeps the AP, the error and the detections as the latest result."""
        from .evaluation import summarize_ap

        state = self.trainer.state
        ap, state.iou_pred_error, state.last_results = self.evaluate()
        self.last_ap, self.last_iter = ap, state.iter
        if self.is_main:
            log.info("[%s] iter %d: %s", self.run_name, state.iter, summarize_ap(ap))
        return ap

    def after_step(self) -> None:
        state = self.trainer.state
        if state.iter in self.eval_iters:
            ap = self.run()
            state.ap_curve.append([state.iter, ap["AP"]])
            if state.iter == state.max_iter:
                state.final_ap = ap


class SnapshotHook(HookBase):
    """At each of ``eval_iters``: the assignment of a fixed val image into ``assignments.npz``.

    record: (iteration) -> None, writes the snapshot (``experiments.snapshots.record_snapshot``).
    """

    def __init__(self, record: Callable[[int], None], eval_iters: frozenset[int]):
        self.record, self.eval_iters = record, eval_iters

    def after_step(self) -> None:
        it = self.trainer.state.iter
        if it in self.eval_iters:
            self.record(it)


class CheckpointHook(HookBase):
    """``checkpoints/last.pt`` at each evaluation and every ``checkpoint_every`` iterations (rank 0 writes)."""

    def __init__(self, path: Path, eval_iters: frozenset[int], checkpoint_every: int, is_main: bool,
                 barrier: Callable[[], None]):
        self.path, self.eval_iters, self.checkpoint_every = Path(path), eval_iters, int(checkpoint_every)
        self.is_main, self.barrier = is_main, barrier

    def save(self) -> None:
        if self.is_main:
            save_checkpoint(self.path, self.trainer.checkpoint_state())
        self.barrier()

    def after_step(self) -> None:
        it = self.trainer.state.iter
        if it in self.eval_iters or it % self.checkpoint_every == 0:
            self.save()


__all__ = [
    "CheckpointHook",
    "EvalHook",
    "FiniteWeightsHook",
    "ProgressHook",
    "SnapshotHook",
    "StatsHook",
    "StopSignalHook",
]
