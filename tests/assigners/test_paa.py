"""PAA: separation schemes by hand, torch vs sklearn GMM backends, end-to-end cases."""

from __future__ import annotations

import pytest
import torch

import assigners
from assigners import IGNORED, NEGATIVE, AssignInputs
from assigners.anchor_score import anchor_loss
from assigners.gmm import fit_gmm_batched, fit_gmm_sklearn
from assigners.paa import separate_candidates, split_by_scheme

from .conftest import random_loss_rows, requires_cuda

BACKENDS = ["torch", "sklearn"]


def _sets(positive, ignored):
    """Positions of positives and ignored entries of the first row, as lists."""
    return positive[0].nonzero().flatten().tolist(), ignored[0].nonzero().flatten().tolist()


# --- split_by_scheme on hand-made GMM outputs ------------------------------------------

# Five candidates sorted by loss: labels fg, fg, bg, fg, bg; log-densities 1, 3, 2, 3, 5.
# fg peak: highest fg density 3 at positions 1 and 3 -> the smaller, 1. bg peak: position 4.
HAND_LABELS = torch.tensor([[0, 0, 1, 0, 1]])
HAND_DENSITY = torch.tensor([[1.0, 3.0, 2.0, 3.0, 5.0]], dtype=torch.float64)
HAND_MASK = torch.ones(1, 5, dtype=torch.bool)


@pytest.mark.parametrize(
    ("scheme", "positive", "ignored"),
    [
        ("a", [0, 1, 3], []),  # the fg-labelled ones
        ("b", [0, 1], [2, 3]),  # ignored strictly between the fg peak (1) and bg peak (4)
        ("c", [0, 1], []),  # up to the fg peak, the rest negative
        ("d", [0, 1], [3]),  # the rest: ignored if fg-labelled, negative if bg-labelled
        # official (b): the last bg peak + 1 = 5 candidates negative (all of them), positives win
        ("b_official", [0, 1], []),
    ],
)
def test_split_by_scheme_by_hand(scheme, positive, ignored):
    assert _sets(*split_by_scheme(HAND_LABELS, HAND_DENSITY, HAND_MASK, scheme)) == (positive, ignored)


@pytest.mark.parametrize("scheme", ["a", "b", "c", "d", "b_official"])
def test_split_without_foreground_makes_all_positive(scheme):
    labels = torch.tensor([[1, 1, 1, 0]])
    mask = torch.tensor([[True, True, True, False]])
    positive, ignored = split_by_scheme(labels, HAND_DENSITY[:, :4], mask, scheme)
    assert _sets(positive, ignored) == ([0, 1, 2], [])


def test_split_b_without_background_ignores_the_rest():
    labels = torch.tensor([[0, 0, 0, 0]])
    density = torch.tensor([[1.0, 4.0, 2.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert _sets(*split_by_scheme(labels, density, mask, "b")) == ([0, 1], [2, 3])
    assert _sets(*split_by_scheme(labels, density, mask, "c")) == ([0, 1], [])
    # The official (b) leaves the rest negative when no candidate is labelled background.
    assert _sets(*split_by_scheme(labels, density, mask, "b_official")) == ([0, 1], [])


def test_split_b_official_takes_the_last_bg_peak_plus_one_as_negatives():
    # Eight candidates in a row of ten (two padded): labels fg fg bg bg fg bg bg bg. fg peak: density
    # 3 at position 1 -> positives {0, 1}. bg peak: density 5 at position 2 -> the official
    # inds[-2 - 1:] is the last 3 candidates {5, 6, 7}, negative; the others {2, 3, 4} ignored.
    labels = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 1, 0, 0]])
    density = torch.tensor([[1.0, 3.0, 5.0, 0.0, 2.0, 1.0, 1.0, 1.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[True] * 8 + [False] * 2])
    assert _sets(*split_by_scheme(labels, density, mask, "b_official")) == ([0, 1], [2, 3, 4])
    # The paper's (b): ignored strictly between the peaks (none), negative from the bg peak on.
    assert _sets(*split_by_scheme(labels, density, mask, "b")) == ([0, 1], [])


def test_split_b_with_bg_peak_before_fg_peak_has_no_ignored():
    labels = torch.tensor([[1, 0, 0, 1]])
    density = torch.tensor([[5.0, 1.0, 4.0, 2.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert _sets(*split_by_scheme(labels, density, mask, "b")) == ([0, 1, 2], [])


# --- separate_candidates: GMM + scheme on constructed losses ---------------------------

# Two clusters; in each, the middle sample is nearest the fitted mean, so it is the
# component's density peak: fg peak at position 1, bg peak at position 4.
TWO_CLUSTERS = torch.tensor([[0.1, 0.2, 0.3, 5.0, 5.1, 5.2]], dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("scheme", "positive", "ignored"),
    [("a", [0, 1, 2], []), ("b", [0, 1], [2, 3]), ("c", [0, 1], []), ("d", [0, 1], [2])],
)
def test_separate_two_clusters(backend, scheme, positive, ignored):
    mask = torch.ones_like(TWO_CLUSTERS, dtype=torch.bool)
    result = separate_candidates(TWO_CLUSTERS, mask, scheme=scheme, gmm_backend=backend)
    assert _sets(*result) == (positive, ignored)


@pytest.mark.parametrize("backend", BACKENDS)
def test_separate_edge_rows(backend):
    loss = torch.tensor(
        [
            [0.7, 0.0, 0.0, 0.0],  # one candidate: positive
            [1.0, 1.0, 1.0, 0.0],  # identical losses: one fg component, all at the peak -> position 0
            [0.1, 5.0, 0.0, 0.0],  # two candidates, one per component
            [0.0, 0.0, 0.0, 0.0],  # no candidates
        ],
        dtype=torch.float64,
    )
    mask = torch.tensor(
        [[True, False, False, False], [True, True, True, False], [True, True, False, False], [False] * 4]
    )
    positive, ignored = separate_candidates(loss, mask, scheme="c", gmm_backend=backend)
    assert positive.tolist() == [
        [True, False, False, False],
        [True, False, False, False],
        [True, False, False, False],
        [False] * 4,
    ]
    assert not bool(ignored.any())


def test_backends_agree_on_thousands_of_candidate_sets():
    loss, mask = random_loss_rows(seed=10, num_rows=2000, min_len=2)
    torch_fit = fit_gmm_batched(loss, mask)
    sklearn_fit = fit_gmm_sklearn(loss, mask)
    both = torch_fit.converged & sklearn_fit.converged
    assert both.float().mean() >= 0.99
    for name in ("means", "variances", "weights"):
        difference = (getattr(torch_fit, name) - getattr(sklearn_fit, name)).abs()[both]
        assert difference.max() <= 1e-6, name
    for scheme in "abcd":
        torch_split = split_by_scheme(torch_fit.labels, torch_fit.log_density, mask, scheme)
        sklearn_split = split_by_scheme(sklearn_fit.labels, sklearn_fit.log_density, mask, scheme)
        same = torch.ones(loss.shape[0], dtype=torch.bool)
        for ours, theirs in zip(torch_split, sklearn_split):
            same &= (ours == theirs).all(dim=1)
        assert same.float().mean() >= 0.99, scheme


# --- the assigner, end to end ---------------------------------------------------------


def _six_anchor_inputs():
    """One GT [0, 0, 100, 100] of class 0; six anchors equal to it (all pre-matched) whose
    predicted boxes [0, 0, 100, 100 - h] give 1 - GIoU = h / 100 for h = 0, 1, 2, 90, 91, 92
    (listed out of order), and two far anchors. The h < 50 anchors predict class 0
    confidently (focal ~ 0); the others predict classes 1 and 2 (logits -5, 5, 5: focal
    = 0.25 * 0.987 * 5.007 + 2 * 0.75 * 0.987 * 5.007 = 8.65), so the losses are about
    {0, 0.01, 0.02} and {9.55, 9.56, 9.57}. Image 2 has no GT (one padded slot)."""
    box = [0.0, 0.0, 100.0, 100.0]
    heights = [90, 0, 92, 1, 91, 2]
    anchors = torch.tensor([box] * 6 + [[300, 300, 400, 400], [500, 0, 600, 100]])
    preds = torch.tensor([[0, 0, 100, 100 - h] for h in heights] + [box, box], dtype=torch.float32)
    logits = torch.full((8, 3), -30.0)
    logits[:, 0] = 30.0
    for anchor, h in enumerate(heights):
        if h > 50:
            logits[anchor] = torch.tensor([-5.0, 5.0, 5.0])
    return AssignInputs(
        anchors=anchors,
        num_anchors_per_level=[8],
        gt_boxes=torch.tensor([[box], [[1e4, 1e4, -5, 3]]]),
        gt_labels=torch.tensor([[0], [2]]),
        gt_mask=torch.tensor([[True], [False]]),
        cls_logits=torch.stack([logits, logits]),
        pred_boxes=torch.stack([preds, preds]),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        # Sorted by loss the anchors are 1 (h=0), 3 (h=1), 5 (h=2), 0 (90), 4 (91), 2 (92).
        ("a", [NEGATIVE, 0, NEGATIVE, 0, NEGATIVE, 0, NEGATIVE, NEGATIVE]),
        ("b", [IGNORED, 0, NEGATIVE, 0, NEGATIVE, IGNORED, NEGATIVE, NEGATIVE]),
        ("c", [NEGATIVE, 0, NEGATIVE, 0, NEGATIVE, NEGATIVE, NEGATIVE, NEGATIVE]),
        ("d", [NEGATIVE, 0, NEGATIVE, 0, NEGATIVE, IGNORED, NEGATIVE, NEGATIVE]),
    ],
)
def test_end_to_end_by_hand(backend, scheme, expected):
    out = assigners.build("paa", scheme=scheme, gmm_backend=backend)(_six_anchor_inputs())
    assert out.gt_index.tolist() == [expected, [NEGATIVE] * 8]
    assert out.num_candidates.tolist() == [[6], [0]]


def test_topk_limits_candidates():
    # topk = 4 keeps the 4 lowest losses (h = 0, 1, 2, 90): fg {0, 0.01, 0.02} peaks at
    # 0.01, so anchors 1 and 3 are positive; all others are negative.
    out = assigners.build("paa", topk=4)(_six_anchor_inputs())
    assert out.num_candidates.tolist() == [[4], [0]]
    assert out.gt_index[0].tolist() == [NEGATIVE, 0, NEGATIVE, 0, NEGATIVE, NEGATIVE, NEGATIVE, NEGATIVE]


def test_gt_without_candidates_gets_no_positive():
    inputs = _six_anchor_inputs()
    logits = inputs.cls_logits.clone()
    logits[0, :6, 1] = float("nan")  # every pre-matched anchor has a non-finite loss
    inputs = AssignInputs(**{**inputs.__dict__, "cls_logits": logits})
    out = assigners.build("paa")(inputs)
    assert out.num_candidates.tolist() == [[0], [0]]
    assert out.gt_index.tolist() == [[NEGATIVE] * 8] * 2


@pytest.mark.parametrize("seed", range(3))
def test_positives_only_among_own_candidates(make_batch, seed):
    # Candidate sets are disjoint (each anchor has one pre-matched GT), so every positive
    # or ignored anchor belongs to the GT it was pre-matched to, and is counted as its candidate.
    inputs = make_batch(seed, batch_size=3, max_gt=6)
    prematch = anchor_loss(inputs).prematch
    for scheme in "abcd":
        out = assigners.build("paa", scheme=scheme)(inputs)
        positive = out.gt_index >= 0
        assert torch.equal(out.gt_index[positive], prematch[positive])
        assert bool((prematch[out.gt_index == IGNORED] >= 0).all())
        per_gt = out.positives_per_gt(inputs.num_gt_slots)
        assert bool((per_gt <= out.num_candidates).all())
        # Scheme-independent: a GT with candidates gets at least one positive.
        assert bool((per_gt[out.num_candidates > 0] > 0).all())


def test_backends_agree_on_random_batches(make_batch):
    agree = total = 0
    for seed in range(4):
        inputs = make_batch(seed, batch_size=3, max_gt=6)
        ours = assigners.build("paa", gmm_backend="torch")(inputs).gt_index
        theirs = assigners.build("paa", gmm_backend="sklearn")(inputs).gt_index
        for i, g in inputs.gt_mask.nonzero().tolist():
            total += 1
            agree += bool(torch.equal(ours[i] == g, theirs[i] == g))
        assert torch.equal(ours == IGNORED, theirs == IGNORED)
    assert agree >= 0.99 * total


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "e"}, "valid choices: a, b, c, d"),
        ({"gmm_backend": "numpy"}, "valid choices: auto, torch, triton, sklearn"),
        ({"gmm_dtype": "float16"}, "valid choices: float32, float64"),
        ({"topk": 0}, "positive int"),
        ({"focal_alpha": 1.5}, r"\[0, 1\]"),
        ({"focal_gamma": -1.0}, ">= 0"),
        ({"giou_weight": -0.1}, ">= 0"),
    ],
)
def test_rejects_bad_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        assigners.build("paa", **kwargs)


@requires_cuda
def test_cuda_equals_cpu(make_batch):
    paa = assigners.build("paa")
    agree = total = 0
    for seed in range(3):
        cpu = paa(make_batch(seed, batch_size=4, max_gt=8)).gt_index
        cuda = paa(make_batch(seed, batch_size=4, max_gt=8, device="cuda")).gt_index.cpu()
        agree += int((cpu == cuda).all(dim=1).sum())
        total += cpu.shape[0]
    assert agree >= total - 1


def test_defaults_fit_in_float32_with_the_torch_em_on_cpu(make_batch):
    inputs = make_batch(0, batch_size=3, max_gt=6)
    default = assigners.build("paa")
    assert (default.gmm_backend, default.gmm_dtype) == ("auto", "float32")  # the official precision
    explicit = assigners.build("paa", gmm_backend="torch", gmm_dtype="float32")(inputs)
    assert torch.equal(default(inputs).gt_index, explicit.gt_index)


@pytest.mark.parametrize(("name", "dtype"), [("float32", torch.float32), ("float64", torch.float64)])
def test_separate_candidates_fits_in_gmm_dtype(name, dtype):
    loss, mask = random_loss_rows(seed=11, num_rows=60)
    fit = fit_gmm_batched(loss, mask, dtype=dtype)
    expected = split_by_scheme(fit.labels, fit.log_density, mask, "b")
    result = separate_candidates(loss, mask, scheme="b", gmm_backend="torch", gmm_dtype=name)
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(result, expected))
