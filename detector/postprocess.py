"""Inference: per-level thresholding and top-k, unified score, class-aware NMS, score voting.

Follows the official PAA post-processor: candidates are the (anchor, class) pairs whose class
probability exceeds ``score_thresh``; they are ranked by the scorer's unified score
(sqrt(p_cls * sigmoid(quality)) for quality scorers), the best ``pre_nms_top_n`` per level are
decoded and clipped, then class-aware NMS over all levels keeps ``max_det`` detections.
The two-stage model's output already holds its detections (torchvision's ``RoIHeads`` thresholded
them and ran NMS with the model's own ``box_*`` settings); ``postprocess`` only clips them to each image.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from .box_coder import BoxCoder
from .model import DetectorOutput
from .two_stage import TwoStageOutput


def score_vote(
    kept_boxes: Tensor,
    kept_labels: Tensor,
    cand_boxes: Tensor,
    cand_scores: Tensor,
    cand_labels: Tensor,
    sigma: float = 0.025,
    iou_thresh: float = 0.01,
) -> Tensor:
    """Score voting (PAA Sec. 3.3): each kept box becomes the weighted mean of its neighbours.

    The neighbours of kept box b are the candidates b_i of the same class with IoU(b, b_i) >
    ``iou_thresh`` (b itself among them), weighted by p_i = exp(-(1 - IoU(b, b_i))^2 / sigma) * s_i.

    Args:
        kept_boxes: (K, 4) xyxy boxes after NMS; kept_labels: (K,) int64.
        cand_boxes: (N, 4) xyxy pre-NMS candidates; cand_scores: (N,) their unified scores;
            cand_labels: (N,) int64.
    Returns:
        (K, 4) voted boxes (scores are left to the caller unchanged).
    """
    if kept_boxes.numel() == 0:
        return kept_boxes.clone()
    iou = box_iou(kept_boxes, cand_boxes)  # (K, N)
    neighbour = (iou > iou_thresh) & (kept_labels[:, None] == cand_labels[None, :])
    weights = torch.exp(-((1.0 - iou) ** 2) / sigma) * cand_scores[None, :] * neighbour
    # A kept box is its own neighbour (IoU 1, score > 0), so the denominator is positive; the
    # clamp only guards a kept box that is not among the candidates.
    voted = weights @ cand_boxes / weights.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)
    has_neighbour = neighbour.any(dim=1, keepdim=True)
    return torch.where(has_neighbour, voted, kept_boxes)


def _candidates(
    out: DetectorOutput,
    image: int,
    image_size: tuple[int, int],
    scorer: Any,
    box_coder: BoxCoder,
    score_thresh: float,
    pre_nms_top_n: int,
    min_size: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Pre-NMS candidates of one image over all levels: boxes (N, 4), scores, labels, quality probs."""
    boxes, scores, labels, qualities = [], [], [], []
    start = 0
    for count in out.num_anchors_per_level:
        level = slice(start, start + count)
        start += count
        cls_prob = torch.sigmoid(out.cls_logits[image, level].float())  # (A_l, C)
        anchor_idx, class_idx = torch.nonzero(cls_prob > score_thresh, as_tuple=True)
        quality_logit = out.quality[image, level][anchor_idx].float() if out.quality is not None else None
        score = scorer.inference_score(cls_prob[anchor_idx, class_idx], quality_logit)
        score, top = score.topk(min(pre_nms_top_n, score.numel()))
        anchor_idx, class_idx = anchor_idx[top], class_idx[top]
        level_boxes = box_coder.decode(out.box_deltas[image, level][anchor_idx], out.anchors[level][anchor_idx])
        level_boxes = clip_boxes_to_image(level_boxes.float(), image_size)
        widths = level_boxes[:, 2] - level_boxes[:, 0]
        heights = level_boxes[:, 3] - level_boxes[:, 1]
        keep = (widths > min_size) & (heights > min_size)  # drops boxes clipped to nothing
        boxes.append(level_boxes[keep])
        scores.append(score[keep])
        labels.append(class_idx[keep])
        if quality_logit is not None:
            qualities.append(torch.sigmoid(quality_logit[top][keep]))
    quality = torch.cat(qualities) if out.quality is not None else None
    return torch.cat(boxes), torch.cat(scores), torch.cat(labels), quality


def _two_stage_detections(out: TwoStageOutput, image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor | None]]:
    """The box head's detections of each image, clipped to its own size (the model saw the padded batch);
    boxes clipped to nothing (inside the padding) are dropped."""
    if out.detections is None:
        raise ValueError("the two-stage model's output holds detections in eval mode only; call model.eval() first")
    results = []
    for det, image_size in zip(out.detections, image_sizes):
        boxes = clip_boxes_to_image(det["boxes"].float(), (int(image_size[0]), int(image_size[1])))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        results.append({"boxes": boxes[keep], "scores": det["scores"][keep], "labels": det["labels"][keep],
                        "quality": None})
    return results


@torch.no_grad()
def postprocess(
    out: DetectorOutput,
    image_sizes: list[tuple[int, int]],
    scorer: Any,
    *,
    score_thresh: float = 0.05,
    pre_nms_top_n: int = 1000,
    nms_thresh: float = 0.6,
    max_det: int = 100,
    score_voting: bool = False,
    voting_sigma: float = 0.025,
    min_size: float = 0.0,
    box_coder: BoxCoder | None = None,
) -> list[dict[str, Tensor | None]]:
    """Detections per image from raw head outputs.

    Args:
        out: the detector's output for B images.
        image_sizes: (h, w) in pixels of each image's valid area; boxes are clipped to it.
        scorer: from ``scorers.build_scorer``; gives the unified score.
        score_thresh: minimum class probability of a candidate (before the unified score).
        pre_nms_top_n: candidates kept per level, by unified score.
        nms_thresh: IoU threshold of class-aware NMS over all levels.
        max_det: detections kept per image, by score.
        score_voting: refine kept boxes by PAA score voting (``score_vote``).
        voting_sigma: sigma of the voting weights.
        min_size: boxes whose clipped width or height is not above this are dropped.
        box_coder: decodes deltas (default ``BoxCoder()``).
    Returns:
        One dict per image: ``boxes`` (N, 4) xyxy pixels, ``scores`` (N,) unified scores sorted
        decreasing, ``labels`` (N,) int64 in [0, C), ``quality`` (N,) sigmoid of the quality
        branch or None without one.

    For a ``TwoStageOutput`` (eval mode) the detections are the box head's, clipped to ``image_sizes``;
    the thresholds above belong to the dense head and do not apply (the model's ``box_*`` settings did),
    score voting is not available (ValueError), ``quality`` is None.
    """
    box_coder = box_coder or BoxCoder()
    if len(image_sizes) != out.cls_logits.shape[0]:
        raise ValueError(f"{len(image_sizes)} image sizes for a batch of {out.cls_logits.shape[0]} images")
    if isinstance(out, TwoStageOutput):
        if score_voting:
            raise ValueError("score voting needs a dense head's pre-NMS candidates; the two-stage model's box head "
                             "runs its own NMS (set inference.score_voting=false)")
        return _two_stage_detections(out, image_sizes)
    results = []
    for image, image_size in enumerate(image_sizes):
        size = (int(image_size[0]), int(image_size[1]))
        boxes, scores, labels, quality = _candidates(
            out, image, size, scorer, box_coder, score_thresh, pre_nms_top_n, min_size
        )
        keep = batched_nms(boxes, scores, labels, nms_thresh)[:max_det]  # sorted by decreasing score
        kept_boxes = boxes[keep]
        if score_voting:
            kept_boxes = score_vote(kept_boxes, labels[keep], boxes, scores, labels, sigma=voting_sigma)
        results.append(
            {
                "boxes": kept_boxes,
                "scores": scores[keep],
                "labels": labels[keep],
                "quality": quality[keep] if quality is not None else None,
            }
        )
    return results
