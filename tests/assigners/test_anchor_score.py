"""The PAA anchor score shared by paa/fnp/fsr: loss, pre-match, ranking, candidates."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from assigners import NEGATIVE, AssignInputs
from assigners.anchor_score import (
    anchor_loss,
    focal_loss_sum,
    giou_loss,
    group_rank,
    rank_within_group,
    select_candidates,
)

from .conftest import requires_cuda

INF = float("inf")


def _inputs(anchors, gt_boxes, gt_labels, logits, pred_boxes):
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    gt = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(1, -1, 4)
    g = gt.shape[1]
    return AssignInputs(
        anchors=anchors,
        num_anchors_per_level=[anchors.shape[0]],
        gt_boxes=gt,
        gt_labels=torch.as_tensor(gt_labels).reshape(1, g),
        gt_mask=torch.ones(1, g, dtype=torch.bool),
        cls_logits=torch.as_tensor(logits, dtype=torch.float32).reshape(1, anchors.shape[0], -1),
        pred_boxes=torch.as_tensor(pred_boxes, dtype=torch.float32).reshape(1, anchors.shape[0], 4),
    )


def test_focal_loss_sum_equals_torchvision():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=gen) * 6
    logits[:20] *= 10  # saturated logits, up to about +-200
    labels = torch.randint(0, 7, (500,), generator=gen)
    one_hot = torch.nn.functional.one_hot(labels, 7).float()
    for alpha, gamma in [(0.25, 2.0), (0.5, 0.0), (0.0, 1.5), (1.0, 3.0)]:
        expected = sigmoid_focal_loss(logits, one_hot, alpha=alpha, gamma=gamma, reduction="none").sum(dim=1)
        torch.testing.assert_close(focal_loss_sum(logits, labels, alpha=alpha, gamma=gamma), expected, rtol=1e-5, atol=1e-6)


def test_anchor_loss_by_hand():
    # GT [0, 0, 100, 100], label 1 of 3 classes. Anchor 0 is the GT box, anchor 1 is far away.
    # Logits 0 (p = 1/2): focal = 2 negatives * 0.75 * 0.25 * ln 2 + 0.25 * 0.25 * ln 2.
    # Pred box [50, 0, 150, 100]: IoU 1/3, enclosing box = union, so 1 - GIoU = 2/3.
    inputs = _inputs(
        anchors=[[0, 0, 100, 100], [300, 300, 400, 400]],
        gt_boxes=[[0, 0, 100, 100]],
        gt_labels=[1],
        logits=torch.zeros(2, 3),
        pred_boxes=[[50, 0, 150, 100], [0, 0, 100, 100]],
    )
    focal = (2 * 0.75 * 0.25 + 0.25 * 0.25) * math.log(2)
    result = anchor_loss(inputs)
    assert result.prematch.tolist() == [[0, NEGATIVE]]
    assert result.loss[0, 0].item() == pytest.approx(focal + 2 / 3, rel=1e-5)
    assert result.loss[0, 1].item() == INF
    assert result.score[0, 0].item() == pytest.approx(math.exp(-(focal + 2 / 3)), rel=1e-5)
    weighted = anchor_loss(inputs, giou_weight=2.0, focal_alpha=0.5, focal_gamma=0.0)
    focal = (2 * 0.5 + 0.5) * math.log(2)
    assert weighted.loss[0, 0].item() == pytest.approx(focal + 4 / 3, rel=1e-5)


def test_prematch_keeps_low_quality_best_anchor_and_drops_low_iou():
    # Anchor 0 has IoU 0.05 with the GT but is its best anchor: pre-matched.
    # With a second, better anchor (IoU 0.5), the 0.05 anchor falls below 0.1: not pre-matched.
    gt = [[0, 0, 100, 100]]
    thin = [0, 0, 5, 100]
    one = _inputs([thin], gt, [0], torch.zeros(1, 2), [thin])
    assert anchor_loss(one).prematch.tolist() == [[0]]
    two = _inputs([thin, [0, 0, 50, 100]], gt, [0], torch.zeros(2, 2), [thin, thin])
    result = anchor_loss(two)
    assert result.prematch.tolist() == [[NEGATIVE, 0]]
    assert result.loss[0, 0].item() == INF


def test_per_gt_expands_to_dense_matrix(make_batch):
    inputs = make_batch(1)
    result = anchor_loss(inputs)
    dense = result.per_gt(inputs.num_gt_slots)
    assert dense.shape == (inputs.batch_size, inputs.num_gt_slots, inputs.anchors.shape[0])
    finite = torch.isfinite(dense)
    assert bool((finite.sum(dim=1) <= 1).all()), "an anchor has at most one pre-matched GT"
    matched = result.prematch >= 0
    gt_of_finite = torch.where(finite.any(dim=1), finite.int().argmax(dim=1), NEGATIVE)
    assert torch.equal(gt_of_finite[matched], result.prematch[matched])
    assert torch.equal(dense.min(dim=1).values, result.loss)


def test_prematch_equals_iou_matcher_at_0_1(make_batch):
    from torchvision.models.detection._utils import Matcher

    inputs = make_batch(2)
    result = anchor_loss(inputs)
    for i in range(inputs.batch_size):
        slots = inputs.gt_mask[i].nonzero().flatten()
        if slots.numel() == 0:
            assert bool((result.prematch[i] == NEGATIVE).all())
            continue
        matches = Matcher(0.1, 0.1, allow_low_quality_matches=True)(box_iou(inputs.gt_boxes[i, slots], inputs.anchors))
        assert torch.equal(result.prematch[i], torch.where(matches >= 0, slots[matches.clamp(min=0)], NEGATIVE))


def test_non_finite_predictions_give_infinite_loss():
    box = [0, 0, 100, 100]
    logits = torch.zeros(4, 2)
    logits[0, 0] = float("nan")
    logits[1, 1] = float("inf")
    preds = torch.tensor([box, box, [0, 0, float("nan"), 100], [0, 0, float("inf"), 100]], dtype=torch.float32)
    result = anchor_loss(_inputs([box] * 4, [box], [0], logits, preds))
    assert result.prematch.tolist() == [[0, 0, 0, 0]]
    assert result.loss.tolist() == [[INF] * 4]


def test_reversed_pred_box_is_collapsed_like_official_code():
    # Pred [60, 0, 40, 100] (x2 < x1) is treated as [60, 0, 60, 100]: zero area, so
    # IoU 0 and enclosing box = GT: 1 - GIoU = 1 - (0 - 0) = 1.
    box = [0, 0, 100, 100]
    logits = torch.full((1, 2), -30.0)
    logits[0, 0] = 30.0  # focal loss ~ 0
    result = anchor_loss(_inputs([box], [box], [0], logits, [[60, 0, 40, 100]]))
    assert result.loss[0, 0].item() == pytest.approx(1.0, abs=1e-5)


def test_rank_within_group_by_hand():
    loss = torch.tensor([[3.0, 1.0, 2.0, 1.0, 0.5, 9.0, 0.1]])
    group = torch.tensor([[0, 0, 0, 0, 1, 1, 5]])
    valid = torch.tensor([[True, True, True, True, True, True, False]])
    # Group 0: losses 3, 1, 2, 1 -> the two 1.0 go first, lower index first.
    assert rank_within_group(loss, group, valid, num_groups=6).tolist() == [[3, 0, 2, 1, 0, 1, 7]]


def test_rank_within_group_separates_images():
    loss = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    group = torch.zeros(2, 2, dtype=torch.int64)
    valid = torch.ones(2, 2, dtype=torch.bool)
    assert rank_within_group(loss, group, valid, num_groups=1).tolist() == [[1, 0], [0, 1]]


def test_select_candidates_by_hand():
    # Two levels (3 + 2 anchors), all pre-matched to the single GT, topk = 2.
    box = [0, 0, 100, 100]
    logits = torch.zeros(5, 1)
    preds = [[0, 0, 100, 100 - h] for h in (30, 10, 20, 5, 40)]  # 1 - GIoU = h / 100
    inputs = _inputs([box] * 5, [box], [0], logits, preds)
    inputs = AssignInputs(**{**inputs.__dict__, "num_anchors_per_level": [3, 2]})
    candidates = select_candidates(anchor_loss(inputs), inputs.num_anchors_per_level, topk=2, num_gt_slots=1)
    assert candidates.mask.tolist() == [[False, True, True, True, True]]
    assert candidates.gt.tolist() == [[NEGATIVE, 0, 0, 0, 0]]
    assert candidates.num_candidates.tolist() == [[4]]


def candidates_reference(inputs: AssignInputs, topk: int) -> torch.Tensor:
    """Per image, GT and level, the topk finite-loss pre-matched anchors, by loops."""
    result = anchor_loss(inputs)
    mask = torch.zeros_like(result.prematch, dtype=torch.bool)
    for i in range(inputs.batch_size):
        for g in range(inputs.num_gt_slots):
            start = 0
            for count in inputs.num_anchors_per_level:
                idx = torch.arange(start, start + count)
                idx = idx[(result.prematch[i, idx] == g) & torch.isfinite(result.loss[i, idx])]
                order = torch.sort(result.loss[i, idx], stable=True).indices
                mask[i, idx[order[:topk]]] = True
                start += count
    return mask


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("topk", [1, 9])
def test_select_candidates_equals_loop_reference(make_batch, seed, topk):
    inputs = make_batch(seed, batch_size=3, max_gt=6)
    candidates = select_candidates(anchor_loss(inputs), inputs.num_anchors_per_level, topk, inputs.num_gt_slots)
    expected = candidates_reference(inputs, topk)
    assert torch.equal(candidates.mask, expected)
    expected_count = torch.stack([(candidates.gt == g).sum(dim=1) for g in range(inputs.num_gt_slots)], dim=1)
    assert torch.equal(candidates.num_candidates, expected_count)
    assert bool((candidates.num_candidates[~inputs.gt_mask] == 0).all())


@requires_cuda
def test_cuda_equals_cpu(make_batch):
    cpu = anchor_loss(make_batch(3))
    cuda = anchor_loss(make_batch(3, device="cuda"))
    assert torch.equal(cpu.prematch, cuda.prematch.cpu())
    torch.testing.assert_close(cpu.loss, cuda.loss.cpu(), rtol=1e-5, atol=1e-6)


def test_giou_loss_is_torchvision_bit_for_bit():
    gen = torch.Generator().manual_seed(3)
    centre = torch.rand(600, 2, generator=gen) * 100
    side = torch.rand(600, 2, generator=gen) * 60
    target = torch.cat([centre - side, centre + side], dim=1)
    pred = target + torch.randn(600, 4, generator=gen) * 20  # overlapping, disjoint, some inverted
    pred[:50] = target[:50]  # identical boxes
    pred[50:60, 2:] = pred[50:60, :2]  # empty boxes
    pred[60:70] = torch.tensor([1e30, -1e30, float("inf"), float("nan")])  # non-finite
    for dtype in (torch.float32, torch.float64):
        p, t = pred.to(dtype), target.to(dtype)
        expected = generalized_box_iou_loss(p, t, reduction="none")
        assert torch.equal(giou_loss(p, t).view(torch.int64 if dtype == torch.float64 else torch.int32),
                           expected.view(torch.int64 if dtype == torch.float64 else torch.int32))


def test_group_rank_by_hand():
    assert group_rank(torch.tensor([0, 0, 1, 1, 1, 3, 5, 5])).tolist() == [0, 1, 0, 1, 2, 0, 0, 1]
    assert group_rank(torch.zeros(0, dtype=torch.int64)).tolist() == []


@pytest.mark.parametrize("seed", range(3))
def test_candidate_list_is_sorted_by_gt_then_loss_then_anchor(make_batch, seed):
    # The flat list PAA builds its rows from, against a loop over each GT's candidates.
    inputs = make_batch(seed, batch_size=3, max_gt=6)
    losses = anchor_loss(inputs)
    candidates = select_candidates(losses, inputs.num_anchors_per_level, 9, inputs.num_gt_slots)
    a, g = inputs.anchors.shape[0], inputs.num_gt_slots
    expected_index, expected_row = [], []
    for image in range(inputs.batch_size):
        for slot in range(g):
            anchors = (candidates.gt[image] == slot).nonzero().flatten()
            order = torch.sort(losses.loss[image, anchors], stable=True).indices  # ties: anchor order
            expected_index += (image * a + anchors[order]).tolist()
            expected_row += [image * g + slot] * anchors.numel()
    assert candidates.index.tolist() == expected_index
    assert candidates.row.tolist() == expected_row
    assert torch.equal(candidates.mask, candidates.gt >= 0)
    assert int(candidates.mask.sum()) == int(candidates.num_candidates.sum()) == len(expected_index)
