"""Scorers: what localization quality the head learns, and how it joins the class score.

A scorer gives (a) the quality target of each positive anchor, used as the target of the quality
branch and as the weight of its box loss, and (b) the unified detection score at inference.

- ``none``: no quality branch; every positive weighs 1; score = class probability.
- ``centerness``: ATSS/FCOS centerness of the anchor centre inside its GT.
- ``iou``: PAA's IoU prediction (Sec. 3.3): IoU of the decoded (detached) predicted box with its GT.
- ``qfl``: GFL's quality focal loss (Li et al., NeurIPS 2020, Eq. 5): no quality branch; the class
  score itself learns the localization quality.
- ``vfl``: VarifocalNet's varifocal loss (Zhang et al., CVPR 2021, Eq. 2): the same joint score
  with an asymmetric loss.

Quality scorers rank detections by sqrt(p_cls * sigmoid(quality)) (PAA Sec. 3.3 / official code;
the geometric mean keeps the score on the scale of a probability). The joint scorers (``qfl``,
``vfl``) rank by the class probability, which is their quality estimate.

Classification targets of positives: 1 on the GT class, or the assigner's ``soft_target`` when it
gives one (TAL, SimOTA, DSL). For the joint scorers the target is the quality target: the assigner's
``soft_target`` when it gives one, else the IoU of the detached predicted box with its GT (GFL and
VarifocalNet's IoU target); that same value weights the positive's box loss, as every scorer's
quality target does here (GFL weights its box loss by the predicted score instead; one rule for all
scorers keeps the comparison about the score).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import sigmoid_focal_loss


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
    ``has_quality_branch`` (the head needs a quality output), ``predicts_iou`` (the quality
    output estimates the IoU of the box, so its error against the true IoU is measured) and
    ``quality_in_classification`` (no quality branch: the positives' classification target is the
    quality target, and the class score is the detection score).

    cls_weight, box_weight, quality_weight: multipliers of the focal, GIoU and quality losses.
    """

    name = ""
    has_quality_branch = False
    predicts_iou = False
    quality_in_classification = False

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

    def classification_loss(self, logits: Tensor, targets: Tensor, focal_alpha: float, focal_gamma: float,
                            valid: Tensor | None = None) -> Tensor:
        """Summed classification loss of (..., C) logits against (..., C) targets in [0, 1] (the scorer's
        ``elementwise_classification_loss``), over the rows where the (...,) bool ``valid`` is True (all
        rows when None). A mask rather than a selection: it needs no host read of how many rows count."""
        loss = self.elementwise_classification_loss(logits, targets, focal_alpha, focal_gamma)
        if valid is not None:
            loss = torch.where(valid.unsqueeze(-1), loss, loss.new_zeros(()))
        return loss.sum()

    def elementwise_classification_loss(self, logits: Tensor, targets: Tensor, focal_alpha: float,
                                        focal_gamma: float) -> Tensor:
        """Classification loss of each logit, the shape of ``logits``: the sigmoid focal loss (alpha, gamma
        from the detector's loss), soft targets as torchvision takes them."""
        return sigmoid_focal_loss(logits, targets, alpha=focal_alpha, gamma=focal_gamma, reduction="none")


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
        return predicted_box_iou(pred_boxes_pos, gt_boxes_pos)


def predicted_box_iou(pred_boxes_pos: Tensor, gt_boxes_pos: Tensor) -> Tensor:
    """(P,) IoU of each (P, 4) detached predicted box with its (P, 4) GT box, in the GT's dtype."""
    return elementwise_box_iou(pred_boxes_pos.detach().to(gt_boxes_pos.dtype), gt_boxes_pos)


def _check_exponent(owner: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value < float("inf")):
        raise ValueError(f"scorer '{owner}': {name} must be a finite number >= 0, got {value!r}")
    return float(value)


class _JointScorer(Scorer):
    """The class score is the quality estimate: no quality branch, detection score = class probability,
    quality target = IoU of the detached predicted box (replaced by the assigner's soft target when it
    gives one, in ``DetectionLoss``)."""

    quality_in_classification = True

    def targets(self, anchors_pos: Tensor, pred_boxes_pos: Tensor, gt_boxes_pos: Tensor) -> Tensor:
        """(P,) IoU of each positive's detached predicted box with its GT; (P, 4) xyxy inputs."""
        return predicted_box_iou(pred_boxes_pos, gt_boxes_pos)

    def inference_score(self, cls_prob: Tensor, quality_logit: Tensor | None) -> Tensor:
        return cls_prob


@register_scorer("qfl")
class QualityFocalScorer(_JointScorer):
    """GFL's quality focal loss: sum over anchors and classes of |y - sigmoid(x)|^beta * BCE(x, y), y the
    soft target (the quality target on the positive's class, 0 elsewhere). Defaults as GFL's R50 config
    (mmdetection gfl_r50_fpn_1x_coco: QualityFocalLoss beta 2.0, loss_weight 1.0; GIoU loss_weight 2.0)."""

    def __init__(self, cls_weight: float = 1.0, box_weight: float = 2.0, quality_weight: float = 0.0,
                 beta: float = 2.0):
        super().__init__(cls_weight, box_weight, quality_weight)
        self.beta = _check_exponent(self.name, "beta", beta)

    def elementwise_classification_loss(self, logits: Tensor, targets: Tensor, focal_alpha: float,
                                        focal_gamma: float) -> Tensor:
        """QFL of each logit; the detector's focal alpha and gamma do not apply (QFL has neither)."""
        modulation = (targets - torch.sigmoid(logits)).abs().pow(self.beta)
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * modulation


@register_scorer("vfl")
class VarifocalScorer(_JointScorer):
    """VarifocalNet's varifocal loss: BCE(x, q) weighted by q where q > 0 (positives, IoU-weighted) and by
    alpha * sigmoid(x)^gamma where q = 0 (negatives only are down-weighted). Defaults as VFNet's R50 config
    (mmdetection vfnet_r50_fpn_1x_coco: VarifocalLoss alpha 0.75, gamma 2.0, iou_weighted, loss_weight 1.0;
    GIoU loss_weight 2.0 of its refined boxes, the boxes it scores)."""

    def __init__(self, cls_weight: float = 1.0, box_weight: float = 2.0, quality_weight: float = 0.0,
                 alpha: float = 0.75, gamma: float = 2.0):
        super().__init__(cls_weight, box_weight, quality_weight)
        self.alpha = _check_exponent(self.name, "alpha", alpha)
        self.gamma = _check_exponent(self.name, "gamma", gamma)

    def elementwise_classification_loss(self, logits: Tensor, targets: Tensor, focal_alpha: float,
                                        focal_gamma: float) -> Tensor:
        """VFL of each logit; its own alpha and gamma replace the detector's focal ones."""
        weight = torch.where(targets > 0, targets, self.alpha * (torch.sigmoid(logits) - targets).abs().pow(self.gamma))
        return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight


SCORERS = _SCORERS


def available_scorers() -> list[str]:
    """Registered scorer names, in registration order."""
    return list(_SCORERS)


def build_scorer(name: str, **weights: float) -> Scorer:
    """Scorer by registered name with its loss weights (defaults: the method's own, see each class)."""
    if name not in _SCORERS:
        raise ValueError(f"unknown scorer '{name}'; valid choices: {', '.join(_SCORERS)}")
    return _SCORERS[name](**weights)
