"""Shared box geometry: batched IoU against torchvision, centres and the centre-inside-box test by hand."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from assigners import batched_box_iou, box_centers, centers_inside_boxes


@pytest.mark.parametrize("seed", range(3))
def test_batched_box_iou_equals_torchvision_box_iou(seed):
    gen = torch.Generator().manual_seed(seed)
    corner = torch.rand(4, 7, 2, generator=gen) * 100
    boxes1 = torch.cat([corner, corner + torch.rand(4, 7, 2, generator=gen) * 60 + 0.5], dim=-1)
    corner = torch.rand(4, 11, 2, generator=gen) * 100
    boxes2 = torch.cat([corner, corner + torch.rand(4, 11, 2, generator=gen) * 60 + 0.5], dim=-1)
    iou = batched_box_iou(boxes1, boxes2)
    assert iou.shape == (4, 7, 11)
    for i in range(4):
        torch.testing.assert_close(iou[i], box_iou(boxes1[i], boxes2[i]), rtol=0, atol=0)


def test_box_centers_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 4.0], [-6.0, 2.0, 2.0, 3.0]])
    assert box_centers(boxes).tolist() == [[5.0, 2.0], [-2.0, 2.5]]


def test_centers_inside_boxes_by_hand():
    # Box x in [0, 10], y in [0, 4]. Distances (left, top, right, bottom) and their minimum:
    box = torch.tensor([0.0, 0.0, 10.0, 4.0])
    centers = torch.tensor(
        [
            [5.0, 2.0],  # 5, 2, 5, 2 -> 2: inside
            [0.5, 2.0],  # 0.5, 2, 9.5, 2 -> 0.5: inside with margin 0.01, not with margin 1
            [0.0, 2.0],  # on the left side -> 0: outside
            [9.995, 2.0],  # right distance 0.005 <= 0.01: outside with the margin, inside without
            [5.0, -1.0],  # above the box -> -1: outside
            [12.0, 2.0],  # right of the box -> -2: outside
            [float("nan"), 2.0],  # NaN: outside
        ]
    )
    boxes = box.expand(len(centers), 4)
    assert centers_inside_boxes(centers, boxes, 0.01).tolist() == [True, True, False, False, False, False, False]
    assert centers_inside_boxes(centers, boxes, 1.0).tolist() == [True, False, False, False, False, False, False]
    assert centers_inside_boxes(centers, boxes).tolist() == [True, True, False, True, False, False, False]


def test_centers_inside_boxes_broadcasts_points_against_boxes():
    # (2, 1, 4) boxes against (1, 3, 2) points -> (2, 3): every box with every point.
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0]], [[10.0, 10.0, 20.0, 20.0]]])
    centers = torch.tensor([[[1.0, 1.0], [15.0, 15.0], [4.0, 2.0]]])
    assert centers_inside_boxes(centers, boxes).tolist() == [[True, False, False], [False, True, False]]
