"""The assigner contract: inputs, outputs, the ``Assigner`` base class and per-GT statistics.

Every assigner is an ``Assigner``: a callable ``assigner(AssignInputs) -> Assignment``. It is a
pure function of tensors: it never mutates its inputs, is batched over images (padded GT rows
are masked out), and works on whatever device the anchors live on. Its parameters are
validated once, in its constructor; the functions it calls assume valid parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .geometry import batched_box_iou

NEGATIVE = -1
IGNORED = -2


@dataclass(frozen=True)
class AssignInputs:
    """Everything an assigner may look at for one batch.

    anchors: (A, 4) float xyxy pixels, levels concatenated in order (P3..P7 for COCO).
    num_anchors_per_level: list[int], sums to A.
    gt_boxes: (B, G, 4) float xyxy pixels, padded with arbitrary values where ``gt_mask`` is False.
    gt_labels: (B, G) int64 in [0, C), padded.
    gt_mask: (B, G) bool, True for a real GT.
    cls_logits: (B, A, C) detached class logits, or None for static assigners.
    pred_boxes: (B, A, 4) detached decoded xyxy boxes, or None.
    strides: list[int] stride in pixels of each level (one entry per level), or None; for
        assigners with centre priors.
    """

    anchors: Tensor
    num_anchors_per_level: list[int]
    gt_boxes: Tensor
    gt_labels: Tensor
    gt_mask: Tensor
    cls_logits: Tensor | None = None
    pred_boxes: Tensor | None = None
    strides: list[int] | None = None

    def __post_init__(self) -> None:
        a = self.anchors.shape[0]
        if self.anchors.dim() != 2 or self.anchors.shape[1] != 4:
            raise ValueError(f"anchors must be (A, 4), got {tuple(self.anchors.shape)}")
        if sum(self.num_anchors_per_level) != a:
            raise ValueError(
                f"num_anchors_per_level sums to {sum(self.num_anchors_per_level)}, "
                f"but there are {a} anchors"
            )
        if self.gt_boxes.dim() != 3 or self.gt_boxes.shape[-1] != 4:
            raise ValueError(f"gt_boxes must be (B, G, 4), got {tuple(self.gt_boxes.shape)}")
        b, g = self.gt_boxes.shape[:2]
        if tuple(self.gt_labels.shape) != (b, g) or tuple(self.gt_mask.shape) != (b, g):
            raise ValueError(
                f"gt_labels {tuple(self.gt_labels.shape)} and gt_mask {tuple(self.gt_mask.shape)} "
                f"must both be (B, G) = {(b, g)}"
            )
        if self.cls_logits is not None and (
            self.cls_logits.dim() != 3 or tuple(self.cls_logits.shape[:2]) != (b, a)
        ):
            raise ValueError(f"cls_logits must be (B, A, C) = ({b}, {a}, C), got {tuple(self.cls_logits.shape)}")
        if self.pred_boxes is not None and tuple(self.pred_boxes.shape) != (b, a, 4):
            raise ValueError(f"pred_boxes must be (B, A, 4) = {(b, a, 4)}, got {tuple(self.pred_boxes.shape)}")
        if self.strides is not None and (
            len(self.strides) != len(self.num_anchors_per_level)
            or not all(stride > 0 for stride in self.strides)
        ):
            raise ValueError(
                f"strides must hold one positive stride per level ({len(self.num_anchors_per_level)} levels), "
                f"got {self.strides!r}"
            )

    @property
    def batch_size(self) -> int:
        return self.gt_boxes.shape[0]

    @property
    def num_gt_slots(self) -> int:
        return self.gt_boxes.shape[1]

    def require_predictions(self, who: str) -> None:
        """Raise a clear error when a prediction-aware assigner gets no predictions."""
        missing = [n for n in ("cls_logits", "pred_boxes") if getattr(self, n) is None]
        if missing:
            raise ValueError(
                f"assigner '{who}' scores anchors by the detector's predictions and needs "
                f"{' and '.join(missing)}; got None"
            )


@dataclass(frozen=True)
class Assignment:
    """Result of an assigner.

    gt_index: (B, A) int64; >= 0 is the index into G of the GT this anchor is positive for,
        -1 (NEGATIVE) background, -2 (IGNORED) excluded from the classification loss.
    num_candidates: (B, G) int64 or None; for candidate-based assigners, how many candidates
        each GT had (0 for padded rows). Used for statistics only.
    soft_target: (B, A) float in [0, 1] or None; the classification target of each positive
        anchor (read where ``gt_index >= 0``); None means a hard target of 1.0.
    """

    gt_index: Tensor
    num_candidates: Tensor | None = None
    soft_target: Tensor | None = None

    @property
    def positive_mask(self) -> Tensor:
        return self.gt_index >= 0

    @property
    def ignored_mask(self) -> Tensor:
        return self.gt_index == IGNORED

    def positives_per_gt(self, num_gt_slots: int) -> Tensor:
        """(B, G) int64 number of positive anchors per GT slot."""
        b = self.gt_index.shape[0]
        counts = torch.zeros(b, num_gt_slots + 1, dtype=torch.int64, device=self.gt_index.device)
        # Map negatives/ignored to an overflow bin G, then drop it.
        idx = torch.where(self.gt_index >= 0, self.gt_index, torch.full_like(self.gt_index, num_gt_slots))
        counts.scatter_add_(1, idx, torch.ones_like(idx))
        return counts[:, :num_gt_slots]


class Assigner:
    """Base class of every assigner: ``assigner(inputs) -> Assignment``.

    Subclasses implement ``assign`` and are registered with ``register_assigner``, which sets
    ``name`` (the registry key) and ``uses_predictions``. ``__call__`` checks, once, that a
    prediction-aware assigner got ``cls_logits`` and ``pred_boxes``, and runs ``assign`` under
    ``torch.no_grad()``; static assigners ignore predictions.
    """

    name: ClassVar[str]
    uses_predictions: ClassVar[bool]

    def __call__(self, inputs: AssignInputs) -> Assignment:
        if self.uses_predictions:
            inputs.require_predictions(self.name)
        with torch.no_grad():
            return self.assign(inputs)

    def assign(self, inputs: AssignInputs) -> Assignment:
        """The assignment of ``inputs``; predictions are present when ``uses_predictions``."""
        raise NotImplementedError


def check_positive_int(value: int, name: str) -> None:
    """Raise ValueError unless ``value`` is a positive int (a bool is not); ``name`` names it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int (1, 2, ...), got {value!r}")


def gt_anchor_iou(inputs: AssignInputs) -> Tensor:
    """(B, G, A) IoU of every GT slot with every anchor; padded GT rows are set to -1."""
    b = inputs.batch_size
    anchors = inputs.anchors.to(inputs.gt_boxes.dtype)
    iou = batched_box_iou(inputs.gt_boxes, anchors.unsqueeze(0).expand(b, -1, -1))
    return iou.masked_fill_(~inputs.gt_mask.unsqueeze(-1), -1.0)


def assignment_stats(inputs: AssignInputs, assignment: Assignment) -> dict[str, float]:
    """Per-batch positive-sample statistics written to ``stats.csv``.

    Returns num_gt, num_pos, pos_per_gt_mean, pos_per_gt_std (population std over real GTs),
    pos_iou_mean (mean IoU of positive anchors with their GT; NaN-free: 0 when no positives)
    and gt_without_pos (real GTs with no positive anchor).
    """
    mask = inputs.gt_mask
    per_gt = assignment.positives_per_gt(inputs.num_gt_slots)[mask].to(torch.float64)
    num_gt = int(mask.sum())
    pos = assignment.positive_mask
    num_pos = int(pos.sum())
    if num_pos > 0:
        # The IoU of each positive with its own GT only: the entries of ``gt_anchor_iou`` it would read.
        image, anchor = pos.nonzero(as_tuple=True)
        gt_boxes = inputs.gt_boxes[image, assignment.gt_index[image, anchor]].unsqueeze(1)  # (P, 1, 4)
        anchors = inputs.anchors[anchor].to(gt_boxes.dtype).unsqueeze(1)
        pos_iou_mean = float(batched_box_iou(gt_boxes, anchors).mean())
    else:
        pos_iou_mean = 0.0
    return {
        "num_gt": num_gt,
        "num_pos": num_pos,
        "pos_per_gt_mean": float(per_gt.mean()) if num_gt else 0.0,
        "pos_per_gt_std": float(per_gt.std(unbiased=False)) if num_gt else 0.0,
        "pos_iou_mean": pos_iou_mean,
        "gt_without_pos": int((per_gt == 0).sum()),
    }


__all__ = [
    "IGNORED",
    "NEGATIVE",
    "AssignInputs",
    "Assigner",
    "Assignment",
    "assignment_stats",
    "check_positive_int",
    "gt_anchor_iou",
]
