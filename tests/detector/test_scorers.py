"""Quality targets and unified scores on hand-computed boxes."""

import math

import pytest
import torch
from torchvision.ops import box_iou

from detector import build_scorer, centerness, elementwise_box_iou


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def test_build_scorer_names_and_flags():
    assert not build_scorer("none").uses_quality_branch
    assert build_scorer("centerness").uses_quality_branch
    assert build_scorer("iou").uses_quality_branch
    with pytest.raises(ValueError, match="none, centerness, iou"):
        build_scorer("giou")


def test_centerness_targets_by_hand():
    gt = torch.tensor([[0.0, 0.0, 10.0, 20.0]]).repeat(3, 1)
    # Anchor centres: (2, 5) -> l, r = 2, 8 and t, b = 5, 15; (5, 10) is the box centre; (-1, 5) is outside.
    anchors = torch.tensor([[0.0, 3.0, 4.0, 7.0], [3.0, 8.0, 7.0, 12.0], [-3.0, 3.0, 1.0, 7.0]])
    targets = build_scorer("centerness").targets(anchors, torch.zeros(3, 4), gt)
    torch.testing.assert_close(targets, torch.tensor([math.sqrt(2 / 8 * 5 / 15), 1.0, 0.0]))


def test_centerness_of_degenerate_box_is_finite():
    value = centerness(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    assert torch.isfinite(value).all() and float(value) == 0.0


def test_iou_targets_by_hand_use_predicted_boxes():
    pred = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]], requires_grad=True)
    gt = torch.tensor([[5.0, 0.0, 15.0, 10.0], [0.0, 0.0, 2.0, 2.0]])
    anchors = torch.tensor([[100.0, 100.0, 110.0, 110.0]] * 2)  # anchors play no part in the IoU target
    targets = build_scorer("iou").targets(anchors, pred, gt)
    # Overlap 5x10 = 50 over union 150; overlap 4 over union 16.
    torch.testing.assert_close(targets, torch.tensor([50 / 150, 4 / 16]))
    assert not targets.requires_grad


def test_elementwise_iou_matches_torchvision_diagonal():
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=generator) * 50
    boxes1 = torch.cat([xy, xy + torch.rand(20, 2, generator=generator) * 30 + 1], dim=1)
    xy = torch.rand(20, 2, generator=generator) * 50
    boxes2 = torch.cat([xy, xy + torch.rand(20, 2, generator=generator) * 30 + 1], dim=1)
    torch.testing.assert_close(elementwise_box_iou(boxes1, boxes2), box_iou(boxes1, boxes2).diagonal())


def test_none_scorer_targets_are_unit_weights():
    targets = build_scorer("none").targets(torch.zeros(3, 4), torch.zeros(3, 4), torch.ones(3, 4))
    torch.testing.assert_close(targets, torch.ones(3))


def test_unified_score_reorders_detections():
    cls_prob = torch.tensor([0.9, 0.6])
    quality_logit = torch.tensor([logit(0.1), logit(0.9)])
    # sqrt(0.9 * 0.1) = 0.3 < sqrt(0.6 * 0.9) = 0.7348...: the better-localised box wins.
    for name in ("iou", "centerness"):
        score = build_scorer(name).inference_score(cls_prob, quality_logit)
        torch.testing.assert_close(score, torch.tensor([0.3, math.sqrt(0.54)]))
        assert score.argmax() == 1
    plain = build_scorer("none").inference_score(cls_prob, None)
    torch.testing.assert_close(plain, cls_prob)
    assert plain.argmax() == 0
    with pytest.raises(ValueError, match="quality"):
        build_scorer("iou").inference_score(cls_prob, None)
