"""The training loop: ``Trainer.run_step`` does one optimiser step and nothing else; every periodic
job (statistics, evaluation, checkpoints, snapshots, stop signals, the progress bar) is a hook
(``experiments.hooks``), as detectron2's ``SimpleTrainer`` and ``HookBase``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import torch

from .errors import NonFiniteLossError


def outputs_to_float(out):
    """Autocast leaves head outputs in bf16; losses and assignment run in float32."""
    changes = {}
    for f in ("cls_logits", "box_deltas", "quality"):
        v = getattr(out, f, None)
        if v is not None and v.dtype != torch.float32:
            changes[f] = v.float()
    return dataclasses.replace(out, **changes) if changes else out


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast on CUDA when asked; a no-op context otherwise."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@dataclasses.dataclass
class StepOutput:
    """What one step leaves for the hooks: the loss terms (scalar tensors), the loss's ``info``
    (``assign_ms``, ``inputs``, ``assignment``) and the step's wall seconds."""

    losses: dict[str, torch.Tensor]
    info: dict[str, Any]
    seconds: float
    synced: bool = True  # the host waited for the device at the end of this step (values are ready)

    @property
    def total(self) -> torch.Tensor:
        return sum(self.losses.values())


@dataclasses.dataclass
class TrainState:
    """The state checkpoints carry besides the weights, and the results the hooks gather."""

    iter: int
    max_iter: int
    train_seconds: float = 0.0
    ap_curve: list[list[float]] = dataclasses.field(default_factory=list)
    final_ap: dict[str, float | None] | None = None
    iou_pred_error: float | None = None
    last_results: list[dict] = dataclasses.field(default_factory=list)  # rank 0's; [] on the other ranks


class HookBase:
    """A periodic job of the trainer; override any of the three calls. ``self.trainer`` is set on register."""

    trainer: Trainer

    def before_train(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_train(self) -> None:
        pass


class Trainer:
    """One process's optimisation loop over ``batches``; hooks run in the order given.

    model: the detector (evaluated and checkpointed); train_model: what runs the forward pass (the
    model itself, or its DistributedDataParallel wrapper); criterion: ``DetectionLoss``.
    sync_every: the host waits for the device, and checks that the losses were finite, every this many
    iterations (and at the last); 1 checks every step. On a GPU a check per step stalls the launch
    queue, so the engine sets the logging interval there: a non-finite loss is then reported, with its
    own iteration and terms, at the next check, having trained at most ``sync_every - 1`` more steps.
    """

    def __init__(self, model, train_model, criterion, optimizer, scheduler, batches: Iterator, device: torch.device,
                 state: TrainState, autocast_dtype: torch.dtype | None = None, hooks: list[HookBase] = (),
                 sync_every: int = 1):
        self.model, self.train_model, self.criterion = model, train_model, criterion
        self.optimizer, self.scheduler = optimizer, scheduler
        self.batches, self.device, self.state, self.autocast_dtype = batches, device, state, autocast_dtype
        self.sync_every = max(1, int(sync_every))
        self._unchecked: list[tuple[int, dict[str, torch.Tensor]]] = []
        self.step_output: StepOutput | None = None
        self.hooks: list[HookBase] = []
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def run_step(self) -> StepOutput:
        """Load a batch, forward, assign + losses, backward, optimiser and LR step; advance ``state.iter``.

        Raises NonFiniteLossError when a total loss is NaN/Inf: before this step's backward pass with
        ``sync_every=1``, else at the next check.
        """
        t0 = time.perf_counter()
        images, targets = next(self.batches)
        images = images.to(self.device, non_blocking=True)
        targets = [{k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        with autocast(self.device, self.autocast_dtype):
            out = self.train_model(images)
        losses, info = self.criterion(outputs_to_float(out), targets)
        total = sum(losses.values())
        self._unchecked.append((self.state.iter + 1, {k: v.detach() for k, v in losses.items()}))
        if self.sync_every == 1:
            self.check_losses()
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.state.iter += 1
        synced = self.state.iter % self.sync_every == 0 or self.state.iter >= self.state.max_iter
        if synced:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.check_losses()
        seconds = time.perf_counter() - t0
        self.state.train_seconds += seconds
        return StepOutput(losses, info, seconds, synced)

    def check_losses(self) -> None:
        """Raise NonFiniteLossError for the first unchecked step whose total loss is not finite (one
        device read for all of them)."""
        steps, self._unchecked = self._unchecked, []
        if not steps:
            return
        totals = torch.stack([sum(losses.values()) for _, losses in steps])
        finite = torch.isfinite(totals).tolist()
        if all(finite):
            return
        it, losses = steps[finite.index(False)]
        terms = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
        raise NonFiniteLossError(f"non-finite loss at iteration {it}: {terms}")

    def train(self) -> TrainState:
        """Run steps until ``state.max_iter``; ``after_train`` hooks run whatever happens."""
        try:
            for hook in self.hooks:
                hook.before_train()
            self.model.train()
            while self.state.iter < self.state.max_iter:
                self.step_output = self.run_step()
                for hook in self.hooks:
                    hook.after_step()
        finally:
            for hook in reversed(self.hooks):
                hook.after_train()
        return self.state

    def checkpoint_state(self) -> dict[str, Any]:
        """What ``checkpoints/last.pt`` holds: weights, optimiser and LR state, iteration, time, AP curve."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "iter": self.state.iter,
            "train_seconds": self.state.train_seconds,
            "ap_curve": self.state.ap_curve,
        }


__all__ = ["HookBase", "StepOutput", "TrainState", "Trainer", "autocast", "outputs_to_float"]
