"""The RPN with an assigner of ours, against torchvision's own RPN as the oracle."""

import pytest
import torch
from torch.nn import functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import AnchorGenerator, RegionProposalNetwork, concat_box_prediction_layers

import assigners
from assigners.anchor_score import focal_loss_sum
from detector import AssignedRPN, RPNHeadWithIoU
from detector.rpn import flatten_anchor_maps, unified_logits

SIZES = ((16,), (32,), (64,), (128,), (256,))
RATIOS = ((0.5, 1.0, 2.0),) * 5
NMS = dict(pre_nms_top_n={"training": 200, "testing": 100}, post_nms_top_n={"training": 100, "testing": 50})


def rpn_pair(use_iou=False):
    """(ours with MaxIoU at torchvision's RPN thresholds, torchvision's RPN), sharing anchors and head."""
    anchor_generator = AnchorGenerator(SIZES, RATIOS)
    head = RPNHeadWithIoU(8, 3, use_iou=use_iou)
    ours = AssignedRPN(anchor_generator, head, assigners.build("max_iou", pos_iou=0.7, neg_iou=0.3,
                                                               allow_low_quality=True), **NMS)
    theirs = RegionProposalNetwork(anchor_generator, head, 0.7, 0.3, 256, 0.5, NMS["pre_nms_top_n"],
                                   NMS["post_nms_top_n"], 0.7)
    return ours, theirs


def pyramid(batch, size, generator):
    """Feature maps P2-P6 (strides 4-64) of ``batch`` images of side ``size``, 8 channels."""
    return [torch.randn(batch, 8, size // 2**level, size // 2**level, generator=generator) for level in range(2, 7)]


def random_targets(counts, size, generator):
    targets = []
    for count in counts:
        xy = torch.rand(count, 2, generator=generator) * size * 0.8
        wh = 4 + torch.rand(count, 2, generator=generator) * size * 0.5
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=size)], dim=1), "labels": torch.zeros(count, dtype=torch.int64)})
    return targets


@pytest.mark.parametrize(("size", "counts"), [
    (64, [3, 0, 1]),     # 3 images x 5 GT slots x 1023 anchors: the dense IoU path of match_anchors; an image without GT
    (256, [24, 17]),     # 2 x 24 x 16368: the pruned path (>= 2^18 pairs)
])
def test_max_iou_labels_equal_torchvisions_matcher(size, counts):
    """MaxIoU at torchvision's RPN thresholds (0.7 / 0.3, low-quality matches) labels the anchors exactly as
    torchvision's RegionProposalNetwork.assign_targets_to_anchors (its Matcher and labels, before sampling),
    called as torchvision calls it and from the RPN's dense outputs (levels and strides)."""
    generator = torch.Generator().manual_seed(size)
    ours, theirs = rpn_pair()
    images = ImageList(torch.zeros(len(counts), 3, size, size), [(size, size)] * len(counts))
    targets = random_targets(counts, size, generator)
    # An exact duplicate GT and a GT equal to an anchor: ties in the max over GTs and over anchors.
    anchors = ours.anchor_generator(images, pyramid(len(counts), size, generator))
    targets[0]["boxes"] = torch.cat([targets[0]["boxes"], targets[0]["boxes"][:1], anchors[0][100:101]])
    targets[0]["labels"] = torch.zeros(targets[0]["boxes"].shape[0], dtype=torch.int64)

    expected_labels, expected_boxes = theirs.assign_targets_to_anchors(anchors, targets)
    labels, boxes = ours.assign_targets_to_anchors(anchors, targets)
    out, _, _ = ours.predict(images, pyramid(len(counts), size, generator))
    labels_from_out, _ = ours.assign_targets_to_anchors(anchors, targets, out)
    for i in range(len(counts)):
        assert torch.equal(labels[i], expected_labels[i]), i
        assert torch.equal(labels_from_out[i], expected_labels[i]), i
        assert torch.equal(boxes[i], expected_boxes[i]), i
    assert any(bool((label == 1).any()) and bool((label == -1).any()) for label in labels)


def test_loss_without_iou_branch_equals_torchvisions_rpn_loss():
    """Same labels, same sampling RNG: our RPN's objectness and box losses are torchvision's compute_loss."""
    generator = torch.Generator().manual_seed(0)
    ours, theirs = rpn_pair()
    images = ImageList(torch.zeros(2, 3, 128, 128), [(128, 128)] * 2)
    features = pyramid(2, 128, generator)
    targets = random_targets([4, 2], 128, generator)
    out, _, _ = ours.predict(images, features)
    torch.manual_seed(7)
    losses, info = ours.loss(out, targets)

    objectness, deltas = concat_box_prediction_layers(*theirs.head(features)[:2])
    anchors = theirs.anchor_generator(images, features)
    labels, matched = theirs.assign_targets_to_anchors(anchors, targets)
    regression_targets = theirs.box_coder.encode(matched, anchors)
    torch.manual_seed(7)
    loss_objectness, loss_box = theirs.compute_loss(objectness, deltas, labels, regression_targets)
    torch.testing.assert_close(losses["loss_cls"], loss_objectness)
    torch.testing.assert_close(losses["loss_box"], loss_box)
    assert float(losses["loss_quality"]) == 0.0
    assert info["assignment"].gt_index.shape == (2, anchors[0].shape[0]) and float(info["assign_ms"]) >= 0


def test_flattening_matches_torchvisions_anchor_order():
    generator = torch.Generator().manual_seed(1)
    head = RPNHeadWithIoU(8, 3, use_iou=True)
    logits, deltas, ious = head(pyramid(2, 64, generator))
    expected_logits, expected_deltas = concat_box_prediction_layers(logits, deltas)
    torch.testing.assert_close(flatten_anchor_maps(logits, 1).reshape(-1, 1), expected_logits)
    torch.testing.assert_close(flatten_anchor_maps(deltas, 4).reshape(-1, 4), expected_deltas)
    assert flatten_anchor_maps(ious, 1).shape == (2, 3 * (256 + 64 + 16 + 4 + 1), 1)
    assert RPNHeadWithIoU(8, 3)(pyramid(1, 64, generator))[2] is None


def test_unified_score_is_the_geometric_mean_of_the_probabilities():
    objectness = torch.tensor([-30.0, -2.0, 0.0, 1.5, 8.0, 40.0])
    iou = torch.tensor([0.5, -1.0, 0.0, 3.0, -8.0, 40.0])
    expected = torch.sqrt(torch.sigmoid(objectness.double()) * torch.sigmoid(iou.double()))
    torch.testing.assert_close(torch.sigmoid(unified_logits(objectness, iou)).double(), expected, rtol=1e-5, atol=1e-7)
    assert not torch.isnan(unified_logits(objectness, iou)).any()


def test_proposals_are_ranked_by_the_unified_score_with_the_iou_branch():
    """With an IoU branch that predicts IoU 1 (logit +30) for one anchor and 0 for the others, that anchor's
    box is the top proposal even though its objectness is not the highest."""
    ours, _ = rpn_pair(use_iou=True)
    ours.eval()
    images = ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)])
    features = [torch.zeros(1, 8, 64 // 2**level, 64 // 2**level) for level in range(2, 7)]
    with torch.no_grad():
        for conv in (ours.head.cls_logits, ours.head.bbox_pred, ours.head.iou_pred):
            conv.weight.zero_()
            conv.bias.zero_()
        ours.head.cls_logits.bias.copy_(torch.tensor([1.0, 2.0, 1.0]))  # the 1:1 anchors look best
        ours.head.iou_pred.bias.copy_(torch.tensor([-30.0, -30.0, 30.0]))  # the 2:1 (h / w) anchors predict IoU 1
        out, boxes, scores = ours.predict(images, features)
    top = boxes[0][0]
    assert float(top[3] - top[1]) > float(top[2] - top[0])  # taller than wide: a 2:1 anchor
    torch.testing.assert_close(scores[0][0], torch.sqrt(torch.sigmoid(torch.tensor(1.0))), rtol=1e-4, atol=1e-6)
    assert out.quality.shape == out.cls_logits.shape[:2]


def test_paa_rpn_anchor_score_uses_the_objectness_bce():
    """rpn_assigner=paa sets focal alpha 1 and gamma 0: with one class the focal term of PAA's anchor score is
    then the objectness BCE against 1, the official RPN score's classification term."""
    logits = torch.linspace(-6, 6, 13).unsqueeze(1)
    bce = F.binary_cross_entropy_with_logits(logits[:, 0], torch.ones(13), reduction="none")
    torch.testing.assert_close(focal_loss_sum(logits.clone(), torch.zeros(13, dtype=torch.int64), alpha=1.0, gamma=0.0), bce)


@pytest.mark.parametrize("name, params", [("paa", dict(focal_alpha=1.0, focal_gamma=0.0)), ("atss", dict(topk=27))])
def test_prediction_aware_and_multi_level_assigners_train_the_rpn(name, params):
    generator = torch.Generator().manual_seed(3)
    anchor_generator = AnchorGenerator(SIZES, RATIOS)
    rpn = AssignedRPN(anchor_generator, RPNHeadWithIoU(8, 3, use_iou=True), assigners.build(name, **params), **NMS)
    images = ImageList(torch.zeros(2, 3, 128, 128), [(128, 128)] * 2)
    features = {str(i): f.requires_grad_() for i, f in enumerate(pyramid(2, 128, generator))}
    boxes, losses = rpn(images, features, random_targets([3, 0], 128, generator))
    assert set(losses) == {"loss_cls", "loss_box", "loss_quality"}
    assert all(torch.isfinite(v.detach()) for v in losses.values()) and float(losses["loss_quality"].detach()) > 0
    sum(losses.values()).backward()
    assert rpn.head.iou_pred.weight.grad.abs().sum() > 0
    assert len(boxes) == 2 and boxes[0].shape[1] == 4
