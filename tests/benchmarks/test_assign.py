"""The assignment benchmark's batches and agreement measure, and the pruned IoU matcher it times."""

from __future__ import annotations

import pytest
import torch

import assigners
from assigners import NEGATIVE, AssignInputs, Assignment, gt_anchor_iou
from assigners.max_iou import match_anchors, max_iou_match
from benchmarks.assign import coco_like_batch, level_anchors, positive_set_agreement, tiny_batch

THRESHOLDS = [(0.1, 0.1, True), (0.5, 0.4, True), (0.5, 0.4, False), (0.9, 0.3, True)]


@pytest.fixture(scope="module")
def coco() -> AssignInputs:
    return coco_like_batch()


def test_coco_like_batch_has_the_stated_shape(coco):
    sizes = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]  # ceil(800 / s), ceil(1216 / s)
    assert coco.num_anchors_per_level == [h * w for h, w in sizes]
    assert coco.batch_size == 16
    assert 5.0 <= coco.gt_mask.sum().item() / 16 <= 9.0
    assert coco.cls_logits.shape == (16, sum(h * w for h, w in sizes), 80)
    # Anchors of side 8 x stride, centred on their cells.
    assert coco.anchors[0].tolist() == [4.0 - 32.0, 4.0 - 32.0, 4.0 + 32.0, 4.0 + 32.0]


def test_batches_are_seeded():
    first, second = tiny_batch(), tiny_batch()
    assert torch.equal(first.cls_logits, second.cls_logits) and torch.equal(first.pred_boxes, second.pred_boxes)


def test_positive_set_agreement_by_hand():
    inputs = AssignInputs(
        anchors=torch.zeros(4, 4),
        num_anchors_per_level=[4],
        gt_boxes=torch.zeros(1, 3, 4),
        gt_labels=torch.zeros(1, 3, dtype=torch.int64),
        gt_mask=torch.tensor([[True, True, False]]),
    )
    first = Assignment(gt_index=torch.tensor([[0, 0, 1, NEGATIVE]]))
    # GT 0 keeps anchors {0, 1}; GT 1 gains anchor 3; the padded slot does not count.
    second = Assignment(gt_index=torch.tensor([[0, 0, 1, 1]]))
    assert positive_set_agreement(inputs, first, second) == 0.5


def _random_inputs(seed: int, image_size=(160, 224), batch_size=3, max_gt=7) -> AssignInputs:
    gen = torch.Generator().manual_seed(seed)
    anchors, counts = level_anchors(image_size, (8, 16, 32, 64, 128), 8.0, "cpu")
    height, width = image_size
    size = torch.rand(batch_size, max_gt, 2, generator=gen) ** 2 * torch.tensor([width, height]) * 1.2 + 1.0
    centre = torch.rand(batch_size, max_gt, 2, generator=gen) * torch.tensor([width, height])
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
    # Some GTs equal to an anchor (IoU ties at 1), some on the pixel grid (ties between anchors).
    snap = torch.rand(batch_size, max_gt, generator=gen) < 0.3
    boxes = torch.where(snap.unsqueeze(-1), (boxes / 8).round() * 8 + 8, boxes)
    copy = torch.rand(batch_size, max_gt, generator=gen) < 0.2
    boxes = torch.where(copy.unsqueeze(-1), anchors[torch.randint(0, anchors.shape[0], (batch_size, max_gt), generator=gen)], boxes)
    mask = torch.rand(batch_size, max_gt, generator=gen) < 0.7
    mask[-1] = False  # an image without GT
    return AssignInputs(anchors, counts, boxes, torch.zeros(batch_size, max_gt, dtype=torch.int64), mask)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(("high", "low", "low_quality"), THRESHOLDS)
def test_pruned_matcher_equals_dense_matcher(seed, high, low, low_quality):
    inputs = _random_inputs(seed)
    dense = max_iou_match(gt_anchor_iou(inputs), inputs.gt_mask, high, low, low_quality)
    for chunk_size in (1, 5, 32):
        pruned = match_anchors(inputs, high, low, low_quality, chunk_size=chunk_size, min_pairs=0)
        assert torch.equal(pruned, dense), chunk_size


@pytest.mark.parametrize(("high", "low", "low_quality"), THRESHOLDS)
def test_pruned_matcher_equals_dense_matcher_on_the_coco_batch(coco, high, low, low_quality):
    dense = max_iou_match(gt_anchor_iou(coco), coco.gt_mask, high, low, low_quality)
    assert torch.equal(match_anchors(coco, high, low, low_quality, min_pairs=0), dense)


def test_pruned_matcher_with_a_gt_that_overlaps_no_anchor():
    # Its best IoU is 0, so every anchor is one of its "best" anchors (torchvision's rule).
    inputs = _random_inputs(3)
    boxes, mask = inputs.gt_boxes.clone(), inputs.gt_mask.clone()
    boxes[0, 0], mask[0, 0] = torch.tensor([5000.0, 5000.0, 5010.0, 5020.0]), True
    inputs = AssignInputs(inputs.anchors, inputs.num_anchors_per_level, boxes, inputs.gt_labels, mask)
    dense = max_iou_match(gt_anchor_iou(inputs), mask, 0.1, 0.1, True)
    assert torch.equal(match_anchors(inputs, 0.1, 0.1, True, min_pairs=0), dense)


def test_pruned_matcher_without_real_gt():
    inputs = _random_inputs(4)
    padded = AssignInputs(inputs.anchors, inputs.num_anchors_per_level, inputs.gt_boxes, inputs.gt_labels,
                          torch.zeros_like(inputs.gt_mask))
    for high, low, low_quality in THRESHOLDS:
        assert bool((match_anchors(padded, high, low, low_quality, min_pairs=0) == NEGATIVE).all())


def test_paa_backends_agree_on_the_tiny_batch():
    inputs = tiny_batch()
    torch_out = assigners.build("paa", gmm_backend="torch")(inputs)
    sklearn_out = assigners.build("paa", gmm_backend="sklearn")(inputs)
    assert positive_set_agreement(inputs, torch_out, sklearn_out) == 1.0


def test_positives_per_gt_counts_real_gts_only():
    from benchmarks.assign import positives_per_gt

    inputs = AssignInputs(anchors=torch.zeros(4, 4), num_anchors_per_level=[4], gt_boxes=torch.zeros(1, 3, 4),
                          gt_labels=torch.zeros(1, 3, dtype=torch.int64), gt_mask=torch.tensor([[True, True, False]]))
    # GT 0 has 3 positives, GT 1 one; the padded slot 2 is not averaged in.
    assert positives_per_gt(inputs, Assignment(gt_index=torch.tensor([[0, 0, 1, 0]]))) == 2.0


def test_dense_batch_has_200_gt_per_image():
    dense = coco_like_batch(num_images=2, gt_per_image=200)
    assert dense.gt_mask.sum(dim=1).tolist() == [200, 200]
    assert dense.strides == [8, 16, 32, 64, 128]
