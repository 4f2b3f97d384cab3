"""Box geometry shared by the assigners: batched IoU and the anchor-centre-inside-GT test."""

from __future__ import annotations

import torch
from torch import Tensor


def batched_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of (B, N, 4) with (B, M, 4) xyxy boxes -> (B, N, M); plain ``box_iou`` semantics.

    Either batch dim may be 1 and broadcast (the anchors, shared by every image).

    ``torchvision.ops.box_iou`` is 2-D only; this is the same formula (no +1 pixel
    convention) broadcast over a batch, and is tested against it.
    """
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    # One (B, N, M) tensor per coordinate, updated in place, from contiguous coordinate
    # vectors, rather than (B, N, M, 2) corner tensors: the same arithmetic (bitwise-equal
    # results), several times faster on CPU. The in-place steps make it unfit for
    # autograd; it serves the (no-grad) assigners.
    x1a, y1a, x2a, y2a = (c.unsqueeze(-1) for c in boxes1.unbind(-1))  # (B, N, 1)
    x1b, y1b, x2b, y2b = (c.contiguous().unsqueeze(-2) for c in boxes2.unbind(-1))  # (B, 1, M)
    width = torch.minimum(x2a, x2b).sub_(torch.maximum(x1a, x1b)).clamp_(min=0)
    height = torch.minimum(y2a, y2b).sub_(torch.maximum(y1a, y1b)).clamp_(min=0)
    inter = width.mul_(height)
    union = (area1[..., :, None] + area2[..., None, :]).sub_(inter)
    return inter.div_(union) if inter.is_floating_point() else inter / union


def box_centers(boxes: Tensor) -> Tensor:
    """(..., 2) centres (cx, cy) of (..., 4) xyxy boxes, in the boxes' units."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def centers_inside_boxes(centers: Tensor, boxes: Tensor, margin: float = 0.0) -> Tensor:
    """Whether each point lies inside its box by more than ``margin`` (ATSS's centre prior).

    centers: (..., 2) points (x, y); boxes: (..., 4) xyxy, broadcast against ``centers``
    over the leading dims; margin in the same units (pixels). Returns (...) bool: True where
    the smallest of the distances to the four sides, min(x - x1, y - y1, x2 - x, y2 - y),
    is > ``margin``. Points on a side (or NaN anywhere) are outside.
    """
    x, y = centers[..., 0], centers[..., 1]
    distances = torch.stack([x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y], dim=-1)
    return distances.amin(dim=-1) > margin


__all__ = ["batched_box_iou", "box_centers", "centers_inside_boxes"]
