"""SimOTA (YOLOX, as mmdetection's SimOTAAssigner): hand-built cases and a loop-per-GT restatement.

Restated from mmdetection's ``SimOTAAssigner`` (= YOLOX before its #1589), with p = sigmoid(logits)
(no objectness, no square root):
  valid anchors: centre inside any GT (min side distance > 0) or inside any GT's centre region
  (|centre - GT centre| < center_radius * stride on both axes);
  over valid anchors, cost[g, a] = cls_weight * sum_c BCE(p_c, onehot_c) + iou_weight * -log(IoU + 1e-7)
  + 1e5 * not (inside g's box and g's centre region);
  dynamic k_g = max(1, int(sum of the top-min(candidate_topk, #valid) IoUs of g));
  each GT takes its k_g cheapest valid anchors (ties: lower anchor index); an anchor taken by
  several GTs goes to the argmin of its cost over all GTs (ties: lower GT); soft target = IoU.
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
from assigners.simota import one_hot_bce_cost

from .conftest import as_float64, make_anchors

IOU_EPS = 1e-7
OUTSIDE_COST = 1e5


def one_image(anchors, gt_boxes, gt_labels, logits, preds, strides, counts=None, num_classes=1):
    """AssignInputs of one image from plain lists (float64); logits (A,) or (A, C)."""
    anchors = torch.as_tensor(anchors, dtype=torch.float64).reshape(-1, 4)
    a = anchors.shape[0]
    gt = torch.as_tensor(gt_boxes, dtype=torch.float64).reshape(1, -1, 4)
    g = gt.shape[1]
    logits = torch.as_tensor(logits, dtype=torch.float64).reshape(1, a, -1)
    assert logits.shape[-1] == num_classes
    return AssignInputs(
        anchors=anchors,
        num_anchors_per_level=counts or [a],
        gt_boxes=gt,
        gt_labels=torch.as_tensor(gt_labels, dtype=torch.int64).reshape(1, g),
        gt_mask=torch.ones(1, g, dtype=torch.bool),
        cls_logits=logits,
        pred_boxes=torch.as_tensor(preds, dtype=torch.float64).reshape(1, a, 4),
        strides=strides,
    )


def per_anchor_strides(inputs: AssignInputs) -> torch.Tensor:
    """(A,) float64 stride of each anchor, from its level."""
    values = []
    for count, stride in zip(inputs.num_anchors_per_level, inputs.strides):
        values += [float(stride)] * count
    return torch.tensor(values, dtype=torch.float64)


def side_distance(points: torch.Tensor, box) -> torch.Tensor:
    """(N,) min of the distances from each (x, y) point to the four sides of an xyxy box."""
    x, y = points[:, 0], points[:, 1]
    x1, y1, x2, y2 = box
    return torch.stack([x - x1, y - y1, x2 - x, y2 - y], dim=1).amin(dim=1)


def dynamic_k_match(costs: dict, ious: dict, valid: torch.Tensor, topk: int, num_anchors: int):
    """The SimOTA / DSL matching over the valid anchors of one image, by loops.

    costs, ious: {gt slot: (V,) float64 over the valid anchors ``valid`` (V,) anchor indices},
    slots in increasing order. Returns (gt_index (A,) int64, soft_target (A,) float64).
    """
    v = valid.numel()
    taken = {a: [] for a in range(v)}
    for g in costs:
        k = max(1, int(torch.sort(ious[g], descending=True).values[: min(topk, v)].sum()))
        for a in torch.argsort(costs[g], stable=True)[:k].tolist():
            taken[a].append(g)
    gt_index = torch.full((num_anchors,), NEGATIVE, dtype=torch.int64)
    soft = torch.zeros(num_anchors, dtype=torch.float64)
    for a, takers in taken.items():
        if not takers:
            continue
        winner = takers[0]
        if len(takers) > 1:
            # The argmin of this anchor's cost over every GT of the image, the lowest slot on ties.
            winner = None
            for g in costs:
                if winner is None or costs[g][a] < costs[winner][a]:
                    winner = g
        gt_index[valid[a]] = winner
        soft[valid[a]] = ious[winner][a]
    return gt_index, soft


def simota_reference(inputs: AssignInputs, center_radius=2.5, candidate_topk=10, iou_weight=3.0, cls_weight=1.0):
    """SimOTA restated with plain loops over images and GTs: (gt_index (B, A), soft_target (B, A))."""
    anchors = inputs.anchors.cpu().double()
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    strides = per_anchor_strides(inputs)
    b, a = inputs.batch_size, anchors.shape[0]
    num_classes = inputs.cls_logits.shape[-1]
    gt_index = torch.full((b, a), NEGATIVE, dtype=torch.int64)
    soft = torch.zeros(b, a, dtype=torch.float64)
    for i in range(b):
        real = [g for g in range(inputs.num_gt_slots) if inputs.gt_mask[i, g]]
        if not real:
            continue
        in_box, in_centre = {}, {}
        for g in real:
            x1, y1, x2, y2 = inputs.gt_boxes[i, g].cpu().double().tolist()
            in_box[g] = side_distance(centres, (x1, y1, x2, y2)) > 0
            gx, gy = (x1 + x2) / 2, (y1 + y2) / 2
            r = center_radius * strides
            region = torch.stack([centres[:, 0] - (gx - r), centres[:, 1] - (gy - r),
                                  (gx + r) - centres[:, 0], (gy + r) - centres[:, 1]], dim=1)
            in_centre[g] = region.amin(dim=1) > 0
        valid_mask = torch.zeros(a, dtype=torch.bool)
        for g in real:
            valid_mask |= in_box[g] | in_centre[g]
        valid = valid_mask.nonzero().flatten()
        if valid.numel() == 0:
            continue
        preds = inputs.pred_boxes[i].cpu().double()[valid]
        probs = torch.sigmoid(inputs.cls_logits[i].cpu().double()[valid])
        costs, ious = {}, {}
        for g in real:
            box = inputs.gt_boxes[i, g].cpu().double()
            iou = box_iou(preds, box[None])[:, 0]
            onehot = F.one_hot(inputs.gt_labels[i, g].cpu(), num_classes).double().expand_as(probs)
            cls_cost = F.binary_cross_entropy(probs, onehot, reduction="none").sum(dim=1)
            both = in_box[g][valid] & in_centre[g][valid]
            costs[g] = cls_weight * cls_cost + iou_weight * -torch.log(iou + IOU_EPS) + OUTSIDE_COST * (~both).double()
            ious[g] = iou
        gt_index[i], soft[i] = dynamic_k_match(costs, ious, valid, candidate_topk, a)
    return gt_index, soft


def check_against_reference(out, expected_index, expected_soft):
    assert out.gt_index.dtype == torch.int64
    assert torch.equal(out.gt_index.cpu(), expected_index)
    positive = expected_index >= 0
    assert out.soft_target is not None
    got = out.soft_target.cpu().double()[positive]
    torch.testing.assert_close(got, expected_soft[positive], rtol=1e-6, atol=1e-9)
    assert bool(((got >= 0) & (got <= 1)).all())


# --- the loop reference on random batches -------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("kwargs", "max_gt", "batch_size"),
    [
        ({}, 6, 3),
        ({}, 12, 4),
        ({"center_radius": 1.0, "candidate_topk": 3}, 6, 3),
        ({"center_radius": 5.0, "candidate_topk": 400, "iou_weight": 1.0, "cls_weight": 2.0}, 8, 3),
    ],
)
def test_simota_equals_loop_reference(make_batch, device, seed, kwargs, max_gt, batch_size):
    # Default batches end with an image without GT; candidate_topk 400 > A = 257.
    inputs = as_float64(make_batch(seed, batch_size=batch_size, max_gt=max_gt, device=device))
    assert not bool(inputs.gt_mask[-1].any())
    out = assigners.build("simota", **kwargs)(inputs)
    assert out.gt_index.device.type == device
    expected_index, expected_soft = simota_reference(inputs, **kwargs)
    assert bool((expected_index >= 0).any()), "the batch should have positives"
    check_against_reference(out, expected_index, expected_soft)
    assert bool((out.gt_index[-1] == NEGATIVE).all())


def test_simota_default_parameters(make_batch):
    # build("simota") is center_radius 2.5, candidate_topk 10, iou_weight 3, cls_weight 1.
    inputs = as_float64(make_batch(9, batch_size=3, max_gt=6))
    expected_index, expected_soft = simota_reference(inputs, 2.5, 10, 3.0, 1.0)
    check_against_reference(assigners.build("simota")(inputs), expected_index, expected_soft)


# --- hand-built cases ---------------------------------------------------------------------

# make_anchors((32, 32), (8, 16)): level 0 (stride 8) centres x, y in {4, 12, 20, 28}
# (anchor index 4 * row + column), level 1 (stride 16) centres in {8, 24} (16 + 2 * row + column).
_TWO_LEVELS = make_anchors((32, 32), strides=(8, 16))
_FAR = [200.0, 200.0, 210.0, 210.0]  # a predicted box overlapping nothing (IoU 0)


def test_k_cheapest_cross_levels_and_dynamic_k_truncates():
    # GT [2, 2, 14, 14] (centre (8, 8)). Predicted boxes: anchor 16 (level 1, centre (8, 8))
    # is the GT (IoU 1), anchor 5 (level 0, centre (12, 12)) [2, 2, 14, 12.8] (IoU 0.9),
    # anchor 0 (centre (4, 4)) [2, 2, 14, 9.2] (IoU 0.6), all others far (IoU 0).
    # k = int(1 + 0.9 + 0.6) = 2. Equal logits give equal class costs, so the two cheapest are
    # 16 and 5 (IoU costs 0, 0.32; anchor 0's is 1.53): positives on two levels.
    anchors, counts = _TWO_LEVELS
    gt = [2.0, 2.0, 14.0, 14.0]
    preds = [_FAR] * 20
    preds[16], preds[5], preds[0] = gt, [2, 2, 14, 12.8], [2, 2, 14, 9.2]
    inputs = one_image(anchors, [gt], [0], [0.0] * 20, preds, strides=[8, 16], counts=counts)
    out = assigners.build("simota")(inputs)
    expected = [NEGATIVE] * 20
    expected[5] = expected[16] = 0
    assert out.gt_index.tolist() == [expected]
    assert out.soft_target[0, 16].item() == pytest.approx(1.0, abs=1e-9)
    assert out.soft_target[0, 5].item() == pytest.approx(0.9, abs=1e-9)


def test_anchor_outside_the_centre_region_pays_the_large_cost():
    # GT [0, 0, 100, 20], centre (50, 10); stride 8, radius 2.5: region x in (30, 70).
    # Anchor 0 centred (10, 10): in the box, outside the region, predicted box = GT (IoU 1).
    # Anchor 1 centred (50, 10): in both, predicted [0, 0, 30, 20] (IoU 0.3).
    # k = int(1.3) = 1 and anchor 0 costs 1e5 more: anchor 1 is the positive, target 0.3.
    gt = [0.0, 0.0, 100.0, 20.0]
    anchors = [[2, 2, 18, 18], [42, 2, 58, 18]]
    inputs = one_image(anchors, [gt], [0], [0.0, 0.0], [gt, [0, 0, 30, 20]], strides=[8])
    out = assigners.build("simota")(inputs)
    assert out.gt_index.tolist() == [[NEGATIVE, 0]]
    assert out.soft_target[0, 1].item() == pytest.approx(0.3, abs=1e-9)


def test_tiny_gt_between_centres_gets_a_positive_from_its_centre_region():
    # make_anchors((32, 32), (8,)): centres {4, 12, 20, 28}^2. GT [13, 13, 15, 15] (centre
    # (14, 14)) holds no centre, but its centre region |c - 14| < 20 holds all 16 anchors,
    # which are valid (with the 1e5 cost each, as none is in the box). Anchor 5 (centre
    # (12, 12)) predicts the GT (IoU 1), the others a far box: k = int(1) = 1 and anchor 5 is
    # the cheapest (IoU cost 0 against 48.4): it is positive, target 1.
    anchors, counts = make_anchors((32, 32), strides=(8,))
    gt = [13.0, 13.0, 15.0, 15.0]
    preds = [_FAR] * 16
    preds[5] = gt
    inputs = one_image(anchors, [gt], [0], [0.0] * 16, preds, strides=[8], counts=counts)
    out = assigners.build("simota")(inputs)
    expected = [NEGATIVE] * 16
    expected[5] = 0
    assert out.gt_index.tolist() == [expected]
    assert out.soft_target[0, 5].item() == pytest.approx(1.0, abs=1e-9)
    # With all IoUs 0, k is still max(1, 0) = 1: one positive, the lowest anchor index of
    # the (equal) cheapest, anchor 0.
    inputs = one_image(anchors, [gt], [0], [0.0] * 16, [_FAR] * 16, strides=[8], counts=counts)
    out = assigners.build("simota")(inputs)
    assert out.gt_index.tolist() == [[0] + [NEGATIVE] * 15]
    assert out.soft_target[0, 0].item() == pytest.approx(0.0, abs=1e-9)
    # Radius 0.2: region |c - 14| < 1.6 holds no centre either: no valid anchor, no positive.
    out = assigners.build("simota", center_radius=0.2)(inputs)
    assert out.gt_index.tolist() == [[NEGATIVE] * 16]


# Two anchors centred (10, 10) and (14, 10), both inside the GT [0, 0, 24, 20] (centre (12, 10))
# and its centre region (stride 8, radius 2.5), and a third far away (invalid).
_PAIR_ANCHORS = [[2, 2, 18, 18], [6, 2, 22, 18], [92, 92, 108, 108]]
_PAIR_GT = [0.0, 0.0, 24.0, 20.0]
_PAIR_PREDS = [[0, 0, 24, 10], [0, 0, 24, 8], _FAR]  # IoU 0.5 and 0.4 with the GT


def _class_cost(logits, label):
    p = torch.sigmoid(torch.tensor(logits, dtype=torch.float64))
    onehot = F.one_hot(torch.tensor(label), len(logits)).double()
    return float(F.binary_cross_entropy(p, onehot, reduction="sum"))


def test_conflict_goes_to_the_cheapest_gt_by_cost_not_iou():
    # Two GTs: A = the pair GT (class 0) and B = [0, 0, 24, 18] (class 1); one valid anchor
    # (anchor 0, (10, 10)) matters: anchor 1 predicts far away. Anchor 0's predicted box
    # [0, 0, 24, 10] has IoU 0.5 with A and 240/432 = 0.556 with B, but its logits (4, -4)
    # favour class 0: cost_A = 0.036 + 3 * 0.693 = 2.12, cost_B = 8.04 + 3 * 0.588 = 9.80.
    # Both GTs take it (k = 1: IoU sums < 2) and it goes to A, the cheaper, in either order.
    a, b = _PAIR_GT, [0.0, 0.0, 24.0, 18.0]
    preds = [_PAIR_PREDS[0], _FAR, _FAR]
    logits = [[4.0, -4.0], [0.0, 0.0], [0.0, 0.0]]
    cost_a = _class_cost([4.0, -4.0], 0) - 3 * math.log(0.5 + 1e-7)
    cost_b = _class_cost([4.0, -4.0], 1) - 3 * math.log(240 / 432 + 1e-7)
    assert cost_a < cost_b
    out = assigners.build("simota")(one_image(_PAIR_ANCHORS, [a, b], [0, 1], logits, preds, [8], num_classes=2))
    # Anchor 1 (IoU 0 with both) is no GT's cheapest: negative.
    assert out.gt_index.tolist() == [[0, NEGATIVE, NEGATIVE]]
    assert out.soft_target[0, 0].item() == pytest.approx(0.5, abs=1e-9)
    out = assigners.build("simota")(one_image(_PAIR_ANCHORS, [b, a], [1, 0], logits, preds, [8], num_classes=2))
    assert out.gt_index.tolist() == [[1, NEGATIVE, NEGATIVE]]


def test_conflict_argmin_runs_over_all_gts_even_one_that_did_not_take_the_anchor():
    # Three copies of the pair GT with classes 0, 1, 2 (C = 3): IoUs are 0.5 (anchor 0) and
    # 0.4 (anchor 1) for all three, so k = int(0.9) -> 1 each and the class costs decide.
    # Anchor 0 logits (0, 0, 1): class costs 2.699, 2.699, 1.699; anchor 1 logits (-5, -5, 5):
    # 10.02, 10.02, 0.020. With IoU costs 2.079 (anchor 0) and 2.749 (anchor 1):
    #   A (class 0) and B (class 1) take anchor 0 (4.78 < 12.77); C (class 2) takes anchor 1
    #   (2.77 < 3.78). Anchor 0 is taken twice and goes to the argmin of its cost over all
    #   GTs: C (3.78 < 4.78), which had not taken it. C ends with both anchors, A and B none.
    gts = [_PAIR_GT] * 3
    logits = [[0.0, 0.0, 1.0], [-5.0, -5.0, 5.0], [0.0, 0.0, 0.0]]
    iou_cost = [-3 * math.log(0.5 + 1e-7), -3 * math.log(0.4 + 1e-7)]
    cost = [[_class_cost(logits[a], g) + iou_cost[a] for a in range(2)] for g in range(3)]
    assert cost[0][0] < cost[0][1] and cost[1][0] < cost[1][1] and cost[2][1] < cost[2][0]
    assert cost[2][0] < min(cost[0][0], cost[1][0])
    inputs = one_image(_PAIR_ANCHORS, gts, [0, 1, 2], logits, _PAIR_PREDS, [8], num_classes=3)
    out = assigners.build("simota")(inputs)
    assert out.gt_index.tolist() == [[2, 2, NEGATIVE]]
    assert out.soft_target[0, :2].tolist() == pytest.approx([0.5, 0.4], abs=1e-9)


def test_conflict_with_equal_costs_goes_to_the_lower_gt_index():
    # Two identical GTs with the same class: equal costs everywhere; k = 1 each, both take
    # anchor 0 (IoU 0.5 beats 0.4); the tie goes to slot 0.
    inputs = one_image(_PAIR_ANCHORS, [_PAIR_GT, _PAIR_GT], [0, 0], [0.0] * 3, _PAIR_PREDS, [8])
    out = assigners.build("simota")(inputs)
    assert out.gt_index.tolist() == [[0, NEGATIVE, NEGATIVE]]


def test_image_without_gt_is_all_negative(make_batch):
    inputs = make_batch(2, batch_size=2, max_gt=4)
    inputs = dataclasses.replace(inputs, gt_mask=torch.zeros_like(inputs.gt_mask))
    out = assigners.build("simota")(inputs)
    assert out.gt_index.tolist() == [[NEGATIVE] * inputs.anchors.shape[0]] * 2


def test_centre_region_is_measured_in_the_anchor_levels_stride():
    # GT [0, 0, 4, 4] (centre (2, 2)) holds neither anchor centre (12, 2). For the level-0
    # anchor (stride 8), |dx| = 10 < 2.5 * 8 = 20: valid; for the level-1 one (stride 2),
    # 10 >= 2.5 * 2 = 5: not valid. Each predicts the GT (IoU 1), so k = 1 and
    # only the stride-8 one can be taken (anchor 1 is not valid, whatever its cost).
    gt = [0.0, 0.0, 4.0, 4.0]
    anchors = [[8, -2, 16, 6], [8, -2, 16, 6]]
    logits = [-1.0, 3.0]  # the invalid anchor would be the cheaper
    inputs = one_image(anchors, [gt], [0], logits, [gt, gt], strides=[8, 2], counts=[1, 1])
    out = assigners.build("simota")(inputs)
    assert out.gt_index.tolist() == [[0, NEGATIVE]]
    # Swap the strides: now only anchor 1 is valid.
    inputs = one_image(anchors, [gt], [0], logits, [gt, gt], strides=[2, 8], counts=[1, 1])
    assert assigners.build("simota")(inputs).gt_index.tolist() == [[NEGATIVE, 0]]


# --- parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"candidate_topk": 0},
        {"candidate_topk": -1},
        {"candidate_topk": 2.5},
        {"candidate_topk": True},
        {"center_radius": 0.0},
        {"center_radius": -1.0},
        {"center_radius": float("nan")},
        {"iou_weight": -1.0},
        {"iou_weight": float("nan")},
        {"cls_weight": -1.0},
        {"cls_weight": float("inf")},
    ],
)
def test_rejects_bad_parameters(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        assigners.build("simota", **kwargs)


def test_needs_strides(make_batch):
    inputs = dataclasses.replace(make_batch(0), strides=None)
    with pytest.raises(ValueError, match="strides"):
        assigners.build("simota")(inputs)


def test_needs_predictions(make_batch):
    with pytest.raises(ValueError, match="cls_logits"):
        assigners.build("simota")(make_batch(0, predictions=False))


def test_one_hot_bce_cost_at_the_given_rows_is_the_dense_per_class_sum():
    # The oracle builds the (B, G, A, C) one-hot targets and sums F.binary_cross_entropy over C.
    torch.manual_seed(3)
    logits = torch.randn(2, 7, 5, dtype=torch.float64) * 4
    logits[0, 2, 1], logits[1, 4, 3] = 200.0, -200.0  # saturated probabilities: the log clamp at -100
    labels = torch.tensor([[1, 4, 0], [3, 3, 2]])
    rows = torch.tensor([[True, False, True, True, False, True, True], [False, True, True, True, True, False, True]])
    probs = torch.sigmoid(logits).unsqueeze(1).expand(-1, 3, -1, -1)  # (B, G, A, C)
    onehot = F.one_hot(labels, 5).double().unsqueeze(2).expand_as(probs)
    expected = F.binary_cross_entropy(probs, onehot, reduction="none").sum(dim=-1)  # (B, G, A)
    got = one_hot_bce_cost(logits, labels, torch.float64, rows)
    assert got.shape == (2, 3, 7)
    mask = rows.unsqueeze(1).expand_as(got)
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-12, atol=1e-12)
    # Anchor 2 of image 0 has p = 1 in class 1; slot 1 (class 4) pays -log(1 - 1), clamped to 100.
    assert bool(rows[0, 2]) and 100.0 <= float(got[0, 1, 2]) < 200.0
