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


_SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(name: str):
    """Class decorator: register a scorer under ``name`` and set its ``name`` attribute."""

    def decorate(cls: type[Scorer]) -> type[Scorer]:
        if name in _SCORERS:
            raise ValueError(f"scorer '{name}' is registered twice ({_SCORERS[name].__name__}, {cls.__name__})")
        cls.name = name
        _SCORERS[name] = cls
        return cls

    return decorate


class Scorer:
    """What the quality branch learns and how it joins the class score; carries its loss weights.

    Capabilities, read by the model builder, the loss and the evaluation instead of the name:
    ``has_quality_branch`` (the head needs a quality output) and ``predicts_iou`` (the quality
    output estimates the IoU of the box, so its error against the true IoU is measured).

    cls_weight, box_weight, quality_weight: multipliers of the focal, GIoU and quality losses.
    """

    name = ""
    has_quality_branch = False
    predicts_iou = False

    def __init__(self, cls_weight: float = 1.0, box_weight: float = 1.3, quality_weight: float = 0.0):
        for key, value in (("cls_weight", cls_weight), ("box_weight", box_weight), ("quality_weight", quality_weight)):
            if not (isinstance(value, int | float) and value >= 0 and value == value):
                raise ValueError(f"scorer '{self.name}': {key} must be a number >= 0, got {value!r}")
        self.cls_weight = float(cls_weight)
        self.box_weight = float(box_weight)
        self.quality_weight = float(quality_weight)

    @property
    def uses_quality_branch(self) -> bool:  # the name the detector and older callers use
        return self.has_quality_branch

    def targets(self, anchors_pos: Tensor, pred_boxes_pos: Tensor, gt_boxes_pos: Tensor) -> Tensor:
        """(P,) quality target of each positive; (P, 4) xyxy anchors, detached predicted boxes, GT boxes."""
        raise NotImplementedError

    def inference_score(self, cls_prob: Tensor, quality_logit: Tensor | None) -> Tensor:
        """(N,) detection score from the class probability and the quality logit."""
        raise NotImplementedError


@register_scorer("none")
class NoScorer(Scorer):
    """No quality branch: box loss unweighted (every positive weighs 1), score = class probability."""

    def targets(self, anchors_pos: Tensor, pred_boxes_pos: Tensor, gt_boxes_pos: Tensor) -> Tensor:
        """(P,) ones: with unit weights the quality-weighted box loss is the plain mean over positives."""
        return torch.ones(anchors_pos.shape[0], dtype=gt_boxes_pos.dtype, device=gt_boxes_pos.device)

    def inference_score(self, cls_prob: Tensor, quality_logit: Tensor | None) -> Tensor:
        return cls_prob


class _QualityScorer(Scorer):
    has_quality_branch = True

    def inference_score(self, cls_prob: Tensor, quality_logit: Tensor | None) -> Tensor:
        """(N,) sqrt(cls_prob * sigmoid(quality_logit)) (PAA Sec. 3.3, official inference)."""
        if quality_logit is None:
            raise ValueError(f"scorer '{self.name}' needs the quality branch's logits; got None")
        return torch.sqrt(cls_prob * torch.sigmoid(quality_logit))


@register_scorer("centerness")
class CenternessScorer(_QualityScorer):
    """ATSS centerness of the anchor centre inside its GT box; loss weights as ATSS (GIoU 2.0, centerness 1.0)."""

    def __init__(self, cls_weight: float = 1.0, box_weight: float = 2.0, quality_weight: float = 1.0):
        super().__init__(cls_weight, box_weight, quality_weight)

    def targets(self, anchors_pos: Tensor, pred_boxes_pos: Tensor, gt_boxes_pos: Tensor) -> Tensor:
        """(P,) centerness of each positive anchor's centre w.r.t. its GT; (P, 4) xyxy inputs."""
        centres = 0.5 * (anchors_pos[:, :2] + anchors_pos[:, 2:])
        return centerness(centres.to(gt_boxes_pos.dtype), gt_boxes_pos)


@register_scorer("iou")
class IoUScorer(_QualityScorer):
    """PAA IoU prediction: IoU of the detached decoded box with its GT (PAA Sec. 3.3); loss weights
    as the official PAA config (GIoU 1.3, IoU 0.5)."""

    predicts_iou = True

    def __init__(self, cls_weight: float = 1.0, box_weight: float = 1.3, quality_weight: float = 0.5):
        super().__init__(cls_weight, box_weight, quality_weight)

    def targets(self, anchors_pos: Tensor, pred_boxes_pos: Tensor, gt_boxes_pos: Tensor) -> Tensor:
        """(P,) IoU of each positive's detached predicted box with its GT; (P, 4) xyxy inputs."""
        return elementwise_box_iou(pred_boxes_pos.detach().to(gt_boxes_pos.dtype), gt_boxes_pos)


SCORERS = _SCORERS


def available_scorers() -> list[str]:
    """Registered scorer names, in registration order."""
    return list(_SCORERS)


def build_scorer(name: str, **weights: float) -> Scorer:
    """Scorer by registered name with its loss weights (defaults: the method's own, see each class)."""
    if name not in _SCORERS:
        raise ValueError(f"unknown scorer '{name}'; valid choices: {', '.join(_SCORERS)}")
    return _SCORERS[name](**weights)
