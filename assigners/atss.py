"""Adaptive Training Sample Selection (``atss``): Zhang et al., CVPR 2020, Alg. 1.

As sfzhang15/ATSS with one anchor per location, batched over images and GT slots:
1. per GT and pyramid level, the ``topk`` anchors whose centres are nearest (L2) to the
   GT centre are candidates (all of the level when it has fewer);
2. the GT's IoU threshold is mean + std (unbiased) of its candidates' IoUs;
3. a candidate is positive when its IoU >= threshold and its centre lies inside the GT
   (min of the distances to the four sides > 0.01, ``centers_inside_boxes``);
4. an anchor positive for several GTs goes to the one with the highest IoU (ties: the
   lower GT index, ``torch.max`` semantics); all other anchors are negative.

Departures, for determinism and robustness: equidistant anchors are taken in anchor-index
order (``torch.topk`` leaves ties unspecified); a GT with a single candidate (topk = 1 on
a one-level pyramid) gets std 0 instead of the NaN of an unbiased std of one value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import NEGATIVE, Assigner, AssignInputs, Assignment, check_positive_int
from .geometry import batched_box_iou, box_centers, centers_inside_boxes
from .registry import register_assigner

INSIDE_MARGIN = 0.01


def smallest_k_indices(values: Tensor, k: int) -> Tensor:
    """(..., k) indices of the ``k`` smallest entries along the last dim, ascending by index.

    Ties at the k-th value are taken in index order, as a stable sort would (``torch.topk``
    leaves them unspecified), so the result is deterministic and equal on CPU and CUDA.
    """
    n = values.shape[-1]
    if k >= n:
        return torch.arange(n, device=values.device).expand(*values.shape[:-1], n)
    smallest, index = values.topk(k + 1, dim=-1, largest=False)  # ascending values
    index = index[..., :k].clone()
    tied = smallest[..., k - 1] == smallest[..., k]  # the k-th value continues past k
    if bool(tied.any()):
        rows = tied.nonzero(as_tuple=True)
        index[rows] = torch.argsort(values[rows], dim=-1, stable=True)[..., :k]
    return index.sort(dim=-1).values


def resolve_by_highest(candidate: Tensor, positive: Tensor, score: Tensor, num_anchors: int) -> Tensor:
    """(B, A) GT slot each anchor goes to, G where none: of the GTs it is positive for, the one of
    highest ``score`` (ties: the lowest GT index).

    candidate: (B, G, K) anchor indices per GT; positive: (B, G, K) bool; score: (B, G, K) float,
    the value compared between competing GTs (ATSS: anchor IoU; TAL: predicted-box IoU).
    """
    b, g, k = candidate.shape
    flat_anchor = candidate.reshape(b, g * k)
    positive_score = torch.where(positive, score, float("-inf")).reshape(b, g * k)
    best = torch.full((b, num_anchors), float("-inf"), dtype=score.dtype, device=score.device)
    best.scatter_reduce_(1, flat_anchor, positive_score, reduce="amax")
    is_best = positive.reshape(b, g * k) & (positive_score == best.gather(1, flat_anchor))
    gt_of_entry = torch.arange(g, device=score.device).repeat_interleave(k).expand(b, g * k)
    winner = torch.full((b, num_anchors), g, dtype=torch.int64, device=score.device)
    winner.scatter_reduce_(1, flat_anchor, torch.where(is_best, gt_of_entry, g), reduce="amin")
    return winner


@register_assigner("atss", uses_predictions=False)
class ATSSAssigner(Assigner):
    """ATSS; see the module docstring. topk: candidates per GT per level (paper: 9)."""

    def __init__(self, topk: int = 9):
        check_positive_int(topk, "topk")
        self.topk = topk

    def assign(self, inputs: AssignInputs) -> Assignment:
        b, g = inputs.batch_size, inputs.num_gt_slots
        a = inputs.anchors.shape[0]
        device = inputs.anchors.device
        if g == 0 or a == 0:
            return Assignment(gt_index=torch.full((b, a), NEGATIVE, dtype=torch.int64, device=device))
        boxes = inputs.gt_boxes
        anchors = inputs.anchors.to(boxes.dtype)
        anchor_centers = box_centers(anchors)  # (A, 2)
        anchor_cx, anchor_cy = anchor_centers[:, 0], anchor_centers[:, 1]  # (A,) each
        gt_centers = box_centers(boxes).unsqueeze(-2)  # (B, G, 1, 2)
        gt_cx, gt_cy = gt_centers[..., 0], gt_centers[..., 1]  # (B, G, 1) each

        # Step 1: per level, the topk anchors whose centres are nearest the GT centre.
        # Only this step touches all (GT, anchor) pairs; the rest works on (B, G, K).
        candidate_per_level = []
        start = 0
        for count in inputs.num_anchors_per_level:
            end = start + count
            if count > 0:
                dx = anchor_cx[start:end] - gt_cx
                dy = anchor_cy[start:end] - gt_cy
                distance = (dx * dx + dy * dy).sqrt()  # (B, G, A_l)
                candidate_per_level.append(smallest_k_indices(distance, min(self.topk, count)) + start)
            start = end
        candidate = torch.cat(candidate_per_level, dim=-1)  # (B, G, K) anchor indices
        k = candidate.shape[-1]

        # Step 2: adaptive IoU threshold = mean + unbiased std of the candidates' IoUs.
        candidate_boxes = anchors[candidate]  # (B, G, K, 4)
        iou = batched_box_iou(boxes.reshape(b * g, 1, 4), candidate_boxes.reshape(b * g, k, 4)).reshape(b, g, k)
        std = iou.std(dim=-1, keepdim=True) if k > 1 else torch.zeros_like(iou)
        threshold = iou.mean(dim=-1, keepdim=True) + std

        # Step 3: positive candidates have IoU >= threshold and their centre inside the GT.
        inside = centers_inside_boxes(anchor_centers[candidate], boxes.unsqueeze(-2), INSIDE_MARGIN)  # (B, G, K)
        positive = (iou >= threshold) & inside & inputs.gt_mask.unsqueeze(-1)

        # Step 4: an anchor positive for several GTs takes the one of highest IoU, then
        # the lowest GT index among equal IoUs.
        winner = resolve_by_highest(candidate, positive, iou, a)
        return Assignment(gt_index=torch.where(winner < g, winner, NEGATIVE))

__all__ = ["ATSSAssigner", "resolve_by_highest", "smallest_k_indices"]
