"""Anchor score shared by the prediction-aware assigners (``paa``, ``fnp``, ``fsr``).

PAA (Kim & Lee, ECCV 2020), Sec. 3.1, Eq. 1-2: the score of anchor ``a`` for GT ``g``
is ``S = exp(-loss)`` with

    loss = focal(cls_logits[a], one_hot(label[g]))  +  lambda * (1 - GIoU(pred_box[a], box[g]))

computed on detached predictions, where the focal loss (alpha 0.25, gamma 2) is summed
over all classes and lambda = 1, as in the official code (kkhoot/PAA). Only anchors
pre-matched to ``g`` by IoU get a score: every anchor takes its max-IoU GT when that IoU
is >= 0.1, and each GT keeps its best anchors (torchvision ``Matcher(0.1, 0.1, True)``).

Because the pre-match gives every anchor at most one GT, the (B, G, A) loss matrix has
at most one finite entry per anchor; ``AnchorLoss`` stores it compactly as a per-anchor
loss (B, A) plus the pre-matched GT index (B, A), and ``AnchorLoss.per_gt`` expands it.
The same fact makes the candidate sets of different GTs disjoint (see ``select_candidates``).

``CandidateAssigner`` is the base of the assigners built on this score (``paa``, ``fnp``, ``fsr``):
it holds and validates ``topk`` and the anchor-loss parameters, and runs ``anchor_loss`` and
``select_candidates``; each subclass only separates the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch
from torch import Tensor

from .base import NEGATIVE, Assigner, AssignInputs, check_positive_int
from .max_iou import match_anchors

PREMATCH_IOU = 0.1
# On CPU the (M, C) focal terms are computed this many rows at a time, so the temporaries of
# the elementwise passes stay in cache instead of being fresh multi-MB buffers (about 2x faster).
CPU_FOCAL_ROWS = 4096


@dataclass(frozen=True)
class AnchorLoss:
    """Loss of every anchor with respect to its pre-matched GT.

    loss: (B, A) float, PAA Eq. 1-2 loss of the anchor for the GT ``prematch`` names;
        +inf where the anchor is not pre-matched, or where the loss is not finite
        (NaN/Inf predictions), so such anchors are never candidates.
    prematch: (B, A) int64, index into G of the pre-matched GT, or -1 (NEGATIVE).
    matched: (M,) int64 flat index b * A + a of the M pre-matched anchors, ascending.
    matched_row: (M,) int64 the row b * G + g of each one's GT.
    matched_loss: (M,) float its ``loss``.
    The last three are the list ``select_candidates`` works on, so that it need not find it again.
    """

    loss: Tensor
    prematch: Tensor
    matched: Tensor
    matched_row: Tensor
    matched_loss: Tensor

    @property
    def score(self) -> Tensor:
        """(B, A) anchor score S = exp(-loss) (PAA Eq. 1); 0 where not pre-matched."""
        return torch.exp(-self.loss)

    def per_gt(self, num_gt_slots: int) -> Tensor:
        """(B, G, A) loss of every (GT, anchor) pair; +inf off the pre-match."""
        b, a = self.loss.shape
        dense = self.loss.new_full((b, num_gt_slots + 1, a), float("inf"))
        # Unmatched anchors go to an overflow row G that is dropped.
        row = torch.where(self.prematch >= 0, self.prematch, num_gt_slots).unsqueeze(1)
        dense.scatter_(1, row, self.loss.unsqueeze(1))
        return dense[:, :num_gt_slots]


@dataclass(frozen=True)
class Candidates:
    """Per-GT candidate anchors (PAA Sec. 3.1: per level, the ``topk`` lowest-loss anchors).

    index: (N,) int64 flat index b * A + a of the N candidates, ordered by their GT's row
        (b * G + g), then by ascending loss, then by anchor index: each GT's candidates sorted
        as PAA's mixture takes them.
    row: (N,) int64 the GT row b * G + g of each entry of ``index`` (non-decreasing).
    num_candidates: (B, G) int64, candidates per GT slot (0 for padded rows).
    num_anchors: A, anchors per image.
    ``gt`` and ``mask``, the (B, A) views of the list, are built when first read (PAA does not).
    """

    index: Tensor
    row: Tensor
    num_candidates: Tensor
    num_anchors: int

    @cached_property
    def gt(self) -> Tensor:
        """(B, A) int64, the GT the candidate belongs to (its pre-matched GT); -1 elsewhere."""
        b, g = self.num_candidates.shape
        candidate_gt = torch.full((b * self.num_anchors,), NEGATIVE, dtype=torch.int64, device=self.index.device)
        candidate_gt[self.index] = self.row.remainder(g)
        return candidate_gt.view(b, self.num_anchors)

    @cached_property
    def mask(self) -> Tensor:
        """(B, A) bool, True for a candidate anchor."""
        return self.gt >= 0


def check_anchor_loss_params(focal_alpha: float, focal_gamma: float, giou_weight: float) -> None:
    """Raise ValueError for anchor-loss parameters outside their valid ranges."""
    if not 0.0 <= focal_alpha <= 1.0:
        raise ValueError(f"focal_alpha must be in [0, 1], got {focal_alpha}")
    if focal_gamma < 0.0:
        raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
    if giou_weight < 0.0:
        raise ValueError(f"giou_weight must be >= 0, got {giou_weight}")


def _softplus(x: Tensor) -> Tensor:
    """softplus(x) = log(1 + exp(x)) = -log(sigmoid(-x)), elementwise, accurate in float32.

    Computed as max(x, 0) - log(sigmoid(|x|)): the sigmoid stays in [0.5, 1], so nothing
    underflows or overflows for any x (inf -> inf, -inf -> 0). Written with ``sigmoid`` and
    ``log`` because ``F.softplus``/``F.logsigmoid`` (which ``torchvision.ops.sigmoid_focal_loss``
    uses) are several times slower on CPU.
    """
    return x.clamp(min=0).sub_(torch.sigmoid(x.abs()).log_())


def focal_loss_sum(logits: Tensor, labels: Tensor, *, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss summed over classes against one-hot labels.

    logits: (M, C); labels: (M,) int64 in [0, C). Returns (M,): the value of
    ``torchvision.ops.sigmoid_focal_loss(logits, one_hot(labels), alpha, gamma).sum(1)``
    (tested against it), computed without the one-hot matrix and several times faster on CPU:
    every class as a negative, (1 - alpha) p^gamma (-log(1 - p)) = (1 - alpha) p^gamma
    softplus(x), with the label's column replaced by its positive term
    alpha (1 - p)^gamma (-log p) = alpha sigmoid(-x)^gamma softplus(-x). Most (M, C) passes
    work in place.
    """
    label_col = labels.unsqueeze(1)
    prob = torch.sigmoid(logits)
    weight = prob.mul_(prob) if gamma == 2.0 else prob.pow_(gamma)  # p^gamma; squaring is cheaper than pow
    negative = weight.mul_(_softplus(logits))
    negative.scatter_(1, label_col, 0.0)
    label_logit = logits.gather(1, label_col).squeeze(1)
    positive = torch.sigmoid(-label_logit).pow(gamma) * _softplus(-label_logit)
    return (1.0 - alpha) * negative.sum(dim=1) + alpha * positive


def giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """(M,) 1 - GIoU of each (M, 4) xyxy box in ``pred`` with its row in ``target``.

    The value of ``torchvision.ops.generalized_box_iou_loss(pred, target, reduction="none")``, bit
    for bit (tested against it): the same operations on the same values, with the x and y
    coordinates of a corner taken together as (M, 2) pairs, each area as the ``prod`` of its two
    sides, and the intersection written with ``where`` instead of boolean-mask indexing: about
    half the operations (on the digits batch a few thousand boxes, where an operation costs its
    call, not its arithmetic). Float inputs (the anchor loss promotes to at least float32).
    """
    eps = 1e-7  # torchvision's default
    pred_lo, pred_hi, target_lo, target_hi = pred[:, :2], pred[:, 2:], target[:, :2], target[:, 2:]
    inter_lo, inter_hi = torch.maximum(pred_lo, target_lo), torch.minimum(pred_hi, target_hi)  # (M, 2) x, y
    # The product of a row's two sides: width * height (one rounding in any order of the product).
    inter = torch.where((inter_hi > inter_lo).all(dim=1), (inter_hi - inter_lo).prod(dim=1), 0.0)
    union = (pred_hi - pred_lo).prod(dim=1) + (target_hi - target_lo).prod(dim=1) - inter
    iou = inter / (union + eps)
    enclosing = (torch.maximum(pred_hi, target_hi) - torch.minimum(pred_lo, target_lo)).prod(dim=1)
    return 1 - (iou - (enclosing - union) / (enclosing + eps))


def anchor_loss(
    inputs: AssignInputs,
    *,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    giou_weight: float = 1.0,
) -> AnchorLoss:
    """PAA anchor loss (Eq. 1-2) of every pre-matched anchor; see the module docstring.

    Needs ``inputs.cls_logits`` (B, A, C) and ``inputs.pred_boxes`` (B, A, 4) xyxy pixels, not
    None (the ``Assigner`` base checks that for the assigners), and valid loss parameters
    (``check_anchor_loss_params``, run by ``CandidateAssigner``). The focal and GIoU terms are
    computed only for the M pre-matched anchors, each against its own GT ((M, C) focal terms,
    never (B, G, A, C)), gathered by flat index (b * A + a). Returns an ``AnchorLoss``.
    """
    logits = inputs.cls_logits.detach()
    dtype = torch.promote_types(logits.dtype, torch.float32)
    b, a, num_classes = logits.shape
    g = inputs.num_gt_slots

    prematch = match_anchors(inputs, PREMATCH_IOU, PREMATCH_IOU, allow_low_quality=True)  # (B, A)
    flat_prematch = prematch.view(-1)
    matched = (flat_prematch >= 0).nonzero().squeeze(1)  # (M,) flat anchor index b * A + a, ascending
    gt_row = matched.div(a, rounding_mode="floor") * g + flat_prematch.index_select(0, matched)  # (M,) b * G + g

    # Focal loss summed over all C classes against the one-hot GT label, in blocks of rows on CPU.
    anchor_labels = inputs.gt_labels.reshape(-1).index_select(0, gt_row)
    flat_logits = logits.reshape(b * a, num_classes)
    num_matched = matched.numel()
    if logits.is_cuda or num_matched <= CPU_FOCAL_ROWS:
        focal = focal_loss_sum(
            flat_logits.index_select(0, matched).to(dtype), anchor_labels, alpha=focal_alpha, gamma=focal_gamma
        )
    else:
        focal = torch.empty(num_matched, dtype=dtype, device=logits.device)
        for start in range(0, num_matched, CPU_FOCAL_ROWS):
            rows = slice(start, start + CPU_FOCAL_ROWS)
            block_logits = flat_logits.index_select(0, matched[rows]).to(dtype)  # (rows, C)
            focal[rows] = focal_loss_sum(block_logits, anchor_labels[rows], alpha=focal_alpha, gamma=focal_gamma)

    # 1 - GIoU; like the official code, a predicted box with x2 < x1 (or y2 < y1) is
    # collapsed to zero width (height) rather than given a negative area.
    pred = inputs.pred_boxes.detach().reshape(b * a, 4).index_select(0, matched).to(dtype)  # (M, 4)
    pred = torch.cat([pred[:, :2], torch.maximum(pred[:, :2], pred[:, 2:])], dim=1)
    gt_boxes = inputs.gt_boxes.reshape(-1, 4).index_select(0, gt_row).to(dtype)
    giou = giou_loss(pred, gt_boxes)
    matched_loss = focal + (giou if giou_weight == 1.0 else giou_weight * giou)  # x * 1.0 is x, bit for bit
    # Non-finite losses (NaN/Inf predictions) count as +inf: worst, never a candidate.
    matched_loss = torch.where(matched_loss.abs() < float("inf"), matched_loss, float("inf"))  # isfinite, in 2 ops
    loss = torch.full((b * a,), float("inf"), dtype=dtype, device=logits.device)
    loss[matched] = matched_loss
    return AnchorLoss(
        loss=loss.view(b, a), prematch=prematch, matched=matched, matched_row=gt_row, matched_loss=matched_loss
    )


def group_rank(sorted_key: Tensor) -> Tensor:
    """(M,) position of each entry of the non-decreasing (M,) ``sorted_key`` within its run of equal keys.

    0 for the first entry of a run, 1 for the next, ...: its position less the run's start,
    which ``searchsorted`` finds (the first position holding the entry's key).
    """
    position = torch.arange(sorted_key.numel(), device=sorted_key.device)
    return position - torch.searchsorted(sorted_key, sorted_key)


def rank_in_groups(values: Tensor, key: Tensor) -> Tensor:
    """(M,) rank of each entry among the entries of its ``key`` by ascending ``values`` (M,).

    0 for the lowest value of its group, 1 for the next, ...; equal values keep the entries'
    order, so callers pass entries in anchor order and ties go to the lower anchor index,
    deterministically and equally on CPU and CUDA. Two stable sorts of the flat list.
    """
    # Lexicographic order (key, value, entry index): stable sort by value, then by key.
    order = torch.argsort(values, stable=True)
    order = order[torch.argsort(key[order], stable=True)]
    rank = torch.empty_like(order)
    rank[order] = group_rank(key[order])
    return rank


def rank_within_group(loss: Tensor, group: Tensor, valid: Tensor, num_groups: int) -> Tensor:
    """Rank of each valid anchor among the valid anchors of its image and group, by loss.

    loss: (B, A) float; group: (B, A) int64 in [0, num_groups) where valid (a GT index,
    or GT and level); valid: (B, A) bool. Returns (B, A) int64: 0 for the lowest-loss
    valid anchor of its group, 1 for the next, ...; ties go to the lower anchor index, so
    the result is deterministic and equal on CPU and CUDA. Invalid anchors get rank A.
    Only the valid anchors are sorted (``rank_in_groups``), never (B, G, A).
    """
    b, a = loss.shape
    img_idx, anchor_idx = valid.nonzero(as_tuple=True)  # row-major: by image, then anchor
    key = img_idx * num_groups + group[img_idx, anchor_idx]
    rank = torch.full((b, a), a, dtype=torch.int64, device=loss.device)
    rank[img_idx, anchor_idx] = rank_in_groups(loss[img_idx, anchor_idx], key)
    return rank


def select_candidates(anchor_loss: AnchorLoss, num_anchors_per_level: list[int], topk: int, num_gt_slots: int) -> Candidates:
    """PAA candidate selection (Sec. 3.1; official ``compute_paa``).

    For each GT and each pyramid level, the ``topk`` anchors pre-matched to that GT with
    the lowest finite loss (fewer when there are fewer); ``topk`` a positive int (checked by
    the assigners' constructors, not here). Shared by PAA and FNP/FSR. Works on the list of
    pre-matched anchors (``AnchorLoss.matched``); the only (B, A) tensors it makes are its
    outputs. Ties in loss go to the lower anchor index, within a level and within a GT.
    """
    b, a = anchor_loss.loss.shape
    device = anchor_loss.loss.device
    matched, row, loss = anchor_loss.matched, anchor_loss.matched_row, anchor_loss.matched_loss
    level_end = torch.tensor(list(accumulate(num_anchors_per_level)), device=device)
    level = torch.bucketize(matched.remainder(a), level_end, right=True)  # (M,) level of each anchor

    # Sorted by loss (ties: anchor order), then stably by (GT, level): the rank of each anchor among
    # its GT's anchors of its level. Those of rank < topk with a finite loss are the candidates.
    by_loss = torch.argsort(loss, stable=True)
    level_key = (row * len(num_anchors_per_level) + level)[by_loss]
    by_level = torch.argsort(level_key, stable=True)
    keep = torch.empty_like(by_loss, dtype=torch.bool)
    keep[by_level] = group_rank(level_key[by_level]) < topk  # in ``by_loss`` order
    keep &= loss[by_loss] < float("inf")  # a non-finite loss is +inf
    # The candidates in loss order, then stably by GT row: (row, loss, anchor).
    entry = by_loss[keep]
    entry_row = row[entry]
    by_row = torch.argsort(entry_row, stable=True)
    candidate_row = entry_row[by_row]
    num_candidates = torch.zeros(b * num_gt_slots, dtype=torch.int64, device=device)
    num_candidates.scatter_add_(0, candidate_row, torch.ones_like(candidate_row))
    return Candidates(
        index=matched[entry[by_row]],
        row=candidate_row,
        num_candidates=num_candidates.view(b, num_gt_slots),
        num_anchors=a,
    )


class CandidateAssigner(Assigner):
    """Base of the assigners that separate PAA's candidates (``paa``, ``fnp``, ``fsr``).

    topk: candidates per GT per pyramid level (paper: 9).
    focal_alpha, focal_gamma, giou_weight: anchor-loss parameters (Eq. 1-2).
    Validates them once; ``score_candidates`` gives the anchor loss and the candidates.
    """

    def __init__(self, topk: int, focal_alpha: float, focal_gamma: float, giou_weight: float):
        check_positive_int(topk, "topk")
        check_anchor_loss_params(focal_alpha, focal_gamma, giou_weight)
        self.topk = topk
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.giou_weight = giou_weight

    def score_candidates(self, inputs: AssignInputs) -> tuple[AnchorLoss, Candidates]:
        """``anchor_loss`` of ``inputs`` (with predictions) and its per-GT ``select_candidates``."""
        losses = anchor_loss(
            inputs, focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma, giou_weight=self.giou_weight
        )
        return losses, select_candidates(losses, inputs.num_anchors_per_level, self.topk, inputs.num_gt_slots)


__all__ = [
    "PREMATCH_IOU",
    "AnchorLoss",
    "CandidateAssigner",
    "Candidates",
    "anchor_loss",
    "check_anchor_loss_params",
    "focal_loss_sum",
    "giou_loss",
    "group_rank",
    "rank_in_groups",
    "rank_within_group",
    "select_candidates",
]
