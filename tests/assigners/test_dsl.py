"""DSL (RTMDet's dynamic soft label assigner): hand-built cases and a loop-per-GT restatement.

Restated from mmdetection's ``DynamicSoftLabelAssigner``:
  valid anchors: centre inside any GT (min side distance > 0);
  over valid anchors, with u = IoU(predicted box, GT) and x the class logits,
  cost[g, a] = sum_c BCEwithlogits(x_c, y_c) * |y_c - sigmoid(x_c)|^2   (y = onehot * u)
             + iou_weight * -log(u + 1e-7)
             + 10 ** (||anchor centre - GT centre|| / stride - soft_center_radius);
  dynamic k_g = max(1, int(sum of the top-min(topk, #valid) IoUs of g)); the same matching as
  SimOTA (k cheapest, ties by anchor index; conflicts to the argmin cost over all GTs, ties by
  GT slot); soft target = IoU of the predicted box with the final GT.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

import assigners
from assigners import NEGATIVE, AssignInputs
from assigners.dsl import soft_label_cost

from .conftest import as_float64, make_anchors
from .test_simota import (
    check_against_reference,
    dynamic_k_match,
    one_image,
    per_anchor_strides,
    side_distance,
)

IOU_EPS = 1e-7


def soft_cls_cost(logits: torch.Tensor, label: int, iou: torch.Tensor) -> torch.Tensor:
    """(V,) sum over classes of BCE-with-logits against the IoU-scaled one-hot, times |y - p|^2."""
    target = F.one_hot(torch.tensor(label), logits.shape[-1]).double() * iou[:, None]
    scale = (target - torch.sigmoid(logits)).abs() ** 2
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * scale).sum(dim=1)


def dsl_reference(inputs: AssignInputs, topk=13, iou_weight=3.0, soft_center_radius=3.0):
    """DSL restated with plain loops over images and GTs: (gt_index (B, A), soft_target (B, A))."""
    anchors = inputs.anchors.cpu().double()
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    strides = per_anchor_strides(inputs)
    b, a = inputs.batch_size, anchors.shape[0]
    gt_index = torch.full((b, a), NEGATIVE, dtype=torch.int64)
    soft = torch.zeros(b, a, dtype=torch.float64)
    for i in range(b):
        real = [g for g in range(inputs.num_gt_slots) if inputs.gt_mask[i, g]]
        if not real:
            continue
        valid_mask = torch.zeros(a, dtype=torch.bool)
        for g in real:
            valid_mask |= side_distance(centres, inputs.gt_boxes[i, g].cpu().double().tolist()) > 0
        valid = valid_mask.nonzero().flatten()
        if valid.numel() == 0:
            continue
        preds = inputs.pred_boxes[i].cpu().double()[valid]
        logits = inputs.cls_logits[i].cpu().double()[valid]
        costs, ious = {}, {}
        for g in real:
            box = inputs.gt_boxes[i, g].cpu().double()
            iou = box_iou(preds, box[None])[:, 0]
            gt_centre = (box[:2] + box[2:]) / 2
            distance = ((centres[valid] - gt_centre) ** 2).sum(dim=1).sqrt() / strides[valid]
            prior = torch.pow(10.0, distance - soft_center_radius)
            iou_cost = -torch.log(iou + IOU_EPS) * iou_weight
            costs[g] = soft_cls_cost(logits, int(inputs.gt_labels[i, g]), iou) + iou_cost + prior
            ious[g] = iou
        gt_index[i], soft[i] = dynamic_k_match(costs, ious, valid, topk, a)
    return gt_index, soft


# --- the loop reference on random batches -------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("kwargs", "max_gt", "batch_size"),
    [
        ({}, 6, 3),
        ({}, 12, 4),
        ({"topk": 1, "iou_weight": 1.0, "soft_center_radius": 1.0}, 6, 3),
        ({"topk": 400, "iou_weight": 5.0, "soft_center_radius": 5.0}, 8, 3),
    ],
)
def test_dsl_equals_loop_reference(make_batch, device, seed, kwargs, max_gt, batch_size):
    # Default batches end with an image without GT; topk 400 > A = 257.
    inputs = as_float64(make_batch(seed, batch_size=batch_size, max_gt=max_gt, device=device))
    assert not bool(inputs.gt_mask[-1].any())
    out = assigners.build("dsl", **kwargs)(inputs)
    assert out.gt_index.device.type == device
    expected_index, expected_soft = dsl_reference(inputs, **kwargs)
    assert bool((expected_index >= 0).any()), "the batch should have positives"
    check_against_reference(out, expected_index, expected_soft)
    assert bool((out.gt_index[-1] == NEGATIVE).all())


def test_dsl_default_parameters(make_batch):
    # build("dsl") is topk 13, iou_weight 3, soft_center_radius 3.
    inputs = as_float64(make_batch(9, batch_size=3, max_gt=6))
    expected_index, expected_soft = dsl_reference(inputs, 13, 3.0, 3.0)
    check_against_reference(assigners.build("dsl")(inputs), expected_index, expected_soft)


def test_dsl_differs_from_simota_on_random_batches(make_batch):
    # Guard: the two dynamic-k assigners are not the same function on these batches.
    from .test_simota import simota_reference

    inputs = as_float64(make_batch(0, batch_size=3, max_gt=6))
    assert not torch.equal(dsl_reference(inputs)[0], simota_reference(inputs)[0])


# --- hand-built cases ---------------------------------------------------------------------

_FAR = [200.0, 200.0, 210.0, 210.0]  # a predicted box overlapping nothing (IoU 0)


def _cost(logits, label, iou, distance_in_strides, iou_weight=3.0, radius=3.0):
    """The DSL cost of one (GT, anchor) pair, by the formula."""
    x = torch.tensor([logits], dtype=torch.float64)
    cls = float(soft_cls_cost(x, label, torch.tensor([iou], dtype=torch.float64))[0])
    return cls - math.log(iou + IOU_EPS) * iou_weight + 10 ** (distance_in_strides - radius)


def test_k_cheapest_cross_levels_and_only_in_box_anchors_are_valid():
    # make_anchors((32, 32), (8, 16)); GT [2, 2, 14, 14] (centre (8, 8)) holds the level-0
    # centres (4|12, 4|12) (anchors 0, 1, 4, 5) and the level-1 centre (8, 8) (anchor 16).
    # Predicted: 16 the GT (IoU 1), 5 [2, 2, 14, 12.8] (0.9), 0 [2, 2, 14, 9.2] (0.6), the
    # rest far. k = int(2.5) = 2. Costs (logits 0): anchor 16: 0.173 + 0 + 10^-3;
    # anchor 5: 0.111 + 0.316 + 10^(0.707 - 3); anchor 0: 0.007 + 1.532 + 10^(0.707 - 3):
    # the positives are 16 (level 1) and 5 (level 0).
    anchors, counts = make_anchors((32, 32), strides=(8, 16))
    gt = [2.0, 2.0, 14.0, 14.0]
    preds = [_FAR] * 20
    preds[16], preds[5], preds[0] = gt, [2, 2, 14, 12.8], [2, 2, 14, 9.2]
    c16, c5, c0 = _cost([0.0], 0, 1.0, 0.0), _cost([0.0], 0, 0.9, math.sqrt(32) / 8), _cost([0.0], 0, 0.6, math.sqrt(32) / 8)
    assert c16 < c5 < c0
    inputs = one_image(anchors, [gt], [0], [0.0] * 20, preds, strides=[8, 16], counts=counts)
    out = assigners.build("dsl")(inputs)
    expected = [NEGATIVE] * 20
    expected[5] = expected[16] = 0
    assert out.gt_index.tolist() == [expected]
    assert out.soft_target[0, 16].item() == pytest.approx(1.0, abs=1e-9)
    assert out.soft_target[0, 5].item() == pytest.approx(0.9, abs=1e-9)


def test_tiny_gt_between_anchor_centres_has_no_positive():
    # GT [13, 13, 15, 15] holds no centre of make_anchors((32, 32), (8,)) (centres 4, 12, 20,
    # 28): no valid anchor, so no positive even with every prediction on the GT (SimOTA's
    # centre region would still give it one, see test_simota).
    anchors, counts = make_anchors((32, 32), strides=(8,))
    gt = [13.0, 13.0, 15.0, 15.0]
    inputs = one_image(anchors, [gt], [0], [2.0] * 16, [gt] * 16, strides=[8], counts=counts)
    assert assigners.build("dsl")(inputs).gt_index.tolist() == [[NEGATIVE] * 16]


def test_conflict_is_decided_by_the_centre_prior():
    # GT A = [0, 0, 20, 20] (centre (10, 10)), GT B = [4, 0, 24, 20] (centre (14, 10)), one
    # class. One valid anchor, centred (13, 10) (inside both), predicting [2, 0, 22, 20]:
    # IoU 360/440 with each, so the class and IoU costs are equal; the centre priors are
    # 10^(3/8 - 3) for A and 10^(1/8 - 3) for B. k = 1 each, both take it, it goes to B.
    a, b = [0.0, 0.0, 20.0, 20.0], [4.0, 0.0, 24.0, 20.0]
    anchors = [[5, 2, 21, 18], [92, 92, 108, 108]]
    preds = [[2, 0, 22, 20], _FAR]
    assert _cost([0.5], 0, 360 / 440, 1 / 8) < _cost([0.5], 0, 360 / 440, 3 / 8)
    out = assigners.build("dsl")(one_image(anchors, [a, b], [0, 0], [0.5, 0.5], preds, [8]))
    assert out.gt_index.tolist() == [[1, NEGATIVE]]
    assert out.soft_target[0, 0].item() == pytest.approx(360 / 440, abs=1e-9)
    out = assigners.build("dsl")(one_image(anchors, [b, a], [0, 0], [0.5, 0.5], preds, [8]))
    assert out.gt_index.tolist() == [[0, NEGATIVE]]


def test_conflict_argmin_runs_over_all_gts():
    # Three copies of GT [0, 0, 24, 20] (classes 0, 1, 2); anchors centred (10, 10) and
    # (14, 10), predicting IoU 0.5 and 0.4 (k = int(0.9) -> 1 for each GT). By the formula
    # (logits (3, 3, 3.5) and (-8, -8, 8)) the costs are A, B: 8.49 (anchor 0), 11.26
    # (anchor 1); C: 8.01, 4.48. A and B take anchor 0, C anchor 1; anchor 0 goes to the
    # argmin of its cost over all three GTs, C, which had not taken it, as in SimOTA.
    gt = [0.0, 0.0, 24.0, 20.0]
    anchors = [[2, 2, 18, 18], [6, 2, 22, 18], [92, 92, 108, 108]]
    preds = [[0, 0, 24, 10], [0, 0, 24, 8], _FAR]
    logits = [[3.0, 3.0, 3.5], [-8.0, -8.0, 8.0], [0.0, 0.0, 0.0]]
    iou, distance = [0.5, 0.4], [2 / 8, 2 / 8]
    cost = [[_cost(logits[j], g, iou[j], distance[j]) for j in range(2)] for g in range(3)]
    assert cost[0][0] < cost[0][1] and cost[1][0] < cost[1][1] and cost[2][1] < cost[2][0]
    assert cost[2][0] < min(cost[0][0], cost[1][0])
    inputs = one_image(anchors, [gt] * 3, [0, 1, 2], logits, preds, [8], num_classes=3)
    out = assigners.build("dsl")(inputs)
    assert out.gt_index.tolist() == [[2, 2, NEGATIVE]]
    assert out.soft_target[0, :2].tolist() == pytest.approx([0.5, 0.4], abs=1e-9)


def test_centre_prior_is_measured_in_the_anchor_levels_stride():
    # Two anchors at the same centre (13, 10), 3 px from the centre of GT [0, 0, 20, 20], on
    # levels of stride 8 and 32, with equal predictions (IoU 0.6 each: k = int(1.2) = 1) and
    # logits. Only the priors differ: 10^(3/8 - 3) > 10^(3/32 - 3): the stride-32 anchor wins.
    gt = [0.0, 0.0, 20.0, 20.0]
    anchors = [[5, 2, 21, 18], [5, 2, 21, 18]]
    preds = [[0, 0, 20, 12]] * 2
    out = assigners.build("dsl")(one_image(anchors, [gt], [0], [0.0, 0.0], preds, strides=[8, 32], counts=[1, 1]))
    assert out.gt_index.tolist() == [[NEGATIVE, 0]]
    out = assigners.build("dsl")(one_image(anchors, [gt], [0], [0.0, 0.0], preds, strides=[32, 8], counts=[1, 1]))
    assert out.gt_index.tolist() == [[0, NEGATIVE]]


def test_soft_label_prefers_a_score_matching_the_iou():
    # GT [0, 0, 20, 20]; two anchors equidistant from its centre ((6, 10) and (14, 10)), both
    # predicting [0, 0, 20, 12] (IoU 0.6; k = int(1.2) = 1). Anchor 0 scores 0.9, anchor 1
    # 0.6 = its IoU: anchor 1's class cost is BCE * |0.6 - 0.6|^2 = 0, anchor 0's is
    # BCE(logit(0.9), 0.6) * 0.09 = 0.089. The soft label picks anchor 1 (a hard one-hot
    # label would prefer the higher score, anchor 0).
    gt = [0.0, 0.0, 20.0, 20.0]
    anchors = [[-2, 2, 14, 18], [6, 2, 22, 18]]
    logits = [math.log(0.9 / 0.1), math.log(0.6 / 0.4)]
    preds = [[0, 0, 20, 12]] * 2
    assert _cost([logits[0]], 0, 0.6, 0.5) - _cost([logits[1]], 0, 0.6, 0.5) == pytest.approx(
        (-(0.6 * math.log(0.9) + 0.4 * math.log(0.1))) * 0.09, abs=1e-9
    )
    out = assigners.build("dsl")(one_image(anchors, [gt], [0], logits, preds, [8]))
    assert out.gt_index.tolist() == [[NEGATIVE, 0]]
    assert out.soft_target[0, 1].item() == pytest.approx(0.6, abs=1e-9)


def test_image_without_gt_is_all_negative(make_batch):
    inputs = make_batch(2, batch_size=2, max_gt=4)
    inputs = dataclasses.replace(inputs, gt_mask=torch.zeros_like(inputs.gt_mask))
    out = assigners.build("dsl")(inputs)
    assert out.gt_index.tolist() == [[NEGATIVE] * inputs.anchors.shape[0]] * 2


# --- parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"topk": 0},
        {"topk": -1},
        {"topk": 2.5},
        {"topk": True},
        {"iou_weight": -1.0},
        {"iou_weight": float("nan")},
        {"soft_center_radius": float("nan")},
        {"soft_center_radius": float("inf")},
    ],
)
def test_rejects_bad_parameters(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        assigners.build("dsl", **kwargs)


def test_needs_strides(make_batch):
    inputs = dataclasses.replace(make_batch(0), strides=None)
    with pytest.raises(ValueError, match="strides"):
        assigners.build("dsl")(inputs)


def test_needs_predictions(make_batch):
    with pytest.raises(ValueError, match="cls_logits"):
        assigners.build("dsl")(make_batch(0, predictions=False))


def test_soft_label_cost_at_the_given_rows_is_the_dense_per_class_sum():
    # The oracle builds the (B, G, A, C) soft labels y = onehot * IoU and sums over C.
    torch.manual_seed(5)
    logits = torch.randn(2, 6, 4, dtype=torch.float64) * 3
    labels = torch.tensor([[2, 0], [1, 1]])
    iou = torch.rand(2, 2, 6, dtype=torch.float64)
    rows = torch.tensor([[True, True, False, True, False, True], [False, True, True, False, True, True]])
    x = logits.unsqueeze(1).expand(-1, 2, -1, -1)  # (B, G, A, C)
    y = F.one_hot(labels, 4).double().unsqueeze(2) * iou.unsqueeze(-1)
    expected = (F.binary_cross_entropy_with_logits(x, y, reduction="none") * (y - torch.sigmoid(x)).square()).sum(dim=-1)
    got = soft_label_cost(logits, labels, iou, rows)
    assert got.shape == (2, 2, 6)
    mask = rows.unsqueeze(1).expand_as(got)
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-12, atol=1e-12)
