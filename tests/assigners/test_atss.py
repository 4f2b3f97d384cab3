"""ATSS: hand-built cases and a plain loop-per-GT restatement of sfzhang15/ATSS."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

import assigners
from assigners import NEGATIVE, AssignInputs
from assigners.atss import smallest_k_indices

from .conftest import requires_cuda


def _row_of_anchors(centres_x, width=20.0, height=10.0):
    """Anchors width x height centred at (x, 5) for each x."""
    return torch.tensor([[x - width / 2, 5 - height / 2, x + width / 2, 5 + height / 2] for x in centres_x])


def _inputs(anchors, gt_boxes, counts=None):
    gt = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(1, -1, 4)
    g = gt.shape[1]
    return AssignInputs(
        anchors=anchors,
        num_anchors_per_level=counts or [anchors.shape[0]],
        gt_boxes=gt,
        gt_labels=torch.zeros(1, g, dtype=torch.int64),
        gt_mask=torch.ones(1, g, dtype=torch.bool),
    )


def test_hand_built_single_gt():
    # GT [0, 0, 20, 10] (centre x = 10); 20x10 anchors centred at x = 0, 10, 20, 30.
    # topk = 3 nearest: x = 10 (IoU 1), x = 0 and x = 20 (IoU 1/3 each); x = 30 is out.
    # mean = 5/9, unbiased std = sqrt((16 + 4 + 4) / 81 / 2) = 0.385 -> threshold 0.940:
    # only the x = 10 anchor passes (its centre is inside the GT).
    anchors = _row_of_anchors([0, 10, 20, 30])
    out = assigners.build("atss", topk=3)(_inputs(anchors, [[0, 0, 20, 10]]))
    assert out.gt_index.tolist() == [[NEGATIVE, 0, NEGATIVE, NEGATIVE]]


def test_conflict_goes_to_highest_iou():
    # GT A = [0, 0, 20, 10], GT B = [0, 0, 22, 10]. The x = 10 anchor is positive for
    # both (IoU 1 with A; 200/220 = 0.909 >= B's threshold 0.863), and goes to A, in
    # either GT order.
    anchors = _row_of_anchors([0, 10, 20, 30])
    a, b = [0, 0, 20, 10], [0, 0, 22, 10]
    assert assigners.build("atss", topk=3)(_inputs(anchors, [a, b])).gt_index[0, 1] == 0
    assert assigners.build("atss", topk=3)(_inputs(anchors, [b, a])).gt_index[0, 1] == 1


def test_centre_outside_gt_is_not_positive():
    # A thin GT whose centre lies between anchor centres: the nearest anchors overlap it,
    # but none has its centre strictly inside (margin 0.01), so there is no positive.
    anchors = _row_of_anchors([0, 10, 20, 30])
    out = assigners.build("atss", topk=3)(_inputs(anchors, [[14, 0, 16, 10]]))
    assert out.gt_index.tolist() == [[NEGATIVE] * 4]


def test_smallest_k_indices_breaks_ties_by_index():
    values = torch.tensor([[3.0, 1.0, 2.0, 1.0, 2.0, 0.5], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    assert smallest_k_indices(values, 3).tolist() == [[1, 3, 5], [0, 1, 2]]
    assert smallest_k_indices(values, 4).tolist() == [[1, 2, 3, 5], [0, 1, 2, 3]]
    assert smallest_k_indices(values, 6).tolist() == [list(range(6))] * 2


def test_topk_larger_than_levels_takes_whole_levels():
    # Two levels of 2 anchors each, topk = 9: every anchor is a candidate.
    anchors = _row_of_anchors([0, 10, 20, 30])
    out = assigners.build("atss", topk=9)(_inputs(anchors, [[0, 0, 20, 10]], counts=[2, 2]))
    # Candidates IoU: 1/3, 1, 1/3, 0 -> mean 0.4167, std 0.419 -> threshold 0.836.
    assert out.gt_index.tolist() == [[NEGATIVE, 0, NEGATIVE, NEGATIVE]]


def atss_reference(inputs: AssignInputs, topk: int) -> torch.Tensor:
    """sfzhang15/ATSS restated with plain loops over images and GTs."""
    anchors = inputs.anchors.cpu()
    centre = (anchors[:, :2] + anchors[:, 2:]) / 2
    result = torch.full((inputs.batch_size, anchors.shape[0]), NEGATIVE, dtype=torch.int64)
    for i in range(inputs.batch_size):
        best_iou = torch.full((anchors.shape[0],), -1.0)
        for g in range(inputs.num_gt_slots):
            if not inputs.gt_mask[i, g]:
                continue
            box = inputs.gt_boxes[i, g].cpu()
            iou = box_iou(box[None], anchors)[0]
            gt_centre = (box[:2] + box[2:]) / 2
            distance = ((centre - gt_centre) ** 2).sum(dim=1).sqrt()
            candidates, start = [], 0
            for count in inputs.num_anchors_per_level:
                order = torch.sort(distance[start : start + count], stable=True).indices
                candidates.append(order[: min(topk, count)] + start)
                start += count
            candidates = torch.cat(candidates)
            candidate_iou = iou[candidates]
            threshold = candidate_iou.mean() + candidate_iou.std()
            for anchor, value in zip(candidates.tolist(), candidate_iou.tolist()):
                cx, cy = centre[anchor].tolist()
                sides = [cx - box[0], cy - box[1], box[2] - cx, box[3] - cy]
                inside = min(float(s) for s in sides) > 0.01
                if value >= threshold and inside and value > best_iou[anchor]:
                    best_iou[anchor] = value
                    result[i, anchor] = g
    return result


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("topk", [1, 9])
def test_atss_equals_loop_reference(make_batch, device, seed, topk):
    inputs = make_batch(seed, batch_size=3, max_gt=6, predictions=False, device=device)
    if topk == 1:
        # One candidate per level; five levels, so the std is defined.
        assert len(inputs.num_anchors_per_level) > 1
    out = assigners.build("atss", topk=topk)(inputs)
    assert out.gt_index.device.type == device
    assert torch.equal(out.gt_index.cpu(), atss_reference(inputs, topk))


def test_single_candidate_gets_zero_std_not_nan():
    # One level, topk 1: a single candidate; unbiased std of one value would be NaN.
    anchors = _row_of_anchors([0, 10, 20, 30])
    out = assigners.build("atss", topk=1)(_inputs(anchors, [[0, 0, 20, 10]]))
    assert out.gt_index.tolist() == [[NEGATIVE, 0, NEGATIVE, NEGATIVE]]


@pytest.mark.parametrize("topk", [0, -3, 2.5, True])
def test_rejects_bad_topk(topk):
    with pytest.raises(ValueError, match="positive int"):
        assigners.build("atss", topk=topk)


@requires_cuda
def test_cuda_equals_cpu(make_batch):
    inputs = make_batch(7, batch_size=4, max_gt=8, predictions=False)
    cuda_inputs = make_batch(7, batch_size=4, max_gt=8, predictions=False, device="cuda")
    atss = assigners.build("atss")
    assert torch.equal(atss(inputs).gt_index, atss(cuda_inputs).gt_index.cpu())
