"""Test-time augmentation: size filtering per scale, and the merge of
the detections of several test transforms (the official ``TEST.BBOX_AUG`` of kkhoot/PAA, inherited
from ATSS: ``paa_core/engine/bbox_aug_vote.py``).

The official multi-scale test (``TEST.BBOX_AUG.ENABLED`` with ``VOTE``) detects with the usual
post-processing (NMS and score voting) on the image at the test size, on its mirror, and at each of
``SCALES`` (and mirrored), keeps from scale s only the boxes whose area lies in
(lo_s^2, hi_s^2) (``SCALE_RANGES``, in that scale's pixels), pools everything, and merges it class by
class by box voting (``MERGE_TYPE``: ``soft-vote`` default, or ``vote``) with ``VOTE_TH`` 0.66, keeping
at most ``PRE_NMS_TOP_N`` (1000) detections over all classes. ``merge="nms"`` (class-aware NMS at the
post-processor's threshold) is offered beside the two official merges.

Departures: continuous coordinates (no +1 in widths, areas, IoU and the flip), as everywhere in
this project; ties between equal scores are broken by the order of the pooled detections (stable
sorts), where the official numpy ``argsort`` is not stable.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

MERGES = ("soft-vote", "vote", "nms")


def in_area_range(boxes: Tensor, low: float, high: float) -> Tensor:
    """(N,) bool: low^2 < area < high^2 (strict, as the official ``remove_boxes``), area = w * h."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return (area > low * low) & (area < high * high)


def vote_one_class(boxes: Tensor, scores: Tensor, vote_thresh: float, *, soft: bool,
                   score_thresh: float) -> tuple[Tensor, Tensor]:
    """Box voting over the detections of one class (the official ``bbox_vote`` / ``soft_bbox_vote``).

    Greedy, from the highest score: the cluster of the current best box is every remaining box with
    IoU >= ``vote_thresh`` with it (itself included). A cluster of one box is kept as it is; a larger
    one becomes one box, the score-weighted mean of its boxes, scored with its highest score, and with
    ``soft`` each member is also kept with its score times (1 - its IoU with the best box) when that
    is >= ``score_thresh``. With fewer than two boxes nothing changes. Returns (boxes (M, 4), scores
    (M,)), sorted by decreasing score when ``soft`` (the official order), else in cluster order.
    """
    if boxes.shape[0] <= 1:
        return boxes, scores
    order = torch.argsort(scores, descending=True, stable=True)
    boxes, scores = boxes[order], scores[order]
    remaining = torch.ones(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    iou = box_iou(boxes, boxes)
    out_boxes, out_scores = [], []
    while bool(remaining.any()):
        best = int(remaining.nonzero()[0])
        member = remaining & (iou[best] >= vote_thresh)
        member[best] = True
        remaining &= ~member
        if int(member.sum()) <= 1:
            out_boxes.append(boxes[member])
            out_scores.append(scores[member])
            continue
        weights = scores[member]
        out_boxes.append((weights[:, None] * boxes[member]).sum(dim=0, keepdim=True) / weights.sum())
        out_scores.append(weights.max().reshape(1))
        if soft:
            soft_scores = scores[member] * (1.0 - iou[best][member])
            keep = soft_scores >= score_thresh
            out_boxes.append(boxes[member][keep])
            out_scores.append(soft_scores[keep])
    merged_boxes, merged_scores = torch.cat(out_boxes), torch.cat(out_scores)
    if soft:
        order = torch.argsort(merged_scores, descending=True, stable=True)
        merged_boxes, merged_scores = merged_boxes[order], merged_scores[order]
    return merged_boxes, merged_scores


def merge_detections(boxes: Tensor, scores: Tensor, labels: Tensor, *, merge: str, vote_thresh: float,
                     nms_thresh: float, score_thresh: float, max_det: int) -> dict[str, Tensor]:
    """The pooled detections of one image's test transforms, merged.

    boxes (N, 4) xyxy in one frame (the original image), scores (N,), labels (N,) int64.
    ``merge``: "soft-vote" or "vote" (``vote_one_class`` per class, official) or "nms" (class-aware NMS
    at ``nms_thresh``). Then at most ``max_det`` detections over all classes: every detection scoring at
    least the ``max_det``-th highest score (the official ``kthvalue`` rule, which keeps ties).
    Returns ``boxes``, ``scores`` (decreasing), ``labels``.
    """
    if merge not in MERGES:
        raise ValueError(f"unknown merge {merge!r}; valid choices: {', '.join(MERGES)}")
    if merge == "nms":
        keep = batched_nms(boxes, scores, labels, nms_thresh)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    else:
        parts = []
        for label in torch.unique(labels).tolist():
            of_class = labels == label
            class_boxes, class_scores = vote_one_class(boxes[of_class], scores[of_class], vote_thresh,
                                                       soft=merge == "soft-vote", score_thresh=score_thresh)
            parts.append((class_boxes, class_scores, torch.full_like(class_scores, label, dtype=torch.int64)))
        if parts:
            boxes, scores, labels = (torch.cat(p) for p in zip(*parts))
    if scores.numel() > max_det > 0:
        kth = scores.topk(max_det).values[-1]
        keep = scores >= kth
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = torch.argsort(scores, descending=True, stable=True)
    return {"boxes": boxes[order], "scores": scores[order], "labels": labels[order]}


__all__ = ["MERGES", "in_area_range", "merge_detections", "vote_one_class"]
