"""Losses on hand-built outputs with a fixed assigner, so every value can be computed by hand.

With logits 0 (p = 1/2), alpha = 0.25 and gamma = 2, the focal loss of one class is
    positive: -alpha * (1 - p)^2 * log p       = 0.25 * 0.25 * ln 2 = 0.0625 ln 2
    negative: -(1 - alpha) * p^2 * log(1 - p)  = 0.75 * 0.25 * ln 2 = 0.1875 ln 2
and BCE-with-logits at logit 0 is ln 2 whatever the target.
"""

import math

import pytest
import torch

import assigners
from detector import (
    DetectionLoss,
    DetectorOutput,
    build_scorer,
    crowd_overlap,
    device_loss_normalizers,
    pad_targets,
)
from detector.losses import QUALITY_SUM_EPS

LN2 = math.log(2.0)
FOCAL_POS = 0.0625 * LN2
FOCAL_NEG = 0.1875 * LN2


class FixedAssigner:
    """Returns a given gt_index and remembers what it was called with."""

    def __init__(self, gt_index):
        self.gt_index = torch.as_tensor(gt_index, dtype=torch.int64)
        self.inputs = None

    def __call__(self, inputs):
        self.inputs = inputs
        return assigners.Assignment(gt_index=self.gt_index.clone())


def zero_output(anchors, batch=1, num_classes=2, quality=True):
    """Output with all logits and deltas 0: every predicted box equals its anchor, p = 1/2."""
    anchors = torch.as_tensor(anchors, dtype=torch.float32)
    num_anchors = anchors.shape[0]
    return DetectorOutput(
        cls_logits=torch.zeros(batch, num_anchors, num_classes, requires_grad=True),
        box_deltas=torch.zeros(batch, num_anchors, 4, requires_grad=True),
        quality=torch.zeros(batch, num_anchors, requires_grad=True) if quality else None,
        anchors=anchors,
        num_anchors_per_level=[num_anchors],
        strides=[8],
    )


def target(boxes, labels, crowd=None):
    t = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    if crowd is not None:
        t["crowd_boxes"] = torch.tensor(crowd, dtype=torch.float32).reshape(-1, 4)
    return t


def values(losses):
    return {k: v.item() for k, v in losses.items()}


@pytest.mark.parametrize(
    ("scorer", "quality_target"),
    [("iou", 0.5), ("centerness", math.sqrt(4 / 4 * 4 / 12)), ("none", None)],
)
def test_one_anchor_by_hand(scorer, quality_target):
    # Anchor (= predicted box) [0, 0, 8, 8], GT [0, 0, 8, 16] of class 0 among C = 2.
    # IoU = 64 / 128 = 1/2; the enclosing box is the GT (area 128 = union), so GIoU = 1/2, loss 1/2.
    # Centerness of the anchor centre (4, 4) in the GT: l = r = 4, t = 4, b = 12.
    out = zero_output([[0.0, 0.0, 8.0, 8.0]], quality=scorer != "none")
    # Loss weights chosen apart from every default, so the test sees that the scorer's weights are used.
    weights = dict(cls_weight=1.5, box_weight=1.3, quality_weight=0.5 if scorer != "none" else 0.0)
    loss = DetectionLoss(FixedAssigner([[0]]), build_scorer(scorer, **weights), num_classes=2)
    losses, info = loss(out, [target([[0.0, 0.0, 8.0, 16.0]], [0])])
    got = values(losses)
    assert got["loss_cls"] == pytest.approx(1.5 * (FOCAL_POS + FOCAL_NEG), rel=1e-5)
    # One positive: the quality weight cancels in sum(w * l) / sum(w).
    assert got["loss_box"] == pytest.approx(1.3 * 0.5, rel=1e-5)
    assert got["loss_quality"] == pytest.approx(0.5 * LN2 if quality_target is not None else 0.0, rel=1e-5)
    stats = assigners.assignment_stats(info["inputs"], info["assignment"])
    assert stats["num_pos"] == 1 and stats["num_gt"] == 1 and info["assign_ms"].ms >= 0.0
    if quality_target is not None:
        # d loss_quality / d logit = 0.5 * (sigmoid(0) - target): checks the target itself.
        sum(losses.values()).backward()
        assert float(out.quality.grad[0, 0]) == pytest.approx(0.5 * (0.5 - quality_target), rel=1e-5)


def test_quality_weighted_box_normalisation_by_hand():
    # Two positives on identical anchors [0, 0, 8, 8] for two GTs:
    #   GT0 [0, 0, 8, 16]: IoU 1/2 = GIoU, loss 0.5;  GT1 [2, 0, 10, 8]: IoU 48/80 = 0.6 = GIoU, loss 0.4.
    anchors = [[0.0, 0.0, 8.0, 8.0]] * 2
    gt = target([[0.0, 0.0, 8.0, 16.0], [2.0, 0.0, 10.0, 8.0]], [0, 1])
    iou_losses, _ = DetectionLoss(FixedAssigner([[0, 1]]), build_scorer("iou"), 2)(zero_output(anchors), [gt])
    plain_losses, _ = DetectionLoss(FixedAssigner([[0, 1]]), build_scorer("none"), 2)(
        zero_output(anchors, quality=False), [gt]
    )
    # IoU-weighted: (0.5 * 0.5 + 0.6 * 0.4) / (0.5 + 0.6); unweighted: (0.5 + 0.4) / 2.
    assert iou_losses["loss_box"].item() == pytest.approx(1.3 * 0.49 / 1.1, rel=1e-5)
    assert plain_losses["loss_box"].item() == pytest.approx(1.3 * 0.45, rel=1e-5)
    # Classification and quality are divided by the 2 positives.
    assert iou_losses["loss_cls"].item() == pytest.approx(2 * (FOCAL_POS + FOCAL_NEG) / 2, rel=1e-5)
    assert iou_losses["loss_quality"].item() == pytest.approx(0.5 * 2 * LN2 / 2, rel=1e-5)


def test_ignored_anchors_leave_the_classification_loss():
    out = zero_output([[0.0, 0.0, 8.0, 8.0]] * 3)
    losses, _ = DetectionLoss(FixedAssigner([[0, assigners.IGNORED, assigners.NEGATIVE]]), build_scorer("iou"), 2)(
        out, [target([[0.0, 0.0, 8.0, 16.0]], [1])]
    )
    assert losses["loss_cls"].item() == pytest.approx((FOCAL_POS + FOCAL_NEG) + 2 * FOCAL_NEG, rel=1e-5)


def test_crowd_boxes_ignore_overlapping_negatives():
    # Anchor 0 positive; anchor 1 negative, half covered by the crowd box; anchor 2 negative, a quarter covered.
    anchors = [[0.0, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0], [40.0, 0.0, 50.0, 10.0]]
    crowd = [[25.0, 0.0, 45.0, 10.0], [-100.0, -100.0, 100.0, -90.0]]  # the second covers nothing
    gt = target([[0.0, 0.0, 10.0, 20.0]], [0], crowd=crowd)
    torch.testing.assert_close(
        crowd_overlap(torch.tensor(anchors), torch.tensor([crowd]), torch.ones(1, 2, dtype=torch.bool)),
        torch.tensor([[0.0, 0.5, 0.5]]),
    )
    loss = DetectionLoss(FixedAssigner([[0, -1, -1]]), build_scorer("iou"), 2, crowd_ignore_iof=0.5)
    with_crowd, _ = loss(zero_output(anchors), [gt])
    without_crowd, _ = loss(zero_output(anchors), [target([[0.0, 0.0, 10.0, 20.0]], [0])])
    pos, neg_anchor = FOCAL_POS + FOCAL_NEG, 2 * FOCAL_NEG
    assert without_crowd["loss_cls"].item() == pytest.approx(pos + 2 * neg_anchor, rel=1e-5)
    # IoF 0.5 >= 0.5 ignores both negatives; the positive stays (crowd never removes positives).
    assert with_crowd["loss_cls"].item() == pytest.approx(pos, rel=1e-5)
    strict = DetectionLoss(FixedAssigner([[0, -1, -1]]), build_scorer("iou"), 2, crowd_ignore_iof=0.6)
    assert strict(zero_output(anchors), [gt])[0]["loss_cls"].item() == pytest.approx(pos + 2 * neg_anchor, rel=1e-5)
    # A crowd box over the positive anchor leaves it positive.
    over_positive = target([[0.0, 0.0, 10.0, 20.0]], [0], crowd=[[0.0, 0.0, 10.0, 10.0]])
    assert loss(zero_output(anchors), [over_positive])[0]["loss_cls"].item() == pytest.approx(
        pos + 2 * neg_anchor, rel=1e-5
    )


def test_zero_gt_images_stay_finite_with_the_iou_assigner():
    anchors = [[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0], [0.0, 8.0, 8.0, 16.0]]
    loss = DetectionLoss(assigners.build("max_iou"), build_scorer("iou"), 2)
    empty = target([], [])

    out = zero_output(anchors, batch=2)
    losses, info = loss(out, [target([[0.0, 0.0, 8.0, 8.0]], [1]), empty])
    assert all(math.isfinite(v) for v in values(losses).values())
    stats = assigners.assignment_stats(info["inputs"], info["assignment"])
    assert stats["num_gt"] == 1 and stats["num_pos"] == 1
    sum(losses.values()).backward()
    assert torch.isfinite(out.box_deltas.grad).all() and torch.isfinite(out.quality.grad).all()

    out = zero_output(anchors, batch=2)
    losses, info = loss(out, [empty, empty])
    # No positives: every anchor-class pair is a negative, normalised by max(0, 1) = 1.
    assert losses["loss_cls"].item() == pytest.approx(2 * 3 * 2 * FOCAL_NEG, rel=1e-5)
    assert losses["loss_box"].item() == 0.0 and losses["loss_quality"].item() == 0.0
    stats = assigners.assignment_stats(info["inputs"], info["assignment"])
    assert stats["num_gt"] == 0 and stats["num_pos"] == 0 and stats["pos_iou_mean"] == 0.0
    sum(losses.values()).backward()
    assert float(out.box_deltas.grad.abs().sum()) == 0.0


def test_assigner_gets_detached_predictions_and_info_holds_its_assignment():
    assigner = FixedAssigner([[0, -1]])
    out = zero_output([[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0]])
    _, info = DetectionLoss(assigner, build_scorer("iou"), 2)(out, [target([[0.0, 0.0, 8.0, 8.0]], [0])])
    inputs = assigner.inputs
    assert not inputs.cls_logits.requires_grad and not inputs.pred_boxes.requires_grad
    torch.testing.assert_close(inputs.pred_boxes[0], out.anchors)  # zero deltas decode to the anchors
    assert inputs.gt_mask.tolist() == [[True]]
    assert torch.equal(info["assignment"].gt_index, torch.tensor([[0, -1]]))
    assert info["inputs"] is inputs
    assert assigners.assignment_stats(inputs, info["assignment"])["pos_iou_mean"] == pytest.approx(1.0)


def test_scorer_must_match_the_quality_branch():
    out = zero_output([[0.0, 0.0, 8.0, 8.0]], quality=False)
    with pytest.raises(ValueError, match="use_quality=True"):
        DetectionLoss(FixedAssigner([[0]]), build_scorer("iou"), 2)(out, [target([[0.0, 0.0, 8.0, 8.0]], [0])])
    out = zero_output([[0.0, 0.0, 8.0, 8.0]], quality=True)
    with pytest.raises(ValueError, match="use_quality=False"):
        DetectionLoss(FixedAssigner([[0]]), build_scorer("none"), 2)(out, [target([[0.0, 0.0, 8.0, 8.0]], [0])])


def test_pad_targets():
    gt_boxes, gt_labels, gt_mask = pad_targets([target([[1.0, 2.0, 3.0, 4.0]], [5]), target([], [])])
    assert gt_boxes.shape == (2, 1, 4) and gt_labels.tolist() == [[5], [0]] and gt_mask.tolist() == [[True], [False]]
    gt_boxes, gt_labels, gt_mask = pad_targets([target([], []), target([], [])])
    assert gt_boxes.shape == (2, 0, 4) and gt_labels.shape == (2, 0) and gt_mask.shape == (2, 0)


def normalizers(num_pos, quality_sum, **kwargs):
    """The two normalisers read back as Python floats."""
    return tuple(float(v) for v in device_loss_normalizers(num_pos, quality_sum, **kwargs))


def test_normalizers_with_a_fake_all_reduce():
    # Two processes: (3 positives, quality sum 1.2) here and (5, 2.0) on the other one.
    other = torch.tensor([5.0, 2.0], dtype=torch.float64)
    num_pos, quality_sum = normalizers(3.0, torch.tensor(1.2), reduce_sum=lambda t: t + other, world_size=2)
    assert num_pos == pytest.approx(4.0) and quality_sum == pytest.approx(1.6)
    # One process on the merged batch divides by 8 and 3.2; with DDP averaging gradients over the
    # 2 processes, each process's divisor times the world size must equal that.
    merged = normalizers(8.0, torch.tensor(3.2))
    assert merged == pytest.approx((2 * num_pos, 2 * quality_sum))
    # Without torch.distributed the local values are used; zero positives clamp to 1 and eps.
    assert normalizers(0.0, torch.tensor(0.0)) == (1.0, QUALITY_SUM_EPS)
    assert normalizers(
        0.0, 0.0, reduce_sum=lambda t: t + torch.tensor([1.0, 0.5], dtype=torch.float64), world_size=2
    ) == pytest.approx((1.0, 0.25))


class SoftAssigner(FixedAssigner):
    """A fixed gt_index with a soft classification target on each positive."""

    def __init__(self, gt_index, soft_target):
        super().__init__(gt_index)
        self.soft_target = torch.as_tensor(soft_target, dtype=torch.float32)

    def __call__(self, inputs):
        self.inputs = inputs
        return assigners.Assignment(gt_index=self.gt_index.clone(), soft_target=self.soft_target.clone())


def test_soft_target_is_the_positive_class_target_of_the_focal_loss():
    # Zero logits: p = 1/2 and BCE = ln 2 whatever the target t; p_t = 1/2, so (1 - p_t)^2 = 1/4 and
    # alpha_t = 0.25 t + 0.75 (1 - t). The GT class has t = 0.6 (alpha_t 0.45), the other class t = 0.
    out = zero_output([[0.0, 0.0, 8.0, 8.0]], quality=False)
    loss = DetectionLoss(SoftAssigner([[0]], [[0.6]]), build_scorer("none"), num_classes=2)
    losses, _ = loss(out, [target([[0.0, 0.0, 8.0, 16.0]], [0])])
    expected = LN2 * 0.25 * (0.25 * 0.6 + 0.75 * 0.4) + LN2 * 0.25 * 0.75
    assert float(losses["loss_cls"].detach()) == pytest.approx(expected, rel=1e-6)
    # the box loss does not depend on the soft target
    hard, _ = DetectionLoss(FixedAssigner([[0]]), build_scorer("none"), num_classes=2)(
        zero_output([[0.0, 0.0, 8.0, 8.0]], quality=False), [target([[0.0, 0.0, 8.0, 16.0]], [0])])
    assert float(losses["loss_box"].detach()) == float(hard["loss_box"].detach())
    assert float(hard["loss_cls"].detach()) == pytest.approx(FOCAL_POS + FOCAL_NEG, rel=1e-6)


@pytest.mark.parametrize(
    ("scorer", "soft", "expected_cls"),
    [
        # Zero logits (p = 1/2, BCE = ln 2 whatever the target), C = 2, class 0 the GT's.
        # QFL, target = IoU 1/2: class 0 weighs |0.5 - 0.5|^2 = 0, class 1 |0 - 0.5|^2 = 1/4.
        ("qfl", None, 0.25 * LN2),
        # QFL with the assigner's soft target 0.8: class 0 weighs 0.3^2 = 0.09.
        ("qfl", 0.8, (0.09 + 0.25) * LN2),
        # VFL, target 1/2: class 0 weighs q = 1/2; class 1 (q = 0) weighs alpha p^2 = 0.75 / 4.
        ("vfl", None, (0.5 + 0.1875) * LN2),
        ("vfl", 0.8, (0.8 + 0.1875) * LN2),
    ],
)
def test_joint_scorers_by_hand(scorer, soft, expected_cls):
    # Anchor (= predicted box) [0, 0, 8, 8], GT [0, 0, 8, 16]: IoU = GIoU = 1/2, box loss 1/2.
    out = zero_output([[0.0, 0.0, 8.0, 8.0]], quality=False)
    assigner = FixedAssigner([[0]]) if soft is None else SoftAssigner([[0]], [[soft]])
    losses, _ = DetectionLoss(assigner, build_scorer(scorer, cls_weight=1.5), num_classes=2)(
        out, [target([[0.0, 0.0, 8.0, 16.0]], [0])])
    got = values(losses)
    assert got["loss_cls"] == pytest.approx(1.5 * expected_cls, rel=1e-5)
    assert got["loss_box"] == pytest.approx(2.0 * 0.5, rel=1e-5)  # one positive: its weight cancels
    assert got["loss_quality"] == 0.0


def test_joint_scorers_weight_the_box_loss_by_their_target():
    # As test_quality_weighted_box_normalisation_by_hand: IoUs 0.5 and 0.6, GIoU losses 0.5 and 0.4.
    anchors = [[0.0, 0.0, 8.0, 8.0]] * 2
    gt = target([[0.0, 0.0, 8.0, 16.0], [2.0, 0.0, 10.0, 8.0]], [0, 1])
    losses, _ = DetectionLoss(FixedAssigner([[0, 1]]), build_scorer("qfl"), 2)(zero_output(anchors, quality=False), [gt])
    assert losses["loss_box"].item() == pytest.approx(2.0 * 0.49 / 1.1, rel=1e-5)
    # With soft targets 0.2 and 0.8 from the assigner, those weigh instead: (0.2 * 0.5 + 0.8 * 0.4) / 1.0.
    losses, _ = DetectionLoss(SoftAssigner([[0, 1]], [[0.2, 0.8]]), build_scorer("vfl"), 2)(
        zero_output(anchors, quality=False), [gt])
    assert losses["loss_box"].item() == pytest.approx(2.0 * 0.42, rel=1e-5)


def test_normalizers_stay_on_the_device_of_the_inputs_as_float64_scalars():
    other = torch.tensor([5.0, 2.0], dtype=torch.float64)
    # An integer count and a float32 sum: both come back as 0-dim float64 tensors, not Python numbers.
    num_pos, quality_sum = device_loss_normalizers(3, torch.tensor(1.2), reduce_sum=lambda t: t + other, world_size=2)
    assert num_pos.dtype == quality_sum.dtype == torch.float64 and num_pos.dim() == quality_sum.dim() == 0
    assert num_pos.device == quality_sum.device == torch.device("cpu")
    assert float(num_pos) == 4.0 and float(quality_sum) == pytest.approx(1.6)
    num_pos, quality_sum = device_loss_normalizers(0, torch.tensor(0.0))
    assert float(num_pos) == 1.0 and float(quality_sum) == QUALITY_SUM_EPS


@pytest.mark.parametrize("name", ["none", "centerness", "iou", "qfl", "vfl"])
def test_classification_loss_over_a_mask_equals_it_over_the_selected_rows(name):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3, dtype=torch.float64)
    targets = torch.zeros(2, 5, 3, dtype=torch.float64)
    targets[0, 1, 2], targets[1, 3, 0] = 1.0, 0.6
    valid = torch.tensor([[True, True, False, True, True], [False, True, True, True, False]])
    scorer = build_scorer(name)
    selected = scorer.classification_loss(logits[valid], targets[valid], 0.25, 2.0)
    torch.testing.assert_close(scorer.classification_loss(logits, targets, 0.25, 2.0, valid=valid), selected)
    # What a masked-out row holds does not reach the sum.
    logits[~valid] = float("nan")
    torch.testing.assert_close(scorer.classification_loss(logits, targets, 0.25, 2.0, valid=valid), selected)


def test_box_loss_gradient_reaches_only_the_positives():
    out = zero_output([[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0], [0.0, 8.0, 8.0, 16.0]])
    losses, _ = DetectionLoss(FixedAssigner([[0, assigners.NEGATIVE, assigners.IGNORED]]), build_scorer("iou"), 2)(
        out, [target([[0.0, 0.0, 10.0, 12.0]], [1])]
    )
    losses["loss_box"].backward()
    assert out.box_deltas.grad[0, 0].abs().sum() > 0
    assert float(out.box_deltas.grad[0, 1:].abs().sum()) == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
def test_the_loss_reads_the_device_once_on_cuda():
    # The positives' nonzero() is the one read the step needs (it sizes every per-positive tensor); the
    # normalisers, the ignored anchors and the assignment timer stay on the device.
    device = torch.device("cuda")
    out = zero_output([[0.0, 0.0, 8.0, 8.0], [8.0, 0.0, 16.0, 8.0], [0.0, 8.0, 8.0, 16.0]])
    out = DetectorOutput(out.cls_logits.detach().to(device), out.box_deltas.detach().to(device),
                         out.quality.detach().to(device), out.anchors.to(device), out.num_anchors_per_level, out.strides)
    assigner = FixedAssigner([[0, assigners.NEGATIVE, assigners.IGNORED]])
    assigner.gt_index = assigner.gt_index.to(device)
    targets = [{k: v.to(device) for k, v in target([[0.0, 0.0, 10.0, 12.0]], [1]).items()}]
    loss = DetectionLoss(assigner, build_scorer("centerness"), 2)
    loss(out, targets)  # warm-up: lazy CUDA initialisation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as caught:
            loss(out, targets)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
