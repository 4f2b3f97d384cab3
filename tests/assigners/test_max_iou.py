"""MaxIoU (``max_iou``) assigner and the GT-anchor IoU it matches on, against torchvision oracles."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.ops import box_iou

import assigners
from assigners import IGNORED, NEGATIVE, AssignInputs, gt_anchor_iou
from assigners.max_iou import max_iou_match


def _inputs(anchors, gt_boxes, gt_mask=None):
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(1, -1, 4)
    g = gt_boxes.shape[1]
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    return AssignInputs(
        anchors=anchors,
        num_anchors_per_level=[anchors.shape[0]],
        gt_boxes=gt_boxes,
        gt_labels=torch.zeros(1, g, dtype=torch.int64),
        gt_mask=torch.ones(1, g, dtype=torch.bool) if gt_mask is None else torch.as_tensor(gt_mask).reshape(1, g),
    )


def test_gt_anchor_iou_marks_padded_rows(make_batch):
    inputs = make_batch(0, predictions=False)
    iou = gt_anchor_iou(inputs)
    assert iou.shape == (inputs.batch_size, inputs.num_gt_slots, inputs.anchors.shape[0])
    assert bool((iou[~inputs.gt_mask] == -1).all())
    real = iou[inputs.gt_mask]
    assert bool(((real >= 0) & (real <= 1)).all())


def test_max_iou_assigner_hand_built():
    # GT [0, 0, 10, 10]; anchors with IoU 1, 0.6, 0.45 and 0.
    anchors = [[0, 0, 10, 10], [0, 0, 10, 6], [0, 0, 4.5, 10], [20, 20, 30, 30]]
    out = assigners.build("max_iou")(_inputs(anchors, [[0, 0, 10, 10]]))
    assert out.gt_index.tolist() == [[0, 0, IGNORED, NEGATIVE]]


def test_max_iou_assigner_keeps_low_quality_best_anchor():
    # The GT's best anchor has IoU 0.3 (< 0.4): it is still positive; the other is negative.
    anchors = [[0, 0, 3, 10], [0, 0, 1, 10]]
    out = assigners.build("max_iou")(_inputs(anchors, [[0, 0, 10, 10]]))
    assert out.gt_index.tolist() == [[0, NEGATIVE]]
    out = assigners.build("max_iou", allow_low_quality=False)(_inputs(anchors, [[0, 0, 10, 10]]))
    assert out.gt_index.tolist() == [[NEGATIVE, NEGATIVE]]


def test_max_iou_assigner_resolves_two_gts_by_highest_iou():
    # The anchor overlaps GT 1 more than GT 0.
    anchors = [[0, 0, 10, 10]]
    out = assigners.build("max_iou")(_inputs(anchors, [[0, 0, 10, 18], [0, 0, 10, 12]]))
    assert out.gt_index.tolist() == [[1]]


def _matcher_reference(inputs: AssignInputs) -> torch.Tensor:
    """torchvision's Matcher per image on the real GT rows, mapped back to GT slots."""
    matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
    result = torch.full((inputs.batch_size, inputs.anchors.shape[0]), NEGATIVE, dtype=torch.int64)
    for i in range(inputs.batch_size):
        slots = inputs.gt_mask[i].nonzero().flatten()
        if slots.numel() == 0:
            continue  # torchvision refuses images without GT: every anchor is background
        matches = matcher(box_iou(inputs.gt_boxes[i, slots], inputs.anchors))
        result[i] = torch.where(matches >= 0, slots[matches.clamp(min=0)], matches)
    return result


@pytest.mark.parametrize("seed", range(6))
def test_max_iou_assigner_equals_torchvision_matcher(make_batch, seed):
    inputs = make_batch(seed, batch_size=4, max_gt=7, predictions=False)
    assert not bool(inputs.gt_mask[-1].any()), "the batch should include an image without GT"
    out = assigners.build("max_iou")(inputs)
    assert torch.equal(out.gt_index, _matcher_reference(inputs))


def test_max_iou_match_with_zero_gt_slots():
    iou = torch.zeros(2, 0, 5)
    out = max_iou_match(iou, torch.zeros(2, 0, dtype=torch.bool), 0.5, 0.4, True)
    assert out.tolist() == [[NEGATIVE] * 5] * 2


def test_max_iou_assigner_rejects_bad_thresholds():
    with pytest.raises(ValueError, match="neg_iou"):
        assigners.build("max_iou", pos_iou=0.3, neg_iou=0.4)
    with pytest.raises(ValueError, match="valid choices"):
        assigners.build("no-such-assigner")
