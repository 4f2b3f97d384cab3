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
    with pytest.raises(ValueError, match="none, centerness, iou, qfl, vfl"):
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


@pytest.mark.parametrize("name", ["qfl", "vfl"])
def test_joint_scorers_have_no_quality_branch_and_score_by_the_class(name):
    scorer = build_scorer(name)
    assert not scorer.has_quality_branch and scorer.quality_in_classification and not scorer.predicts_iou
    probs = torch.tensor([0.9, 0.2, 0.5])
    assert torch.equal(scorer.inference_score(probs, None), probs)
    # Their quality target is the IoU of the predicted box: [0, 0, 8, 8] in [0, 0, 8, 16] is 1/2.
    targets = scorer.targets(torch.zeros(1, 4), torch.tensor([[0.0, 0, 8, 8]]), torch.tensor([[0.0, 0, 8, 16]]))
    assert targets.tolist() == pytest.approx([0.5])


def _qfl_by_the_paper(sigma: float, y: float, beta: float = 2.0) -> float:
    # GFL, Eq. 5: QFL(sigma) = -|y - sigma|^beta ((1 - y) log(1 - sigma) + y log(sigma))
    return -abs(y - sigma) ** beta * ((1 - y) * math.log(1 - sigma) + y * math.log(sigma))


def _vfl_by_the_paper(p: float, q: float, alpha: float = 0.75, gamma: float = 2.0) -> float:
    # VarifocalNet, Eq. 2: -q (q log p + (1 - q) log(1 - p)) if q > 0, else -alpha p^gamma log(1 - p)
    if q > 0:
        return -q * (q * math.log(p) + (1 - q) * math.log(1 - p))
    return -alpha * p**gamma * math.log(1 - p)


@pytest.mark.parametrize("name", ["qfl", "vfl"])
def test_joint_losses_equal_their_papers_formulas(name):
    probs = [0.8, 0.1, 0.5, 0.97, 0.3]
    targets = [0.3, 0.0, 0.5, 0.9, 0.0]
    logits = torch.tensor([[logit(p) for p in probs]], dtype=torch.float64)
    got = build_scorer(name).classification_loss(logits, torch.tensor([targets], dtype=torch.float64), 0.25, 2.0)
    formula = _qfl_by_the_paper if name == "qfl" else _vfl_by_the_paper
    assert float(got) == pytest.approx(sum(formula(p, t) for p, t in zip(probs, targets)), rel=1e-9)
    # Their own exponents are parameters: beta 1 (QFL), alpha 0.5 and gamma 1 (VFL).
    kwargs, paper = ({"beta": 1.0}, {"beta": 1.0}) if name == "qfl" else ({"alpha": 0.5, "gamma": 1.0},) * 2
    got = build_scorer(name, **kwargs).classification_loss(logits, torch.tensor([targets], dtype=torch.float64), 0.25, 2.0)
    assert float(got) == pytest.approx(sum(formula(p, t, **paper) for p, t in zip(probs, targets)), rel=1e-9)


@pytest.mark.parametrize(("name", "kwargs"), [("qfl", {"beta": -1.0}), ("vfl", {"alpha": float("nan")}),
                                              ("vfl", {"gamma": float("inf")})])
def test_joint_scorers_reject_bad_exponents(name, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        build_scorer(name, **kwargs)
