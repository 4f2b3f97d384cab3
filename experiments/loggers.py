"""Optional experiment loggers (``logger=tensorboard``): a copy of a run's statistics for live viewing.

``stats.csv`` and ``metrics.json`` stay the source of truth; a logger receives the same values from
``LoggerHook`` (the stats.csv rows as they are written, each evaluation's AP, the learning rate, the
assignment snapshot as an image). A new backend (MLflow, W&B) is one more class with the three
methods of ``TensorBoardLogger`` and one more name in ``LOGGERS``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .trainer import HookBase

LOGGERS = ("none", "tensorboard")
TENSORBOARD_DIR = "tensorboard"  # inside the run directory


class TensorBoardLogger:
    """Event files under ``log_dir`` (``torch.utils.tensorboard.SummaryWriter``; the ``tb`` extra)."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard itself is missing
            raise ConfigError(
                "logger=tensorboard needs the tensorboard package: pip install 'assignbench[tb]'") from exc
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_image(self, tag: str, step: int, image: np.ndarray) -> None:
        """image: (H, W, 3) uint8."""
        self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def build_logger(name: str, run_dir: Path) -> TensorBoardLogger | None:
    """The logger called ``name`` writing inside ``run_dir`` (None for "none"); ConfigError for others."""
    if name == "none":
        return None
    if name == "tensorboard":
        return TensorBoardLogger(run_dir / TENSORBOARD_DIR)
    raise ConfigError(f"unknown logger {name!r}; valid choices: {', '.join(LOGGERS)}")


def snapshot_image(path: Path, it: int) -> np.ndarray | None:
    """(H, W, 3) uint8: the snapshot image of ``assignments.npz`` with its GT boxes (white) and, at iteration
    ``it``, each positive anchor's box in the colour of its GT; None when the file has no such iteration."""
    from torchvision.utils import draw_bounding_boxes

    palette = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    if not path.exists():
        return None
    with np.load(path) as snapshot:
        if f"gt_index_{it}" not in snapshot.files:
            return None
        gt_index = torch.from_numpy(snapshot[f"gt_index_{it}"])
        anchors = torch.from_numpy(snapshot["anchors"]).float()
        gt_boxes = torch.from_numpy(snapshot["gt_boxes"]).float()
        image = torch.from_numpy(snapshot["image"]).permute(2, 0, 1).contiguous()
    positive = gt_index >= 0
    boxes = torch.cat([anchors[positive], gt_boxes])
    colours = [palette[int(g) % len(palette)] for g in gt_index[positive].tolist()] + ["#ffffff"] * len(gt_boxes)
    if len(boxes):
        image = draw_bounding_boxes(image, boxes, colors=colours, width=1)
    return image.permute(1, 2, 0).numpy()


class LoggerHook(HookBase):
    """Hands the logger what the other hooks just recorded, on the iterations they recorded it.

    stats: the ``StatsHook`` (its ``last_row`` and ``last_images_per_second``); evaluation: the ``EvalHook``
    (its ``last_ap``); snapshots: the ``assignments.npz`` path, or None without snapshots. Registered after
    them, so it sees this step's values. Scalars: ``train/<stats.csv column>``, ``train/lr`` (first
    parameter group), ``train/images_per_second``, ``eval/<AP name>``; image: ``assignment``.
    """

    def __init__(self, logger: Any, stats: Any, evaluation: Any, snapshots: Path | None):
        self.logger, self.stats, self.evaluation, self.snapshots = logger, stats, evaluation, snapshots

    def after_step(self) -> None:
        it = self.trainer.state.iter
        row = self.stats.last_row
        if row is not None and row["iter"] == it:
            values = {f"train/{key}": value for key, value in row.items() if key != "iter"}
            values["train/lr"] = float(self.trainer.optimizer.param_groups[0]["lr"])
            values["train/images_per_second"] = self.stats.last_images_per_second
            self.logger.log_scalars(it, values)
        if self.evaluation.last_ap is not None and self.evaluation.last_iter == it:
            self.logger.log_scalars(it, {f"eval/{k}": v for k, v in self.evaluation.last_ap.items() if v is not None})
            image = snapshot_image(self.snapshots, it) if self.snapshots is not None else None
            if image is not None:
                self.logger.log_image("assignment", it, image)

    def after_train(self) -> None:
        self.logger.close()


__all__ = ["LOGGERS", "TENSORBOARD_DIR", "LoggerHook", "TensorBoardLogger", "build_logger", "snapshot_image"]
