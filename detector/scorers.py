"""Scorers: what localization quality the head learns, and how it joins the class score.

A scorer gives (a) the quality target of each positive anchor, used as the target of the quality
branch and as the weight of its box loss, and (b) the unified detection score at inference.

- ``none``: no quality branch; every positive weighs 1; score = class probability.
- ``centerness``: ATSS/FCOS centerness of the anchor centre inside its GT.
- ``iou``: PAA's IoU prediction (Sec. 3.3): IoU of the decoded (detached) predicted box with its GT.

Quality scorers rank detections by sqrt(p_cls * sigmoid(quality)) (PAA Sec. 3.3 / official code;
the geometric mean keeps the score on the scale of a probability).
"""

from __future__ import annotations

import torch
from torch import Tensor


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """IoU of (..., 4) xyxy boxes with (..., 4) xyxy boxes, pair by pair -> (...,).

    Same formula as ``torchvision.ops.box_iou`` (no +1) but on matching pairs, so positives cost
    O(P) rather than the (P, P) matrix; ``eps`` keeps degenerate pairs at 0 instead of NaN.
    """
    lt = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    rb = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    return inter / (area1 + area2 - inter).clamp(min=eps)


def centerness(points: Tensor, boxes: Tensor, eps: float = 1e-12) -> Tensor:
    """FCOS/ATSS centerness of (P, 2) points w.r.t. (P, 4) xyxy boxes -> (P,) in [0, 1].

    sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) with the distances l, t, r, b from the
    point to the box sides, clamped at 0 so a point outside its box scores 0.
    """
    left = (points[:, 0] - boxes[:, 0]).clamp(min=0)
    top = (points[:, 1] - boxes[:, 1]).clamp(min=0)
    right = (boxes[:, 2] - points[:, 0]).clamp(min=0)
    bottom = (boxes[:, 3] - points[:, 1]).clamp(min=0)
    ratio_x = torch.minimum(left, right) / torch.maximum(left, right).clamp(min=eps)
    ratio_y = torch.minimum(top, bottom) / torch.maximum(top, bottom).clamp(min=eps)
    return torch.sqrt(ratio_x * ratio_y)


class NoScorer:
    """No quality branch: box loss unweighted (every positive weighs 1), score = class probability."""

    name = "none"
    uses_quality_branch = False

    def targets(self, anchors_pos: Tensor, pred_boxes_pos: Tensor, gt_boxes_pos: Tensor) -> Tensor:
        """(P,) ones: with unit weights the quality-weighted box loss is the plain mean over positives."""
        return torch.ones(anchors_pos.shape[0], dtype=gt_boxes_pos.dtype, device=gt_boxes_pos.device)

    def inference_score(self, cls_prob: Tensor, quality_logit: Tensor | None) -> Tensor:
        return cls_prob


class _QualityScorer:
    uses_quality_branch = True

    def inference_score(self, cls_prob: Tensor, quality_logit: Tensor | None) -> Tensor:
        """(N,) sqrt(cls_prob * sigmoid(quality_logit)) (PAA Sec. 3.3, official inference)."""
        if quality_logit is None:
            raise ValueError(f"scorer '{self.name}' needs the quality branch's logits; got None")
        return torch.sqrt(cls_prob * torch.sigmoid(quality_logit))


class CenternessScorer(_QualityScorer):
    """ATSS centerness of the anchor centre inside its GT box."""

    name = "centerness"

    def targets(self, anchors_pos: Tensor, pred_boxes_pos: Tensor, gt_boxes_pos: Tensor) -> Tensor:
        """(P,) centerness of each positive anchor's centre w.r.t. its GT; (P, 4) xyxy inputs."""
        centres = 0.5 * (anchors_pos[:, :2] + anchors_pos[:, 2:])
        return centerness(centres.to(gt_boxes_pos.dtype), gt_boxes_pos)


class IoUScorer(_QualityScorer):
    """PAA IoU prediction: IoU of the detached decoded box with its GT (PAA Sec. 3.3)."""

    name = "iou"

    def targets(self, anchors_pos: Tensor, pred_boxes_pos: Tensor, gt_boxes_pos: Tensor) -> Tensor:
        """(P,) IoU of each positive's detached predicted box with its GT; (P, 4) xyxy inputs."""
        return elementwise_box_iou(pred_boxes_pos.detach().to(gt_boxes_pos.dtype), gt_boxes_pos)


SCORERS = {"none": NoScorer, "centerness": CenternessScorer, "iou": IoUScorer}


def build_scorer(name: str) -> NoScorer | CenternessScorer | IoUScorer:
    """Scorer by name: ``none``, ``centerness`` or ``iou``."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer '{name}'; valid choices: {', '.join(SCORERS)}")
    return SCORERS[name]()
