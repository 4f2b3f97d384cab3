"""SimOTA (``simota``): YOLOX, Ge et al., 2021, Sec. 2.2 ("SimOTA").

As mmdetection's ``SimOTAAssigner`` (the YOLOX code before its objectness-free variants), batched
over images and GT slots. Per image, with u the IoU of each anchor's detached predicted box with a
GT and p the sigmoid of its class logits:
1. valid anchors: the anchor centre lies inside some GT box (smallest distance to a side > 0) or
   inside some GT's centre region, the square of half-side ``center_radius`` x the anchor's
   level stride around the GT centre (strictly);
2. cost of GT g for a valid anchor: ``cls_weight * sum_c BCE(p_c, onehot_c(g))``
   ``+ iou_weight * -log(u + 1e-7) + 1e5 * (not inside both g's box and g's centre region)``;
3. dynamic-k matching (``assigners.dynamic_k``): k from the ``candidate_topk`` largest u, each GT
   takes its k cheapest valid anchors, conflicts go to the cheapest GT; soft target = u.

Departures:
- p is the sigmoid of the class logits. YOLOX scores sqrt(class probability x objectness); this
  detector has no objectness branch, so neither the objectness nor the square root appear.
- The location of an anchor is its centre (mmdetection's YOLOX head offsets its zero-offset
  point priors by half a stride before assigning, which is the same point).
- The per-class BCE keeps torch's clamp of each log at -100, as ``F.binary_cross_entropy``
  does officially; the sum over classes is computed without a (B, G, A, C) tensor (the sum against
  all-zero targets, with the GT class's term swapped), from the valid anchors' logits only.
- The IoU is plain ``box_iou``, non-finite values as 0 (``base.predicted_iou``); an anchor whose
  cost is NaN (a NaN logit) is never taken.
- Ties: see ``assigners.dynamic_k``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import AssignInputs, anchor_strides, check_positive_int, check_real, predicted_iou
from .dynamic_k import DynamicKAssigner, ValidRows
from .geometry import box_centers, centers_inside_boxes
from .registry import register_assigner

IOU_EPS = 1e-7  # mmdetection's EPS in -log(IoU + EPS)
OUTSIDE_COST = 1e5  # mmdetection's INF, added where the anchor is not in both box and centre region
LOG_CLAMP = -100.0  # F.binary_cross_entropy clamps each log at -100


def negative_bce(logits: Tensor) -> Tensor:
    """-log(1 - sigmoid(x)), the BCE against a 0 target, with ``F.binary_cross_entropy``'s log clamp."""
    return -torch.log1p(-torch.sigmoid(logits)).clamp_(min=LOG_CLAMP)


def positive_bce(logits: Tensor) -> Tensor:
    """-log(sigmoid(x)), the BCE against a 1 target, with ``F.binary_cross_entropy``'s log clamp."""
    return -torch.log(torch.sigmoid(logits)).clamp_(min=LOG_CLAMP)


def one_hot_bce_cost(cls_logits: Tensor, gt_labels: Tensor, dtype: torch.dtype, rows: Tensor) -> Tensor:
    """(B, G, A) sum over classes of BCE(sigmoid(x_c), onehot_c(label of g)), as ``F.binary_cross_entropy``,
    at the anchors in ``rows``; the other anchors' entries are not the cost (the caller masks them).

    cls_logits: (B, A, C); gt_labels: (B, G) in [0, C) (padded slots: any valid class); rows: (B, A)
    bool. The sum against all-zero targets is taken per anchor, and the GT class's term swapped.
    """
    valid = ValidRows(cls_logits, gt_labels, rows, dtype)
    negative = negative_bce(valid.logits)  # (V, C)
    swap = positive_bce(valid.at_labels(valid.logits)) - valid.at_labels(negative)  # (V, G)
    return valid.scatter(swap.add_(negative.sum(dim=-1, keepdim=True)))


def centre_region_mask(centers: Tensor, gt_boxes: Tensor, half_side: Tensor) -> Tensor:
    """(B, G, A) bool: anchor centre strictly inside the square of half-side ``half_side`` (A,) px
    around each GT centre. centers: (A, 2); gt_boxes: (B, G, 4) xyxy."""
    gt_centre = box_centers(gt_boxes).unsqueeze(2)  # (B, G, 1, 2)
    x, y = centers[:, 0], centers[:, 1]
    gx, gy = gt_centre[..., 0], gt_centre[..., 1]
    return (
        ((x - (gx - half_side)) > 0)
        & ((y - (gy - half_side)) > 0)
        & (((gx + half_side) - x) > 0)
        & (((gy + half_side) - y) > 0)
    )


@register_assigner("simota", uses_predictions=True)
class SimOTAAssigner(DynamicKAssigner):
    """SimOTA; see the module docstring. Defaults: mmdetection's YOLOX configs (YOLOX's own code).

    center_radius: half-side of the centre region in strides (2.5); candidate_topk: IoUs summed for
    the dynamic k (10); iou_weight, cls_weight: weights of the IoU and class costs (3.0, 1.0).
    """

    def __init__(self, center_radius: float = 2.5, candidate_topk: int = 10, iou_weight: float = 3.0,
                 cls_weight: float = 1.0):
        self.center_radius = check_real(center_radius, "center_radius", low_inclusive=False)
        check_positive_int(candidate_topk, "candidate_topk")
        self.candidate_topk = candidate_topk
        self.iou_weight = check_real(iou_weight, "iou_weight")
        self.cls_weight = check_real(cls_weight, "cls_weight")

    def costs(self, inputs: AssignInputs) -> tuple[Tensor, Tensor]:
        dtype = inputs.gt_boxes.dtype
        centers = box_centers(inputs.anchors.to(dtype))
        real = inputs.gt_mask.unsqueeze(-1)  # (B, G, 1)
        in_box = centers_inside_boxes(centers, inputs.gt_boxes.unsqueeze(2), 0.0) & real  # (B, G, A)
        in_centre = centre_region_mask(centers, inputs.gt_boxes, self.center_radius * anchor_strides(inputs, self.name))
        in_centre &= real
        valid_anchor = (in_box | in_centre).any(dim=1)  # (B, A)
        valid = valid_anchor.unsqueeze(1) & real  # (B, G, A): valid anchor, real GT
        iou = predicted_iou(inputs).masked_fill_(~valid, 0.0)
        cost = one_hot_bce_cost(inputs.cls_logits, inputs.gt_labels, dtype, valid_anchor).mul_(self.cls_weight)
        cost.add_((iou + IOU_EPS).log_().mul_(-self.iou_weight))
        cost.add_((~(in_box & in_centre)).to(dtype).mul_(OUTSIDE_COST))
        cost.masked_fill_(~valid, float("inf"))
        return cost, iou


__all__ = ["SimOTAAssigner", "centre_region_mask", "negative_bce", "one_hot_bce_cost", "positive_bce"]
