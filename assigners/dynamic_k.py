"""Dynamic-k matching, shared by SimOTA (YOLOX) and DSL (RTMDet): batched over images and GT slots.

As mmdetection's ``SimOTAAssigner.dynamic_k_matching`` and ``DynamicSoftLabelAssigner.dynamic_k_matching``
(the same procedure), per image:
1. each GT's k = max(1, int(sum of its ``candidate_topk`` largest IoUs over the valid anchors));
2. each GT takes its k cheapest valid anchors;
3. an anchor taken by several GTs goes to the GT of least cost over *all* the image's GTs
   (which need not be one of those that took it: the official ``cost[prior_match_gt_mask, :].min(1)``);
4. the soft target of a positive is the IoU of its predicted box with the GT it ends with.

Departures, for determinism: among anchors of equal cost at the k-th place the lower anchor
indices are taken (``torch.topk`` leaves ties unspecified), and equal costs in step 3 go to the
lower GT slot (``torch.min`` semantics).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import (
    DENSE_MAX_PAIRS,
    NEGATIVE,
    Assigner,
    AssignInputs,
    Assignment,
    all_negative,
    assign_in_image_chunks,
)


class ValidRows:
    """The class logits of the anchors whose costs are needed, and the way back to (B, G, A).

    cls_logits: (B, A, C), cast to ``dtype``; gt_labels: (B, G) (padded slots: any value, clamped
    into [0, C)); rows: (B, A) bool, the valid anchors (every other anchor's cost is +inf). Only
    their (V, C) logits, ``logits``, are kept for the per-class terms: on a COCO-like batch about
    30% of the anchors, on 200 GTs per image over 90%. A cost is combined per row, (V, G), and
    written into (B, G, A) once by ``scatter``.
    """

    def __init__(self, cls_logits: Tensor, gt_labels: Tensor, rows: Tensor, dtype: torch.dtype):
        self.batch, self.num_anchors, num_classes = cls_logits.shape
        self.image, self.anchor = rows.nonzero(as_tuple=True)
        self.logits = cls_logits[self.image, self.anchor].to(dtype)  # (V, C)
        self.labels = gt_labels.clamp(0, num_classes - 1)[self.image]  # (V, G): each row's image's GT classes

    def at_labels(self, values: Tensor) -> Tensor:
        """(V, G) a (V, C) term at each GT slot's class."""
        return values.gather(1, self.labels)

    def of_pairs(self, pairs: Tensor) -> Tensor:
        """(V, G) the rows' entries of a (B, G, A) tensor."""
        return pairs.transpose(1, 2)[self.image, self.anchor]

    def scatter(self, per_row: Tensor) -> Tensor:
        """(B, G, A) a (V, G) cost at its rows (a transposed view); 0 off the rows."""
        out = per_row.new_zeros(self.batch, self.num_anchors, per_row.shape[1])
        out[self.image, self.anchor] = per_row
        return out.transpose(1, 2)


def dynamic_k_match(cost: Tensor, iou: Tensor, candidate_topk: int) -> Assignment:
    """The dynamic-k assignment of a batch of (GT slot, anchor) costs.

    cost: (B, G, A) float, +inf where the anchor is not valid for the image or the slot is padded
        (such pairs are never matched, nor counted in step 3; NaN costs count as +inf).
    iou: (B, G, A) float in [0, 1], IoU of each anchor's predicted box with each GT; 0 where the
        pair is not valid (so that a GT's top IoUs are over the valid anchors only).
    candidate_topk: how many of a GT's largest IoUs are summed for its k (capped at A).
    Returns the ``Assignment`` with ``gt_index`` (B, A) and ``soft_target`` (B, A) (0 off the positives).
    """
    b, g, a = cost.shape
    cost = torch.where(torch.isnan(cost), float("inf"), cost)
    finite = torch.isfinite(cost)
    k_top = min(candidate_topk, a)
    # Step 1. k <= k_top always (a sum of k_top IoUs <= 1 each), so k_top bounds the selection.
    dynamic_k = iou.topk(k_top, dim=-1).values.sum(dim=-1).int().clamp_(min=1)  # (B, G)
    # Step 2: the k-th smallest cost of each GT is its threshold; anchors strictly below it are
    # taken, and of those equal to it the lowest indices, as many as k still needs.
    smallest = cost.topk(k_top, dim=-1, largest=False).values  # (B, G, k_top), ascending
    threshold = smallest.gather(-1, (dynamic_k.long() - 1).unsqueeze(-1))  # (B, G, 1)
    below = cost < threshold
    at = cost == threshold
    still_needed = dynamic_k.unsqueeze(-1) - below.sum(dim=-1, keepdim=True)
    matched = (below | (at & (at.cumsum(dim=-1) <= still_needed))) & finite  # (B, G, A)
    # Step 3: anchors taken once keep their GT, anchors taken twice or more go to their argmin cost.
    times_taken = matched.sum(dim=1)  # (B, A)
    only_taker = matched.byte().argmax(dim=1)
    cheapest = cost.argmin(dim=1)
    winner = torch.where(times_taken > 1, cheapest, only_taker)
    gt_index = torch.where(times_taken > 0, winner, NEGATIVE)
    soft_target = torch.where(times_taken > 0, iou.gather(1, winner.unsqueeze(1)).squeeze(1), 0.0)
    return Assignment(gt_index=gt_index, soft_target=soft_target)


class DynamicKAssigner(Assigner):
    """Base of the dynamic-k assigners (SimOTA, DSL): each gives its (B, G, A) costs and IoUs
    (``costs``) and how many IoUs make a GT's k (``candidate_topk``); the rest is shared here: the
    strides check, the empty cases and the image groups bounded by ``DENSE_MAX_PAIRS``."""

    candidate_topk: int

    def costs(self, inputs: AssignInputs) -> tuple[Tensor, Tensor]:
        """(cost, iou), both (B, G, A), as ``dynamic_k_match`` takes them."""
        raise NotImplementedError

    def assign(self, inputs: AssignInputs) -> Assignment:
        inputs.require_strides(self.name)
        if inputs.num_gt_slots == 0 or inputs.anchors.shape[0] == 0:
            return all_negative(inputs, soft_target=True)
        return assign_in_image_chunks(self._assign_group, inputs, DENSE_MAX_PAIRS)

    def _assign_group(self, inputs: AssignInputs) -> Assignment:
        return dynamic_k_match(*self.costs(inputs), self.candidate_topk)


__all__ = ["DynamicKAssigner", "ValidRows", "dynamic_k_match"]
