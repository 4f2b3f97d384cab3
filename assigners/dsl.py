"""Dynamic soft label assignment (``dsl``): RTMDet, Lyu et al., 2022, Sec. 3.3.

As mmdetection's ``DynamicSoftLabelAssigner`` (RTMDet's official code), batched over images and GT
slots. Per image, with u the IoU of each anchor's detached predicted box with a GT, x the anchor's
class logits and p = sigmoid(x):
1. valid anchors: the anchor centre lies inside some GT box (smallest distance to a side > 0);
2. cost of GT g for a valid anchor, the sum of
   - the soft classification cost ``sum_c BCEwithlogits(x_c, y_c) * |y_c - p_c|^2`` with the soft
     label y = onehot(g's class) * u,
   - ``iou_weight * -log(u + 1e-7)``,
   - the soft centre prior ``10 ** (d / stride - soft_center_radius)``, d the distance in pixels
     from the anchor centre to the GT centre and stride the anchor's level stride;
3. dynamic-k matching (``assigners.dynamic_k``) with k from the ``topk`` largest u; soft target = u.

Departures:
- The anchor's location is its centre (RTMDet's point priors have offset 0 and are compared as
  they are; with this detector's anchors the centre is the location its box is regressed from).
- The sum over classes is computed without a (B, G, A, C) tensor: the cost against all-zero
  labels, with the GT class's term swapped for its soft-label term, from the valid anchors'
  logits only.
- The IoU is plain ``box_iou``, non-finite values as 0 (``base.predicted_iou``); an anchor whose
  cost is NaN (a NaN logit) is never taken.
- Memory: mmdetection builds the (valid anchors, G, C) soft-label tensors, which is what runs out of
  GPU memory on images with many GTs; here the costs are (B, G, A) and images are assigned in groups
  of at most ``DENSE_MAX_PAIRS`` (GT slot, anchor) pairs.
- Ties: see ``assigners.dynamic_k``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .base import AssignInputs, anchor_strides, check_positive_int, check_real, predicted_iou
from .dynamic_k import DynamicKAssigner, ValidRows
from .geometry import box_centers, centers_inside_boxes
from .registry import register_assigner

IOU_EPS = 1e-7  # mmdetection's EPS in -log(IoU + EPS)


def zero_label_cost(logits: Tensor) -> Tensor:
    """BCEwithlogits(x, 0) * sigmoid(x)^2: one class's soft classification cost against a 0 label."""
    return F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * torch.sigmoid(logits).square()


def soft_label_cost(cls_logits: Tensor, gt_labels: Tensor, iou: Tensor, rows: Tensor) -> Tensor:
    """(B, G, A) sum over classes of BCEwithlogits(x_c, y_c) * (y_c - sigmoid(x_c))^2, y = onehot(label) * iou,
    at the anchors in ``rows``; the other anchors' entries are not the cost (the caller masks them).

    cls_logits: (B, A, C); gt_labels: (B, G) in [0, C); iou: (B, G, A), the soft label of each pair;
    rows: (B, A) bool. The sum against all-zero labels is taken per anchor, and the GT class's term
    swapped for its soft-label term.
    """
    valid = ValidRows(cls_logits, gt_labels, rows, iou.dtype)
    zero_label = zero_label_cost(valid.logits)  # (V, C)
    label_logit, label = valid.at_labels(valid.logits), valid.of_pairs(iou)  # (V, G)
    soft = F.binary_cross_entropy_with_logits(label_logit, label, reduction="none") * (label - torch.sigmoid(label_logit)).square()
    return valid.scatter(soft.sub_(valid.at_labels(zero_label)).add_(zero_label.sum(dim=-1, keepdim=True)))


@register_assigner("dsl", uses_predictions=True)
class DynamicSoftLabelAssigner(DynamicKAssigner):
    """DSL; see the module docstring. Defaults: RTMDet's configs in mmdetection.

    topk: IoUs summed for the dynamic k (13); iou_weight: weight of the IoU cost (3.0);
    soft_center_radius: the centre prior's offset in strides (3.0).
    """

    def __init__(self, topk: int = 13, iou_weight: float = 3.0, soft_center_radius: float = 3.0):
        check_positive_int(topk, "topk")
        self.topk = self.candidate_topk = topk
        self.iou_weight = check_real(iou_weight, "iou_weight")
        self.soft_center_radius = check_real(soft_center_radius, "soft_center_radius", low=float("-inf"))

    def costs(self, inputs: AssignInputs) -> tuple[Tensor, Tensor]:
        dtype = inputs.gt_boxes.dtype
        centers = box_centers(inputs.anchors.to(dtype))
        real = inputs.gt_mask.unsqueeze(-1)  # (B, G, 1)
        in_box = centers_inside_boxes(centers, inputs.gt_boxes.unsqueeze(2), 0.0) & real  # (B, G, A)
        valid_anchor = in_box.any(dim=1)  # (B, A)
        valid = valid_anchor.unsqueeze(1) & real  # (B, G, A): valid anchor, real GT
        del in_box
        iou = predicted_iou(inputs).masked_fill_(~valid, 0.0)
        offset = centers - box_centers(inputs.gt_boxes).unsqueeze(2)  # (B, G, A, 2)
        distance = offset.square_().sum(dim=-1).sqrt_().div_(anchor_strides(inputs, self.name))
        del offset
        cost = torch.pow(10.0, distance.sub_(self.soft_center_radius))
        cost.add_((iou + IOU_EPS).log_().mul_(-self.iou_weight))
        cost.add_(soft_label_cost(inputs.cls_logits, inputs.gt_labels, iou, valid_anchor))
        cost.masked_fill_(~valid, float("inf"))
        return cost, iou


__all__ = ["DynamicSoftLabelAssigner", "soft_label_cost", "zero_label_cost"]
