"""The assigner contract: inputs, outputs, the ``Assigner`` base class and per-GT statistics.

Every assigner is an ``Assigner``: a callable ``assigner(AssignInputs) -> Assignment``. It is a
pure function of tensors: it never mutates its inputs, is batched over images (padded GT rows
are masked out), and works on whatever device the anchors live on. Its parameters are
validated once, in its constructor; the functions it calls assume valid parameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .geometry import batched_box_iou

NEGATIVE = -1
IGNORED = -2
# (GT slot, anchor) pairs an assigner with dense (B, G, A) costs handles at once: 8M pairs is 32 MiB
# per float32 matrix (``assign_in_image_chunks``).
DENSE_MAX_PAIRS = 1 << 23


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

    def require_strides(self, who: str) -> None:
        """Raise a clear error when an assigner with a centre prior measured in strides gets none."""
        if self.strides is None:
            raise ValueError(
                f"assigner '{who}' measures its centre prior in strides and needs AssignInputs.strides "
                "(one stride per level); got None"
            )

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

    def set_iteration(self, iteration: int) -> None:
        """Told the training iteration before each step; assigners with a schedule (TAL's ATSS
        warm-up) override this, the others ignore it."""


def all_negative(inputs: AssignInputs, *, soft_target: bool = False) -> Assignment:
    """Every anchor negative (no GT slot, no anchor, or no real GT); ``soft_target`` adds a (B, A)
    zero soft target in the GT boxes' dtype, for assigners that always give one."""
    b, a, device = inputs.batch_size, inputs.anchors.shape[0], inputs.anchors.device
    return Assignment(
        gt_index=torch.full((b, a), NEGATIVE, dtype=torch.int64, device=device),
        soft_target=torch.zeros(b, a, dtype=inputs.gt_boxes.dtype, device=device) if soft_target else None,
    )


def check_positive_int(value: int, name: str) -> None:
    """Raise ValueError unless ``value`` is a positive int (a bool is not); ``name`` names it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int (1, 2, ...), got {value!r}")


def check_real(value: float, name: str, *, low: float = 0.0, low_inclusive: bool = True,
               high: float | None = None) -> float:
    """``value`` as a float; ValueError naming ``name`` unless it is a finite real (not a bool) in
    [low, high] (or (low, high] when not ``low_inclusive``; no upper bound when ``high`` is None)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (value == low and not low_inclusive) or (high is not None and value > high):
        bracket = "[" if low_inclusive else "("
        upper = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name} must be in {bracket}{low}, {upper}, got {value!r}")
    return float(value)


def anchor_strides(inputs: AssignInputs, who: str) -> Tensor:
    """(A,) stride in pixels of each anchor's level, in the anchors' dtype and device.

    Raises ValueError naming ``who`` when ``inputs.strides`` is None (``require_strides``).
    """
    inputs.require_strides(who)
    counts = torch.tensor(inputs.num_anchors_per_level, device=inputs.anchors.device)
    strides = torch.tensor([float(s) for s in inputs.strides], dtype=inputs.gt_boxes.dtype, device=inputs.anchors.device)
    return strides.repeat_interleave(counts)


def assign_in_image_chunks(
    assign: Callable[[AssignInputs], Assignment], inputs: AssignInputs, max_pairs: int
) -> Assignment:
    """``assign(inputs)`` run on consecutive groups of images, each with at most ``max_pairs`` (GT slot,
    anchor) pairs (at least one image per group), and the results concatenated along the batch.

    Images are independent for every assigner, so the result equals one call on the whole batch;
    what it bounds is the memory of the (B, G, A) cost matrices of the dense-cost assigners
    (200 GTs x 20k anchors is 4M pairs per image).
    """
    b, g, a = inputs.batch_size, inputs.num_gt_slots, inputs.anchors.shape[0]
    per_group = max(1, max_pairs // max(1, g * a))
    if per_group >= b:
        return assign(inputs)
    parts = []
    for start in range(0, b, per_group):
        images = slice(start, start + per_group)
        parts.append(assign(dataclasses.replace(
            inputs,
            gt_boxes=inputs.gt_boxes[images],
            gt_labels=inputs.gt_labels[images],
            gt_mask=inputs.gt_mask[images],
            cls_logits=None if inputs.cls_logits is None else inputs.cls_logits[images],
            pred_boxes=None if inputs.pred_boxes is None else inputs.pred_boxes[images],
        )))

    def joined(field: str) -> Tensor | None:
        values = [getattr(part, field) for part in parts]
        return None if values[0] is None else torch.cat(values)

    return Assignment(gt_index=joined("gt_index"), num_candidates=joined("num_candidates"),
                      soft_target=joined("soft_target"))


def gt_anchor_iou(inputs: AssignInputs) -> Tensor:
    """(B, G, A) IoU of every GT slot with every anchor; padded GT rows are set to -1."""
    anchors = inputs.anchors.to(inputs.gt_boxes.dtype)
    iou = batched_box_iou(inputs.gt_boxes, anchors.unsqueeze(0))  # the anchors broadcast over the batch
    return iou.masked_fill_(~inputs.gt_mask.unsqueeze(-1), -1.0)


def predicted_iou(inputs: AssignInputs) -> Tensor:
    """(B, G, A) IoU of every GT slot with every anchor's predicted box, in the GT boxes' dtype.

    Plain ``box_iou`` semantics; values that are not finite (NaN predictions) count as 0, and the
    result is clamped to [0, 1] (an inverted predicted box has a negative area), so that costs such
    as -log(IoU) stay defined.
    """
    pred = inputs.pred_boxes.to(inputs.gt_boxes.dtype)
    return batched_box_iou(inputs.gt_boxes, pred).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0).clamp_(0.0, 1.0)


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
    "DENSE_MAX_PAIRS",
    "IGNORED",
    "NEGATIVE",
    "AssignInputs",
    "Assigner",
    "Assignment",
    "all_negative",
    "assignment_stats",
    "anchor_strides",
    "assign_in_image_chunks",
    "check_positive_int",
    "check_real",
    "gt_anchor_iou",
    "predicted_iou",
]
