"""TAL (task-aligned assigner, TOOD): hand-built cases and a plain loop-per-GT restatement.

The restatement follows mmdetection's ``TaskAlignedAssigner.assign`` and the target
normalisation of ``TOODHead._get_target_single``:
  u = IoU(predicted box, GT), s = sigmoid(logit of the GT's class), t = s**alpha * u**beta;
  per GT the min(topk, A) anchors of largest t over all levels (ties: lower anchor index) are
  candidates, and a candidate is positive when t > 0 and its centre is inside the GT by more
  than 0.01; an anchor positive for several GTs keeps the one of largest u (ties: lower GT);
  the soft target of a positive is t / (max t + 1e-7) * max u, maxima over its GT's positives.
During ``warmup_iters`` it assigns as ATSS (topk 9) with the anchor's IoU as soft target.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torchvision.ops import box_iou

import assigners
from assigners import NEGATIVE, AssignInputs

from .conftest import as_float64, make_anchors

INSIDE_MARGIN = 0.01
NORM_EPS = 1e-7


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _one_image(anchors, gt_boxes, gt_labels, logits, preds, num_classes=1, counts=None, strides=None, gt_mask=None):
    """AssignInputs of one image from plain lists; logits is (A,) for one class or (A, C)."""
    anchors = torch.as_tensor(anchors, dtype=torch.float64).reshape(-1, 4)
    gt = torch.as_tensor(gt_boxes, dtype=torch.float64).reshape(1, -1, 4)
    g = gt.shape[1]
    logits = torch.as_tensor(logits, dtype=torch.float64).reshape(1, anchors.shape[0], -1)
    assert logits.shape[-1] == num_classes
    mask = torch.ones(1, g, dtype=torch.bool) if gt_mask is None else torch.as_tensor(gt_mask).reshape(1, g)
    return AssignInputs(
        anchors=anchors,
        num_anchors_per_level=counts or [anchors.shape[0]],
        gt_boxes=gt,
        gt_labels=torch.as_tensor(gt_labels, dtype=torch.int64).reshape(1, g),
        gt_mask=mask,
        cls_logits=logits,
        pred_boxes=torch.as_tensor(preds, dtype=torch.float64).reshape(1, -1, 4),
        strides=strides,
    )


def _inside(centre, box) -> bool:
    cx, cy = centre
    return min(cx - box[0], cy - box[1], box[2] - cx, box[3] - cy) > INSIDE_MARGIN


def tal_reference(inputs: AssignInputs, topk: int, alpha: float, beta: float):
    """mmdetection's TaskAlignedAssigner + TOOD normalisation, by loops over images and GTs.

    Returns (gt_index (B, A) int64, soft_target (B, A) float64, 0 at negatives)."""
    anchors = inputs.anchors.cpu().double()
    centres = ((anchors[:, :2] + anchors[:, 2:]) / 2).tolist()
    b, a = inputs.batch_size, anchors.shape[0]
    gt_index = torch.full((b, a), NEGATIVE, dtype=torch.int64)
    soft = torch.zeros(b, a, dtype=torch.float64)
    for i in range(b):
        preds = inputs.pred_boxes[i].cpu().double()
        logits = inputs.cls_logits[i].cpu().double()
        best_u = [-math.inf] * a
        metric = {}  # g -> (t (A,), u (A,))
        for g in range(inputs.num_gt_slots):
            if not inputs.gt_mask[i, g]:
                continue
            box = inputs.gt_boxes[i, g].cpu().double()
            u = box_iou(preds, box[None])[:, 0]
            s = torch.sigmoid(logits[:, int(inputs.gt_labels[i, g])])
            t = s**alpha * u**beta
            metric[g] = (t, u)
            order = torch.argsort(t, descending=True, stable=True)[: min(topk, a)]
            for anchor in order.tolist():
                if t[anchor] > 0 and _inside(centres[anchor], box.tolist()) and u[anchor] > best_u[anchor]:
                    best_u[anchor] = float(u[anchor])
                    gt_index[i, anchor] = g
        for g, (t, u) in metric.items():
            mine = (gt_index[i] == g).nonzero().flatten()
            if mine.numel() == 0:
                continue
            soft[i, mine] = t[mine] / (t[mine].max() + NORM_EPS) * u[mine].max()
    return gt_index, soft


def anchor_iou_targets(inputs: AssignInputs, gt_index: torch.Tensor) -> torch.Tensor:
    """(B, A) IoU of each positive's anchor box with its GT (0 at negatives)."""
    anchors = inputs.anchors.cpu().double()
    out = torch.zeros(gt_index.shape, dtype=torch.float64)
    for i, anchor in (gt_index >= 0).nonzero().tolist():
        box = inputs.gt_boxes[i, gt_index[i, anchor]].cpu().double()
        out[i, anchor] = box_iou(anchors[anchor][None], box[None])[0, 0]
    return out


def _check_against_reference(out, expected_index, expected_soft, atol=1e-9):
    assert out.gt_index.dtype == torch.int64
    assert torch.equal(out.gt_index.cpu(), expected_index)
    positive = expected_index >= 0
    assert out.soft_target is not None
    got = out.soft_target.cpu().double()[positive]
    torch.testing.assert_close(got, expected_soft[positive], rtol=1e-6, atol=atol)
    assert bool(((got >= 0) & (got <= 1)).all())


# --- the loop reference on random batches -------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("topk", "alpha", "beta", "max_gt", "batch_size"),
    [(13, 1.0, 6.0, 6, 3), (13, 1.0, 6.0, 12, 4), (1, 1.0, 6.0, 6, 3), (30, 0.5, 2.0, 8, 3), (300, 1.0, 6.0, 6, 2)],
)
def test_tal_equals_loop_reference(make_batch, device, seed, topk, alpha, beta, max_gt, batch_size):
    # Default batches end with an image without GT; topk 300 > A = 257 takes every anchor.
    inputs = as_float64(make_batch(seed, batch_size=batch_size, max_gt=max_gt, device=device))
    assert not bool(inputs.gt_mask[-1].any())
    out = assigners.build("tal", topk=topk, alpha=alpha, beta=beta, warmup_iters=0)(inputs)
    assert out.gt_index.device.type == device
    expected_index, expected_soft = tal_reference(inputs, topk, alpha, beta)
    assert bool((expected_index >= 0).any()), "the batch should have positives"
    _check_against_reference(out, expected_index, expected_soft)
    assert bool((out.gt_index[-1] == NEGATIVE).all())


def test_tal_default_parameters_are_tood(make_batch):
    # build("tal") with no arguments is topk 13, alpha 1, beta 6, no warm-up.
    inputs = as_float64(make_batch(11, batch_size=3, max_gt=6))
    expected_index, expected_soft = tal_reference(inputs, 13, 1.0, 6.0)
    _check_against_reference(assigners.build("tal")(inputs), expected_index, expected_soft)


def test_tal_float32_matches_reference_on_float32(make_batch):
    # The float32 path (training dtype) agrees with the reference fed the same float32 data
    # up to the soft target's rounding; the assignment itself is compared on this seed only.
    inputs = make_batch(3, batch_size=3, max_gt=6)
    out = assigners.build("tal")(inputs)
    expected_index, expected_soft = tal_reference(inputs, 13, 1.0, 6.0)
    assert torch.equal(out.gt_index, expected_index)
    positive = expected_index >= 0
    torch.testing.assert_close(out.soft_target.double()[positive], expected_soft[positive], rtol=1e-4, atol=1e-5)


def test_tal_does_not_need_strides(make_batch):
    # TAL has no centre prior in strides: strides=None gives the same result.
    inputs = as_float64(make_batch(5, batch_size=3, max_gt=6))
    tal = assigners.build("tal")
    with_strides = tal(inputs)
    without = tal(dataclasses.replace(inputs, strides=None))
    assert torch.equal(with_strides.gt_index, without.gt_index)
    assert torch.equal(with_strides.soft_target, without.soft_target)


# --- hand-built cases ---------------------------------------------------------------------

# Two levels on one row y = 8: stride 8 anchors (side 16) centred at x = 4, 12, 20, 28 and
# stride 16 anchors (side 32) centred at x = 8, 24, 40. GT [0, 0, 32, 16] contains every
# centre but x = 40.
_ROW_ANCHORS = [[x - 8, 0, x + 8, 16] for x in (4, 12, 20, 28)] + [[x - 16, -8, x + 16, 24] for x in (8, 24, 40)]
_ROW_GT = [0, 0, 32, 16]


def test_topk_is_taken_before_the_centre_filter_and_crosses_levels():
    # Every predicted box is the GT (u = 1), so t = sigmoid(logit). With topk 3 the
    # candidates are the three largest t: anchors 6 (x = 40, logit 4), 4 (logit 3) and
    # 1 (logit 2). Anchor 6's centre is outside the GT, so only 1 (level 0) and 4 (level 1)
    # are positive; anchor 5 (logit 1, centre inside) is not, as it is no candidate: the
    # top-k is taken over all anchors first and filtered by the centre afterwards.
    logits = [-3.0, 2.0, -2.0, -1.0, 3.0, 1.0, 4.0]
    inputs = _one_image(_ROW_ANCHORS, [_ROW_GT], [0], logits, [_ROW_GT] * 7, counts=[4, 3], strides=[8, 16])
    out = assigners.build("tal", topk=3)(inputs)
    assert out.gt_index.tolist() == [[NEGATIVE, 0, NEGATIVE, NEGATIVE, 0, NEGATIVE, NEGATIVE]]
    # Soft targets: t / (max t + 1e-7) * max u = sigmoid(l) / sigmoid(3) for l = 2 and 3.
    s2, s3 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-3.0))
    assert out.soft_target[0, 1].item() == pytest.approx(s2 / (s3 + NORM_EPS), abs=1e-9)  # 0.9246
    assert out.soft_target[0, 4].item() == pytest.approx(s3 / (s3 + NORM_EPS), abs=1e-9)  # ~1
    # topk 4 adds anchor 5 (the fourth largest t).
    out = assigners.build("tal", topk=4)(inputs)
    assert out.gt_index.tolist() == [[NEGATIVE, 0, NEGATIVE, NEGATIVE, 0, 0, NEGATIVE]]


def test_topk_ties_go_to_the_lower_anchor_index():
    # All seven t are equal (same logit, u = 1): topk 2 takes anchors 0 and 1.
    inputs = _one_image(_ROW_ANCHORS, [_ROW_GT], [0], [0.0] * 7, [_ROW_GT] * 7, counts=[4, 3])
    out = assigners.build("tal", topk=2)(inputs)
    assert out.gt_index.tolist() == [[0, 0] + [NEGATIVE] * 5]


def test_zero_metric_candidate_is_not_positive():
    # One GT, two anchors centred inside it, topk 13 > A: both are candidates. Anchor 1's
    # predicted box is disjoint from the GT (u = 0, t = 0), so it is not positive.
    gt = [0, 0, 20, 20]
    anchors = [[2, 2, 18, 18], [4, 4, 20, 20]]
    inputs = _one_image(anchors, [gt], [0], [0.0, 5.0], [gt, [100, 100, 120, 120]])
    out = assigners.build("tal")(inputs)
    assert out.gt_index.tolist() == [[0, NEGATIVE]]


def test_conflict_goes_to_the_highest_predicted_iou_not_the_highest_metric():
    # GT A = [0, 0, 20, 20] (class 0), GT B = [0, 0, 20, 18] (class 1); one anchor centred
    # at (10, 9), inside both; its predicted box is B: u_A = 360/400 = 0.9, u_B = 1.
    # Logits (5, -5): t_A = sigmoid(5) * 0.9**6 = 0.528 > t_B = sigmoid(-5) * 1 = 0.0067.
    # Both GTs take it (topk >= A = 1, t > 0); it goes to B, the larger u, in either order.
    a, b = [0, 0, 20, 20], [0, 0, 20, 18]
    anchor, pred = [[0, 0, 20, 18]], [b]
    logits = [[5.0, -5.0]]
    out = assigners.build("tal")(_one_image(anchor, [a, b], [0, 1], logits, pred, num_classes=2))
    assert out.gt_index.tolist() == [[1]]
    # Only positive of B: t_B / (t_B + 1e-7) * 1.
    t_b = 1 / (1 + math.exp(5.0))
    assert out.soft_target[0, 0].item() == pytest.approx(t_b / (t_b + NORM_EPS), abs=1e-9)
    out = assigners.build("tal")(_one_image(anchor, [b, a], [1, 0], logits, pred, num_classes=2))
    assert out.gt_index.tolist() == [[0]]


def test_conflict_with_equal_iou_goes_to_the_lower_gt_index():
    # Two identical GTs of different classes: u ties, the lower slot wins.
    gt = [0, 0, 20, 20]
    inputs = _one_image([[2, 2, 18, 18]], [gt, gt], [0, 1], [[-2.0, 2.0]], [gt], num_classes=2)
    assert assigners.build("tal")(inputs).gt_index.tolist() == [[0]]


def test_tiny_gt_between_anchor_centres_has_no_positive():
    # make_anchors((32, 32), (8,)) centres at 4, 12, 20, 28. GT [13, 13, 15, 15] holds no
    # centre, so even with every predicted box equal to it (u = 1) nothing is positive.
    anchors, counts = make_anchors((32, 32), strides=(8,))
    gt = [13.0, 13.0, 15.0, 15.0]
    inputs = _one_image(anchors, [gt], [0], [2.0] * 16, [gt] * 16, counts=counts, strides=[8])
    out = assigners.build("tal")(inputs)
    assert out.gt_index.tolist() == [[NEGATIVE] * 16]


def test_centre_margin_is_strict():
    # The anchor centre (10, 10) is 0.01 from the GT's right side: not inside (> 0.01 needed);
    # 0.02 from it: inside.
    anchor, gt_on, gt_in = [[0, 0, 20, 20]], [0, 0, 10.01, 20], [0, 0, 10.02, 20]
    out = assigners.build("tal")(_one_image(anchor, [gt_on], [0], [0.0], [gt_on]))
    assert out.gt_index.tolist() == [[NEGATIVE]]
    out = assigners.build("tal")(_one_image(anchor, [gt_in], [0], [0.0], [gt_in]))
    assert out.gt_index.tolist() == [[0]]


def test_image_without_gt_is_all_negative(make_batch):
    inputs = make_batch(2, batch_size=2, max_gt=4)
    inputs = dataclasses.replace(inputs, gt_mask=torch.zeros_like(inputs.gt_mask))
    out = assigners.build("tal")(inputs)
    assert out.gt_index.tolist() == [[NEGATIVE] * inputs.anchors.shape[0]] * 2


def test_zero_gt_slots_is_all_negative():
    anchors, counts = make_anchors((32, 32), strides=(8,))
    inputs = AssignInputs(
        anchors=anchors,
        num_anchors_per_level=counts,
        gt_boxes=torch.zeros(2, 0, 4),
        gt_labels=torch.zeros(2, 0, dtype=torch.int64),
        gt_mask=torch.zeros(2, 0, dtype=torch.bool),
        cls_logits=torch.zeros(2, 16, 3),
        pred_boxes=anchors.expand(2, 16, 4).clone(),
        strides=[8],
    )
    assert assigners.build("tal")(inputs).gt_index.tolist() == [[NEGATIVE] * 16] * 2


# --- soft targets -------------------------------------------------------------------------


def test_soft_target_normalisation_by_hand():
    # alpha = beta = 1: t = s * u. GT [0, 0, 10, 10]; two anchors centred inside it at
    # (3, 5) and (7, 5). Anchor 0: predicted [0, 0, 10, 4] (u = 0.4), s = 0.5 -> t = 0.2.
    # Anchor 1: predicted [0, 0, 10, 5] (u = 0.5), s = 0.2 -> t = 0.1.
    # max t = 0.2 (anchor 0) and max u = 0.5 (anchor 1) come from different anchors:
    # targets 0.2 / 0.2 * 0.5 = 0.5 and 0.1 / 0.2 * 0.5 = 0.25.
    gt = [0, 0, 10, 10]
    anchors = [[-1, 1, 7, 9], [3, 1, 11, 9]]
    preds = [[0, 0, 10, 4], [0, 0, 10, 5]]
    inputs = _one_image(anchors, [gt], [0], [_logit(0.5), _logit(0.2)], preds)
    out = assigners.build("tal", alpha=1.0, beta=1.0)(inputs)
    assert out.gt_index.tolist() == [[0, 0]]
    expected = [0.2 / (0.2 + NORM_EPS) * 0.5, 0.1 / (0.2 + NORM_EPS) * 0.5]
    assert out.soft_target[0].tolist() == pytest.approx(expected, abs=1e-9)
    assert out.soft_target[0].tolist() == pytest.approx([0.5, 0.25], abs=1e-6)


def test_soft_target_maxima_are_over_the_final_positives_only():
    # GT A = [0, 0, 20, 20] (class 0) and GT B = [0, 0, 20, 18] (class 1), alpha = beta = 1.
    # Anchor 0 centred (10, 9), predicted box B: u_A = 0.9, u_B = 1 -> goes to B.
    # Anchor 1 centred (10, 10), predicted [0, 0, 20, 10]: u_A = 0.5, u_B = 200/360 = 0.556.
    # Its centre (10, 10) is inside B ([0, 18] in y, margin 8): it also goes to B.
    # Anchor 2 centred (10, 19), only inside A (y = 19 > 18), predicted [0, 0, 20, 8]: u_A = 0.4.
    # Scores: s = sigmoid(logits) per class.
    a, b = [0, 0, 20, 20], [0, 0, 20, 18]
    anchors = [[0, 0, 20, 18], [0, 0, 20, 20], [0, 18, 20, 20]]
    preds = [b, [0, 0, 20, 10], [0, 0, 20, 8]]
    probs = [[0.9, 0.3], [0.8, 0.6], [0.5, 0.5]]
    logits = [[_logit(p) for p in row] for row in probs]
    inputs = _one_image(anchors, [a, b], [0, 1], logits, preds, num_classes=2)
    out = assigners.build("tal", alpha=1.0, beta=1.0)(inputs)
    assert out.gt_index.tolist() == [[1, 1, 0]]
    # B's positives: t = 0.3 * 1 = 0.3 and 0.6 * (200/360) = 0.333; max t = 0.333, max u = 1.
    t_b = [0.3 * 1.0, 0.6 * (200 / 360)]
    # A's only positive is anchor 2 (anchor 0's t_A = 0.81 is larger but went to B):
    # t = 0.5 * 0.4 = 0.2 -> 0.2 / (0.2 + 1e-7) * 0.4 = 0.4.
    expected = [t_b[0] / (max(t_b) + NORM_EPS), t_b[1] / (max(t_b) + NORM_EPS), 0.2 / (0.2 + NORM_EPS) * 0.4]
    assert out.soft_target[0].tolist() == pytest.approx(expected, abs=1e-9)


# --- warm-up ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_warmup_is_atss_with_anchor_iou_targets(make_batch, seed):
    inputs = as_float64(make_batch(seed, batch_size=3, max_gt=6))
    tal = assigners.build("tal", warmup_iters=5)
    atss_index = assigners.build("atss", topk=9)(inputs).gt_index
    assert bool((atss_index >= 0).any())
    # Default iteration 0, then explicitly 0 and 4 (< 5): ATSS, soft target = anchor IoU
    # (normalising an IoU metric by max IoU gives it back up to the 1e-7).
    for iteration in (None, 0, 4):
        if iteration is not None:
            tal.set_iteration(iteration)
        out = tal(inputs)
        assert torch.equal(out.gt_index, atss_index)
        positive = atss_index >= 0
        torch.testing.assert_close(
            out.soft_target.double()[positive], anchor_iou_targets(inputs, atss_index)[positive], rtol=0, atol=1e-6
        )
    # From iteration 5 on: TAL proper.
    for iteration in (5, 6, 1000):
        tal.set_iteration(iteration)
        expected_index, expected_soft = tal_reference(inputs, 13, 1.0, 6.0)
        _check_against_reference(tal(inputs), expected_index, expected_soft)


def test_warmup_differs_from_tal_on_this_batch(make_batch):
    # Guard that the warm-up test above compares two different assignments.
    inputs = as_float64(make_batch(0, batch_size=3, max_gt=6))
    atss_index = assigners.build("atss", topk=9)(inputs).gt_index
    tal_index, _ = tal_reference(inputs, 13, 1.0, 6.0)
    assert not torch.equal(atss_index, tal_index)


def test_no_warmup_ignores_the_iteration(make_batch):
    inputs = as_float64(make_batch(1, batch_size=3, max_gt=6))
    tal = assigners.build("tal", warmup_iters=0)
    first = tal(inputs)
    tal.set_iteration(0)
    again = tal(inputs)
    assert torch.equal(first.gt_index, again.gt_index)
    expected_index, expected_soft = tal_reference(inputs, 13, 1.0, 6.0)
    _check_against_reference(first, expected_index, expected_soft)


# --- parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("topk", [0, -3, 2.5, True])
def test_rejects_bad_topk(topk):
    with pytest.raises(ValueError, match="topk"):
        assigners.build("tal", topk=topk)


@pytest.mark.parametrize("name", ["alpha", "beta"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_rejects_bad_exponents(name, value):
    with pytest.raises(ValueError, match=name):
        assigners.build("tal", **{name: value})


@pytest.mark.parametrize("warmup_iters", [-1, 2.5])
def test_rejects_bad_warmup(warmup_iters):
    with pytest.raises(ValueError, match="warmup_iters"):
        assigners.build("tal", warmup_iters=warmup_iters)


def test_needs_predictions(make_batch):
    inputs = make_batch(0, predictions=False)
    with pytest.raises(ValueError, match="cls_logits"):
        assigners.build("tal")(inputs)
