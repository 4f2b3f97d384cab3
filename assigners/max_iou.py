"""RetinaNet MaxIoU assignment (``iou``) and the IoU pre-match shared by PAA/FNP/FSR.

Semantics equal ``torchvision.models.detection._utils.Matcher(high, low,
allow_low_quality_matches)`` applied per image, batched here over padded GT rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import IGNORED, NEGATIVE, AssignInputs, Assignment, gt_anchor_iou


def max_iou_match(iou: Tensor, gt_mask: Tensor, high: float, low: float, allow_low_quality: bool) -> Tensor:
    """Batched torchvision ``Matcher``.

    iou: (B, G, A) IoU of GT slots with anchors; padded rows must hold a value below ``low``
        (``gt_anchor_iou`` puts -1 there).
    gt_mask: (B, G) bool.
    Returns (B, A) int64: GT index, NEGATIVE (IoU < low) or IGNORED (low <= IoU < high).
    """
    if low > high:
        raise ValueError(f"low threshold {low} must not exceed high threshold {high}")
    b, g, a = iou.shape
    if g == 0:
        return torch.full((b, a), NEGATIVE, dtype=torch.int64, device=iou.device)
    matched_vals, all_matches = iou.max(dim=1)  # (B, A)
    matches = all_matches.clone()
    matches[matched_vals < low] = NEGATIVE
    matches[(matched_vals >= low) & (matched_vals < high)] = IGNORED
    if allow_low_quality:
        # Each real GT keeps the anchors it overlaps most (ties included), as in
        # torchvision: such an anchor takes its own argmax GT, not necessarily this one.
        best_per_gt = iou.max(dim=2, keepdim=True).values  # (B, G, 1)
        is_best = (iou == best_per_gt) & gt_mask.unsqueeze(-1)
        anchor_is_best = is_best.any(dim=1)  # (B, A)
        matches = torch.where(anchor_is_best, all_matches, matches)
    return matches


class MaxIoUAssigner:
    """RetinaNet assignment: positive at IoU >= ``pos_iou``, negative below ``neg_iou``,
    ignored between, and each GT's best anchors positive (``allow_low_quality``)."""

    name = "iou"

    def __init__(self, pos_iou: float = 0.5, neg_iou: float = 0.4, allow_low_quality: bool = True):
        if not (0.0 <= neg_iou <= pos_iou <= 1.0):
            raise ValueError(f"iou assigner needs 0 <= neg_iou <= pos_iou <= 1, got neg_iou={neg_iou}, pos_iou={pos_iou}")
        self.pos_iou = pos_iou
        self.neg_iou = neg_iou
        self.allow_low_quality = allow_low_quality

    @torch.no_grad()
    def __call__(self, inputs: AssignInputs) -> Assignment:
        iou = gt_anchor_iou(inputs)
        gt_index = max_iou_match(iou, inputs.gt_mask, self.pos_iou, self.neg_iou, self.allow_low_quality)
        return Assignment(gt_index=gt_index)
