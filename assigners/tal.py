"""Task-aligned assignment (``tal``): TOOD, Feng et al., ICCV 2021, Sec. 3.2.

As mmdetection's ``TaskAlignedAssigner`` and the target code of its ``TOODHead`` (the official
TOOD code is built on them), batched over images and GT slots:
1. u = IoU of each anchor's detached predicted box with the GT; s = sigmoid of the anchor's
   logit of the GT's class; alignment metric t = s^alpha * u^beta;
2. per GT the ``topk`` anchors of largest t over all levels are candidates (all anchors when
   there are fewer);
3. a candidate is positive when t > 0 and its centre lies inside the GT (smallest distance to a
   side > 0.01, ATSS's test), in that order as the official code (top-k first, then centres);
4. an anchor positive for several GTs goes to the one whose predicted-box IoU u is highest;
5. soft target (TOOD head): per GT, t of its final positives divided by (their largest t + 1e-7)
   and multiplied by their largest u, so the best-aligned positive's target is the GT's best IoU.

Warm-up: TOOD trains its first epochs with ATSS (``initial_epoch`` 4 of its 12); here
``warmup_iters`` iterations (default 0: no warm-up), counted by ``set_iteration``. During the
warm-up the anchors are ATSS's (``atss``, topk 9) and the soft target is the IoU of the anchor box
with its GT: the TOOD head takes the assigner's IoU as both metric and IoU there, which the
normalisation returns (up to the 1e-7).

Departures, for determinism and robustness: anchors of equal t are taken in anchor-index order
(``torch.topk`` leaves ties unspecified); equal u between competing GTs goes to the lower GT index;
non-finite predictions (NaN logits or boxes) give s = 0 or u = 0, so they are never positive.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .atss import INSIDE_MARGIN, ATSSAssigner, resolve_by_highest, smallest_k_indices
from .base import (
    DENSE_MAX_PAIRS,
    NEGATIVE,
    Assigner,
    AssignInputs,
    Assignment,
    all_negative,
    assign_in_image_chunks,
    check_positive_int,
    check_real,
    gt_anchor_iou,
    predicted_iou,
)
from .geometry import box_centers, centers_inside_boxes
from .registry import register_assigner

NORMALISE_EPS = 1e-7  # TOOD head: ``pos_alignment_metrics.max() + 10e-8``


def class_probability_of_gt(cls_logits: Tensor, gt_labels: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, G, A) sigmoid probability each anchor gives its GT's class; NaN logits give 0."""
    b, a, _ = cls_logits.shape
    g = gt_labels.shape[1]
    logits = cls_logits.gather(2, gt_labels.unsqueeze(1).expand(b, a, g)).transpose(1, 2).to(dtype)
    return torch.sigmoid(logits).nan_to_num_(nan=0.0)


def normalise_per_gt(gt_index: Tensor, metric: Tensor, iou: Tensor, num_gt_slots: int) -> Tensor:
    """(B, A) TOOD's soft target: metric / (max metric of the GT's positives + 1e-7) * their max IoU.

    gt_index: (B, A) final assignment; metric, iou: (B, A) each anchor's value for its own GT.
    Zero off the positives.
    """
    b = gt_index.shape[0]
    positive = gt_index >= 0
    slot = torch.where(positive, gt_index, num_gt_slots)  # negatives to an overflow slot
    zeros = metric.new_zeros(b, num_gt_slots + 1)
    max_metric = zeros.scatter_reduce(1, slot, torch.where(positive, metric, 0.0), reduce="amax")
    max_iou = zeros.scatter_reduce(1, slot, torch.where(positive, iou, 0.0), reduce="amax")
    target = metric / (max_metric.gather(1, slot) + NORMALISE_EPS) * max_iou.gather(1, slot)
    return torch.where(positive, target, 0.0)


@register_assigner("tal", uses_predictions=True)
class TaskAlignedAssigner(Assigner):
    """TAL; see the module docstring.

    topk: candidates per GT (TOOD: 13); alpha, beta: exponents of the class probability and the
    IoU in the alignment metric (TOOD: 1.0, 6.0); warmup_iters: first iterations assigned by ATSS
    (TOOD: its first 4 epochs; default 0).
    """

    def __init__(self, topk: int = 13, alpha: float = 1.0, beta: float = 6.0, warmup_iters: int = 0):
        check_positive_int(topk, "topk")
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or warmup_iters < 0:
            raise ValueError(f"warmup_iters must be an int >= 0, got {warmup_iters!r}")
        self.topk = topk
        self.alpha = check_real(alpha, "alpha")
        self.beta = check_real(beta, "beta")
        self.warmup_iters = warmup_iters
        self.iteration = 0
        self._warmup_assigner = ATSSAssigner(topk=9)

    def set_iteration(self, iteration: int) -> None:
        self.iteration = int(iteration)

    @property
    def in_warmup(self) -> bool:
        return self.iteration < self.warmup_iters

    def assign(self, inputs: AssignInputs) -> Assignment:
        if inputs.num_gt_slots == 0 or inputs.anchors.shape[0] == 0:
            return all_negative(inputs, soft_target=True)
        if self.in_warmup:
            return self._assign_warmup(inputs)
        return assign_in_image_chunks(self._assign_aligned, inputs, DENSE_MAX_PAIRS)

    def _assign_aligned(self, inputs: AssignInputs) -> Assignment:
        g = inputs.num_gt_slots
        a = inputs.anchors.shape[0]
        boxes = inputs.gt_boxes
        anchors = inputs.anchors.to(boxes.dtype)
        iou = predicted_iou(inputs)  # (B, G, A)
        metric = class_probability_of_gt(inputs.cls_logits, inputs.gt_labels, boxes.dtype).pow_(self.alpha)
        metric.mul_(iou.pow(self.beta))  # (B, G, A)

        candidate = smallest_k_indices(-metric, min(self.topk, a))  # (B, G, K) the topk largest t
        candidate_metric = metric.gather(-1, candidate)
        inside = centers_inside_boxes(box_centers(anchors)[candidate], boxes.unsqueeze(-2), INSIDE_MARGIN)
        positive = (candidate_metric > 0) & inside & inputs.gt_mask.unsqueeze(-1)
        winner = resolve_by_highest(candidate, positive, iou.gather(-1, candidate), a)
        gt_index = torch.where(winner < g, winner, NEGATIVE)

        own = gt_index.clamp(min=0).unsqueeze(1)  # (B, 1, A)
        soft = normalise_per_gt(gt_index, metric.gather(1, own).squeeze(1), iou.gather(1, own).squeeze(1), g)
        return Assignment(gt_index=gt_index, soft_target=soft)

    def _assign_warmup(self, inputs: AssignInputs) -> Assignment:
        """ATSS's anchors with the IoU of the anchor box as soft target (TOOD's initial epochs)."""
        gt_index = self._warmup_assigner.assign(inputs).gt_index
        iou = gt_anchor_iou(inputs).clamp_(min=0.0).gather(1, gt_index.clamp(min=0).unsqueeze(1)).squeeze(1)
        soft = normalise_per_gt(gt_index, iou, iou, inputs.num_gt_slots)
        return Assignment(gt_index=gt_index, soft_target=soft)


__all__ = ["TaskAlignedAssigner", "class_probability_of_gt", "normalise_per_gt"]
