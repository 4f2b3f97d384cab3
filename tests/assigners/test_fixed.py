"""FNP (fixed number of positives) and FSR (fixed positive score range) on PAA's candidates."""

from __future__ import annotations

import math

import pytest
import torch

import assigners
from assigners import NEGATIVE, AssignInputs, assignment_stats
from assigners.anchor_score import anchor_loss, select_candidates

from .test_paa import _six_anchor_inputs

# In _six_anchor_inputs the anchors' losses are, by anchor index:
# 9.545, 0.0, 9.565, 0.01, 9.555, 0.02, (not pre-matched), (not pre-matched).


@pytest.mark.parametrize(
    ("num_pos", "positives"),
    [(1, [1]), (2, [1, 3]), (4, [0, 1, 3, 5]), (9, [0, 1, 2, 3, 4, 5])],
)
def test_fnp_by_hand(num_pos, positives):
    out = assigners.build("fnp", num_pos=num_pos)(_six_anchor_inputs())
    expected = [0 if anchor in positives else NEGATIVE for anchor in range(8)]
    assert out.gt_index.tolist() == [expected, [NEGATIVE] * 8]
    assert out.num_candidates.tolist() == [[6], [0]]


def test_fnp_respects_topk_candidates():
    # topk = 2: candidates are the two lowest losses only, so num_pos = 5 still gives 2.
    out = assigners.build("fnp", num_pos=5, topk=2)(_six_anchor_inputs())
    assert out.gt_index[0].tolist() == [NEGATIVE, 0, NEGATIVE, 0, NEGATIVE, NEGATIVE, NEGATIVE, NEGATIVE]


@pytest.mark.parametrize(
    ("min_score", "positives"),
    [
        (0.995, [1]),  # exp(-loss) >= 0.995 <=> loss <= 0.00501
        (0.985, [1, 3]),  # loss <= 0.0151
        (0.5, [1, 3, 5]),  # loss <= ln 2
        (math.exp(-9.56), [0, 1, 3, 4, 5]),  # all but the 9.565 one
    ],
)
def test_fsr_by_hand(min_score, positives):
    out = assigners.build("fsr", min_score=min_score)(_six_anchor_inputs())
    expected = [0 if anchor in positives else NEGATIVE for anchor in range(8)]
    assert out.gt_index.tolist() == [expected, [NEGATIVE] * 8]


def test_fsr_gt_without_positive_is_counted():
    inputs = _six_anchor_inputs()
    logits = torch.zeros_like(inputs.cls_logits)  # focal >= 0.3 for every anchor: S < 0.75
    inputs = AssignInputs(**{**inputs.__dict__, "cls_logits": logits})
    out = assigners.build("fsr", min_score=0.9)(inputs)
    assert out.gt_index.tolist() == [[NEGATIVE] * 8] * 2
    assert out.num_candidates.tolist() == [[6], [0]]
    stats = assignment_stats(inputs, out)
    assert stats["num_gt"] == 1 and stats["gt_without_pos"] == 1


def fnp_reference(inputs: AssignInputs, num_pos: int, topk: int) -> torch.Tensor:
    """Per GT, the num_pos lowest-loss candidates (ties: lower anchor index), by loops."""
    losses = anchor_loss(inputs)
    candidates = select_candidates(losses, inputs.num_anchors_per_level, topk, inputs.num_gt_slots)
    result = torch.full_like(losses.prematch, NEGATIVE)
    for i in range(inputs.batch_size):
        for g in range(inputs.num_gt_slots):
            idx = (candidates.gt[i] == g).nonzero().flatten()
            order = torch.sort(losses.loss[i, idx], stable=True).indices
            result[i, idx[order[:num_pos]]] = g
    return result


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_pos", [1, 9, 30])
def test_fnp_equals_loop_reference(make_batch, seed, num_pos):
    inputs = make_batch(seed, batch_size=3, max_gt=6)
    out = assigners.build("fnp", num_pos=num_pos)(inputs)
    assert torch.equal(out.gt_index, fnp_reference(inputs, num_pos, topk=9))


@pytest.mark.parametrize("seed", range(3))
def test_fsr_is_candidates_above_score(make_batch, seed):
    inputs = make_batch(seed, batch_size=3, max_gt=6)
    losses = anchor_loss(inputs)
    candidates = select_candidates(losses, inputs.num_anchors_per_level, 9, inputs.num_gt_slots)
    out = assigners.build("fsr", min_score=0.3)(inputs)
    expected = torch.where(candidates.mask & (torch.exp(-losses.loss) >= 0.3), candidates.gt, NEGATIVE)
    assert torch.equal(out.gt_index, expected)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("fnp", {"num_pos": 0}, "num_pos must be a positive int"),
        ("fnp", {"topk": -1}, "topk must be a positive int"),
        ("fsr", {"min_score": 0.0}, r"min_score must be in \(0, 1\]"),
        ("fsr", {"min_score": 1.5}, r"min_score must be in \(0, 1\]"),
        ("fsr", {"focal_alpha": -0.1}, r"focal_alpha must be in \[0, 1\]"),
    ],
)
def test_rejects_bad_params(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        assigners.build(name, **kwargs)
