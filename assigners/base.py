"""The assigner contract: inputs, outputs, per-GT statistics and shared IoU helpers.

Every assigner is a callable ``assigner(AssignInputs) -> Assignment``. It is a pure
function of tensors: it never mutates its inputs, is batched over images (padded GT
rows are masked out), and works on whatever device the anchors live on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

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
    """

    anchors: Tensor
    num_anchors_per_level: list[int]
    gt_boxes: Tensor
    gt_labels: Tensor
    gt_mask: Tensor
    cls_logits: Tensor | None = None
    pred_boxes: Tensor | None = None

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
    """

    gt_index: Tensor
    num_candidates: Tensor | None = None

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


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of (B, N, 4) with (B, M, 4) xyxy boxes -> (B, N, M); plain ``box_iou`` semantics.

    ``torchvision.ops.box_iou`` is 2-D only; this is the same formula (no +1 pixel
    convention) broadcast over a batch, and is tested against it.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    # One (B, N, M) tensor per coordinate, updated in place, from contiguous coordinate
    # vectors, rather than (B, N, M, 2) corner tensors: the same arithmetic (bitwise-equal
    # results), several times faster on CPU. The in-place steps make it unfit for
    # autograd; it serves the (no-grad) assigners.
    x1a, y1a, x2a, y2a = (c.unsqueeze(-1) for c in boxes1.unbind(-1))  # (B, N, 1)
    x1b, y1b, x2b, y2b = (c.contiguous().unsqueeze(-2) for c in boxes2.unbind(-1))  # (B, 1, M)
    width = torch.minimum(x2a, x2b).sub_(torch.maximum(x1a, x1b)).clamp_(min=0)
    height = torch.minimum(y2a, y2b).sub_(torch.maximum(y1a, y1b)).clamp_(min=0)
    inter = width.mul_(height)
    union = (area1[..., :, None] + area2[..., None, :]).sub_(inter)
    return inter.div_(union) if inter.is_floating_point() else inter / union


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
    "AssignInputs",
    "Assignment",
    "IGNORED",
    "NEGATIVE",
    "assignment_stats",
    "batched_box_iou",
    "box_iou",
    "gt_anchor_iou",
]
