"""RetinaNet MaxIoU assignment (``max_iou``) and the IoU pre-match shared by PAA/FNP/FSR.

Semantics equal ``torchvision.models.detection._utils.Matcher(high, low,
allow_low_quality_matches)`` applied per image, batched here over padded GT rows.
``max_iou_match`` takes the dense (B, G, A) IoU matrix; ``match_anchors`` gives the same
result from the boxes while computing the IoU only of the (GT, anchor) pairs that can
change it (see its docstring), which is most of the cost of ``max_iou`` and of PAA's pre-match.
Both assume ``low <= high`` (``MaxIoUAssigner`` checks its thresholds; the pre-match uses 0.1, 0.1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import IGNORED, NEGATIVE, Assigner, AssignInputs, Assignment, gt_anchor_iou
from .geometry import batched_box_iou
from .registry import register_assigner

CHUNK_SIZE = 32
# Below this many (image, GT slot, anchor) pairs, or on CUDA, the dense matrix is cheaper than
# bounding and gathering; both paths give the same result.
PRUNE_MIN_PAIRS = 1 << 18


def max_iou_match(iou: Tensor, gt_mask: Tensor, high: float, low: float, allow_low_quality: bool) -> Tensor:
    """Batched torchvision ``Matcher``.

    iou: (B, G, A) IoU of GT slots with anchors; padded rows must hold a value below ``low``
        (``gt_anchor_iou`` puts -1 there).
    gt_mask: (B, G) bool.
    high, low: IoU thresholds, ``low <= high`` (not checked here).
    Returns (B, A) int64: GT index, NEGATIVE (IoU < low) or IGNORED (low <= IoU < high).
    """
    b, g, a = iou.shape
    if g == 0:
        return torch.full((b, a), NEGATIVE, dtype=torch.int64, device=iou.device)
    matched_vals, all_matches = iou.max(dim=1)  # (B, A)
    matches = all_matches.masked_fill(matched_vals < low, NEGATIVE)
    if high > low:  # with high == low (PAA's pre-match) no IoU is in [low, high)
        matches.masked_fill_((matched_vals >= low) & (matched_vals < high), IGNORED)
    if allow_low_quality:
        # Each real GT keeps the anchors it overlaps most (ties included), as in
        # torchvision: such an anchor takes its own argmax GT, not necessarily this one.
        # A padded row's best is NaN, which equals no IoU.
        best_per_gt = iou.amax(dim=2, keepdim=True).masked_fill_(~gt_mask.unsqueeze(-1), float("nan"))  # (B, G, 1)
        anchor_is_best = (iou == best_per_gt).any(dim=1)  # (B, A)
        matches = torch.where(anchor_is_best, all_matches, matches)
    return matches


def _chunk_anchor_index(num_anchors_per_level: list[int], chunk_size: int, device: torch.device) -> Tensor:
    """(NC, chunk_size) anchor indices: each level cut into runs of ``chunk_size`` consecutive
    anchors, the last run of a level padded by repeating its last anchor."""
    starts, lasts, level_start = [], [], 0
    for count in num_anchors_per_level:
        for start in range(level_start, level_start + count, chunk_size):
            starts.append(start)
            lasts.append(level_start + count - 1)
        level_start += count
    start = torch.tensor(starts, dtype=torch.int64, device=device).unsqueeze(1)
    last = torch.tensor(lasts, dtype=torch.int64, device=device).unsqueeze(1)
    return torch.minimum(start + torch.arange(chunk_size, device=device), last)


def _iou_upper_bound(gt_boxes: Tensor, chunk_boxes: Tensor) -> Tensor:
    """(B, G, NC) upper bound of the IoU that ``batched_box_iou`` computes for a GT and any anchor of a chunk.

    gt_boxes: (B, G, 4); chunk_boxes: (NC, K, 4). The bound replays ``batched_box_iou``'s
    operations with the chunk's extreme values in place of one anchor's: the chunk's bounding
    box for its corners, its smallest anchor area in the union, and the intersection capped
    by both areas (the computed intersection never exceeds either computed area). Rounding is
    monotone, so each step bounds its per-pair counterpart in floating point, not only in exact
    arithmetic. NaN (0 / 0, when all the chunk's IoUs are 0) is returned as +inf: "may matter".
    """
    gx1, gy1, gx2, gy2 = (c.unsqueeze(-1) for c in gt_boxes.unbind(-1))  # (B, G, 1)
    gt_area = (gx2 - gx1) * (gy2 - gy1)
    lo, hi = chunk_boxes.amin(dim=1), chunk_boxes.amax(dim=1)  # (NC, 4)
    anchor_area = (chunk_boxes[..., 2] - chunk_boxes[..., 0]) * (chunk_boxes[..., 3] - chunk_boxes[..., 1])
    width = (torch.minimum(gx2, hi[:, 2]) - torch.maximum(gx1, lo[:, 0])).clamp_(min=0)
    height = (torch.minimum(gy2, hi[:, 3]) - torch.maximum(gy1, lo[:, 1])).clamp_(min=0)
    inter = torch.minimum(torch.minimum(width.mul_(height), gt_area), anchor_area.amax(dim=1))
    union = (gt_area + anchor_area.amin(dim=1)) - inter
    return inter.div_(union).nan_to_num_(nan=float("inf"))


def _is_well_formed(boxes: Tensor) -> Tensor:
    """() bool: every (..., 4) box has finite corners, positive width and height and a finite area."""
    width, height = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return ((width > 0) & (height > 0) & torch.isfinite(width * height) & torch.isfinite(boxes).all(-1)).all()


def match_anchors(
    inputs: AssignInputs,
    high: float,
    low: float,
    allow_low_quality: bool,
    *,
    chunk_size: int = CHUNK_SIZE,
    min_pairs: int = PRUNE_MIN_PAIRS,
) -> Tensor:
    """``max_iou_match(gt_anchor_iou(inputs), inputs.gt_mask, high, low, allow_low_quality)``,
    equal entry for entry, without the dense (B, G, A) IoU matrix.

    The anchors of each level are taken in runs of ``chunk_size`` (neighbours on the feature
    map, so a run covers a small region with one anchor size); ``_iou_upper_bound`` bounds the
    IoU of a GT with every anchor of a run. Only the (GT, run) pairs whose bound reaches ``low``
    can make an anchor matched or ignored, and only those whose bound reaches the GT's best IoU
    can hold its best anchors (the low-quality matches); the IoU is computed, with
    ``batched_box_iou``'s arithmetic, for those pairs alone. An anchor matched only as some GT's
    best takes its max-IoU GT over all G slots, computed from its full IoU column as the dense
    matcher does. Exactness rests on the bound holding for the rounded values too; batches it
    does not cover (a non-finite or empty box, ``low <= 0``) take the dense path, and so do small
    batches (fewer than ``min_pairs`` pairs) and CUDA tensors, where the dense path is faster.
    Assumes ``low <= high`` (not checked here). Returns (B, A) int64 as ``max_iou_match``.
    """
    b, g = inputs.batch_size, inputs.num_gt_slots
    dtype = inputs.gt_boxes.dtype
    anchors = inputs.anchors.to(dtype)
    a = anchors.shape[0]
    device = anchors.device
    if g == 0 or a == 0:
        return torch.full((b, a), NEGATIVE, dtype=torch.int64, device=device)
    gt_boxes = inputs.gt_boxes
    dense = (
        anchors.is_cuda
        or b * g * a < min_pairs
        or low <= 0
        or not bool(_is_well_formed(gt_boxes[inputs.gt_mask]) & _is_well_formed(anchors))
    )
    if dense:
        return max_iou_match(gt_anchor_iou(inputs), inputs.gt_mask, high, low, allow_low_quality)

    chunk_anchor = _chunk_anchor_index(inputs.num_anchors_per_level, chunk_size, device)  # (NC, K)
    num_chunks = chunk_anchor.shape[0]
    bound = _iou_upper_bound(gt_boxes, anchors[chunk_anchor])  # (B, G, NC)
    real = inputs.gt_mask.unsqueeze(-1)
    needed = real & ~(bound < low)
    if allow_low_quality:
        # Each GT's highest-bound runs, so every GT has a first estimate of its best IoU.
        needed |= real & (bound == bound.amax(dim=2, keepdim=True))

    def pair_iou(pairs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """IoU (R, K) of the GT and run of each (R,) flat (image, GT, run) index, its GT row, its anchors."""
        image, rest = pairs.div(g * num_chunks, rounding_mode="floor"), pairs % (g * num_chunks)
        slot, chunk = rest.div(num_chunks, rounding_mode="floor"), rest % num_chunks
        anchor_index = chunk_anchor[chunk]  # (R, K)
        iou = batched_box_iou(gt_boxes[image, slot].unsqueeze(1), anchors[anchor_index]).squeeze(1)
        return iou, image * g + slot, image.unsqueeze(1) * a + anchor_index

    iou, gt_row, flat_anchor = pair_iou(needed.flatten().nonzero().squeeze(1))
    if allow_low_quality:
        best = iou.new_full((b * g,), float("-inf")).scatter_reduce_(0, gt_row, iou.amax(dim=1), "amax")
        # Runs whose bound reaches the best IoU found so far may hold a better (or equal) anchor.
        more = real & ~needed & ~(bound < best.view(b, g, 1))
        if bool(more.any()):
            extra_iou, extra_row, extra_anchor = pair_iou(more.flatten().nonzero().squeeze(1))
            iou, gt_row = torch.cat([iou, extra_iou]), torch.cat([gt_row, extra_row])
            flat_anchor = torch.cat([flat_anchor, extra_anchor])
            best.scatter_reduce_(0, extra_row, extra_iou.amax(dim=1), "amax")

    # Per anchor: the highest computed IoU and the lowest GT slot reaching it (torch.max's choice).
    flat_anchor, flat_iou = flat_anchor.flatten(), iou.flatten()
    flat_slot = (gt_row % g).unsqueeze(1).expand_as(iou).flatten()
    best_iou = iou.new_full((b * a,), float("-inf")).scatter_reduce_(0, flat_anchor, flat_iou, "amax")
    at_best = torch.where(flat_iou == best_iou[flat_anchor], flat_slot, g)
    best_slot = torch.full((b * a,), g, dtype=torch.int64, device=device).scatter_reduce_(0, flat_anchor, at_best, "amin")
    matches = best_slot.masked_fill_(best_iou < high, IGNORED).masked_fill_(best_iou < low, NEGATIVE)
    if allow_low_quality:
        row_best = best[gt_row]
        holds_best = iou.amax(dim=1) == row_best  # (R,): few rows hold their GT's best anchors
        is_best = iou[holds_best] == row_best[holds_best].unsqueeze(1)
        best_anchor = flat_anchor.view_as(iou)[holds_best][is_best].unique()
        image, anchor = best_anchor.div(a, rounding_mode="floor"), best_anchor % a
        column = batched_box_iou(gt_boxes[image], anchors[anchor].unsqueeze(1))  # (n, G, 1)
        column.masked_fill_(~inputs.gt_mask[image].unsqueeze(-1), -1.0)
        matches[best_anchor] = column.max(dim=1).indices.squeeze(1)
    return matches.view(b, a)


@register_assigner("max_iou", uses_predictions=False)
class MaxIoUAssigner(Assigner):
    """RetinaNet assignment: positive at IoU >= ``pos_iou``, negative below ``neg_iou``,
    ignored between, and each GT's best anchors positive (``allow_low_quality``)."""

    def __init__(self, pos_iou: float = 0.5, neg_iou: float = 0.4, allow_low_quality: bool = True):
        if not (0.0 <= neg_iou <= pos_iou <= 1.0):
            raise ValueError(
                f"{self.name} assigner needs 0 <= neg_iou <= pos_iou <= 1, got neg_iou={neg_iou}, pos_iou={pos_iou}"
            )
        self.pos_iou = pos_iou
        self.neg_iou = neg_iou
        self.allow_low_quality = allow_low_quality

    def assign(self, inputs: AssignInputs) -> Assignment:
        gt_index = match_anchors(inputs, self.pos_iou, self.neg_iou, self.allow_low_quality)
        return Assignment(gt_index=gt_index)
