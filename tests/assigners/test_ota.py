"""OTA: a loop-per-image/per-GT restatement of Megvii-BaseDetection/OTA as the oracle, and hand-built cases.

The oracle follows ``FCOS.get_ground_truth`` and ``SinkhornDistance`` of the official
``playground/detection/coco/ota.res50.fpn.coco.800size.1x/fcos.py`` line by line, one image
and (where the official code is per GT) one GT at a time, with the naive (G, A, C) focal loss
of ``torchvision.ops.sigmoid_focal_loss`` (cvpods' ``sigmoid_focal_loss`` is the same formula),
IoUs in the official ltrb form and the official Sinkhorn updates. Its only addition is the
tie rule of ``assigners/ota.py`` (see its docstring), applied anchor by anchor.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

import assigners
from assigners import NEGATIVE, AssignInputs
from assigners.geometry import box_centers
from assigners.ota import centre_prior

from .conftest import as_float64, make_anchors, requires_cuda

FLOAT32_EPS = torch.finfo(torch.float32).eps


def ota_reference(
    inputs: AssignInputs,
    *,
    top_candidates: int = 20,
    reg_weight: float = 1.5,
    sinkhorn_eps: float = 0.1,
    sinkhorn_iters: int = 50,
    center_radius: float = 2.5,
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(gt_index (B, A), num_candidates (B, G)) of OTA, restated plainly, on CPU."""
    anchors = inputs.anchors.cpu().to(inputs.gt_boxes.dtype)
    points = (anchors[:, :2] + anchors[:, 2:]) / 2  # one location per anchor
    num_anchors = anchors.shape[0]
    b, g = inputs.gt_mask.shape
    gt_index = torch.full((b, num_anchors), NEGATIVE, dtype=torch.int64)
    num_candidates = torch.zeros(b, g, dtype=torch.int64)
    for image in range(b):
        slots = [slot for slot in range(g) if bool(inputs.gt_mask[image, slot])]
        if not slots:
            continue
        boxes = inputs.gt_boxes[image, slots].cpu()
        labels = inputs.gt_labels[image, slots].cpu()
        logits = inputs.cls_logits[image].cpu().to(boxes.dtype)
        preds = inputs.pred_boxes[image].cpu().to(boxes.dtype)
        n, num_classes = len(slots), logits.shape[1]

        # fcos.py:256-275: inside the box (> 0.01) and inside the centre region clipped to it.
        candidate = torch.zeros(n, num_anchors, dtype=torch.bool)
        for k in range(n):
            box = boxes[k]
            in_box = torch.cat([points - box[:2], box[2:] - points], dim=1).min(dim=1).values > 0.01
            centre = (box[:2] + box[2:]) / 2
            in_centre, start = [], 0
            for count, stride in zip(inputs.num_anchors_per_level, inputs.strides):
                radius = stride * center_radius
                region = torch.cat([torch.max(centre - radius, box[:2]), torch.min(centre + radius, box[2:])])
                level_points = points[start : start + count]
                deltas = torch.cat([level_points - region[:2], region[2:] - level_points], dim=1)
                in_centre.append(deltas.min(dim=1).values > 0)
                start += count
            candidate[k] = in_box & torch.cat(in_centre)
            num_candidates[image, slots[k]] = int(candidate[k].sum())

        # fcos.py:281-298: focal loss against the one-hot label, summed over classes; background against 0.
        shape = (n, num_anchors, num_classes)
        one_hot = F.one_hot(labels, num_classes).to(logits.dtype)
        loss_cls = sigmoid_focal_loss(
            logits.unsqueeze(0).expand(shape), one_hot.unsqueeze(1).expand(shape), focal_alpha, focal_gamma
        ).sum(dim=-1)
        loss_cls_bg = sigmoid_focal_loss(logits, torch.zeros_like(logits), focal_alpha, focal_gamma).sum(dim=-1)

        # fcos.py:300-309 with get_ious_and_iou_loss (fcos.py:47-113), loss_type 'iou', in ltrb form.
        ious = torch.zeros(n, num_anchors, dtype=logits.dtype)
        for k in range(n):
            pred_ltrb = torch.cat([points - preds[:, :2], preds[:, 2:] - points], dim=1)
            gt_ltrb = torch.cat([points - boxes[k, :2], boxes[k, 2:] - points], dim=1)
            p = torch.cat([-pred_ltrb[:, :2], pred_ltrb[:, 2:]], dim=1)
            t = torch.cat([-gt_ltrb[:, :2], gt_ltrb[:, 2:]], dim=1)
            p_area = (p[:, 2] - p[:, 0]).clamp(min=0) * (p[:, 3] - p[:, 1]).clamp(min=0)
            t_area = (t[:, 2] - t[:, 0]).clamp(min=0) * (t[:, 3] - t[:, 1]).clamp(min=0)
            w = (torch.min(p[:, 2], t[:, 2]) - torch.max(p[:, 0], t[:, 0])).clamp(min=0)
            h = (torch.min(p[:, 3], t[:, 3]) - torch.max(p[:, 1], t[:, 1])).clamp(min=0)
            ious[k] = w * h / (t_area + p_area - w * h).clamp(min=FLOAT32_EPS)
        loss_delta = -ious.clamp(min=FLOAT32_EPS).log()

        # fcos.py:311-319: cost, dynamic k, supplies and demands, background row last.
        loss = loss_cls + reg_weight * loss_delta + 1e6 * (1 - candidate.to(logits.dtype))
        top_ious = torch.topk(ious * candidate.to(logits.dtype), min(top_candidates, num_anchors), dim=1).values
        mu = torch.ones(n + 1, dtype=logits.dtype)
        mu[:-1] = torch.clamp(top_ious.sum(1).int(), min=1).to(logits.dtype)
        mu[-1] = num_anchors - mu[:-1].sum()
        assert mu[-1] > 0, "the official code needs more anchors than the GTs' supplies"
        nu = torch.ones(num_anchors, dtype=logits.dtype)
        cost = torch.cat([loss, loss_cls_bg.unsqueeze(0)], dim=0)

        # fcos.py:665-715: SinkhornDistance, literally.
        def modified_cost(c, u, v):  # SinkhornDistance.M
            return (-c + u.unsqueeze(-1) + v.unsqueeze(-2)) / sinkhorn_eps

        u, v = torch.ones_like(mu), torch.ones_like(nu)
        for _ in range(sinkhorn_iters):
            column_lse = torch.logsumexp(modified_cost(cost, u, v).transpose(-2, -1), dim=-1)
            v = sinkhorn_eps * (torch.log(nu + 1e-8) - column_lse) + v
            u = sinkhorn_eps * (torch.log(mu + 1e-8) - torch.logsumexp(modified_cost(cost, u, v), dim=-1)) + u
        pi = torch.exp(modified_cost(cost, u, v))

        # fcos.py:325-331: rescale rows by their max, then each anchor's best supplier
        # (ties: the larger raw share, then the lower row, the background last).
        share = (pi / pi.max(dim=1, keepdim=True).values).T.tolist()
        raw = pi.T.tolist()
        for anchor in range(num_anchors):
            best = max(range(n + 1), key=lambda row: (share[anchor][row], raw[anchor][row], -row))
            if best < n and share[anchor][best] > 0:
                gt_index[image, anchor] = slots[best]
    return gt_index, num_candidates


PARAMETERS = [
    {},  # the official defaults
    {
        "top_candidates": 3,
        "reg_weight": 3.0,
        "sinkhorn_eps": 0.5,
        "sinkhorn_iters": 7,
        "center_radius": 1.5,
        "focal_alpha": 0.5,
        "focal_gamma": 1.0,
    },
]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("params", PARAMETERS, ids=["defaults", "other"])
def test_ota_equals_loop_reference(make_batch, device, seed, params):
    inputs = as_float64(make_batch(seed, batch_size=3, max_gt=6, device=device))
    out = assigners.build("ota", **params)(inputs)
    expected_index, expected_candidates = ota_reference(inputs, **params)
    assert out.gt_index.device.type == device and out.gt_index.dtype == torch.int64
    assert torch.equal(out.gt_index.cpu(), expected_index)
    assert torch.equal(out.num_candidates.cpu(), expected_candidates)


def test_reference_batches_cover_the_interesting_cases(make_batch):
    # The seeds above are worth comparing on: they hold GTs without candidates (handled by
    # the 1e6 penalty alone), GTs with several positives (dynamic k > 1) and anchors that
    # are candidates of two GTs or more (where the transport decides).
    without_candidates = several_positives = shared_candidates = 0
    for seed in range(5):
        inputs = as_float64(make_batch(seed, batch_size=3, max_gt=6))
        out = assigners.build("ota")(inputs)
        real = inputs.gt_mask
        without_candidates += int((out.num_candidates[real] == 0).sum())
        several_positives += int((out.positives_per_gt(inputs.num_gt_slots)[real] >= 2).sum())
        prior = centre_prior(
            box_centers(inputs.anchors), inputs.gt_boxes, inputs.num_anchors_per_level, inputs.strides, 2.5
        )
        shared_candidates += int(((prior & real.unsqueeze(-1)).sum(dim=1) >= 2).sum())
    assert without_candidates >= 3
    assert several_positives >= 3
    assert shared_candidates >= 3


# ----------------------------------------------------------------------------------------
# Hand-built cases. Unless said otherwise: one class, every logit 0, so the classification
# cost is the same everywhere (0.25 * 0.5^2 * log 2 for a GT, 0.75 * 0.5^2 * log 2 for the
# background) and only the regression cost 1.5 * -log IoU(pred, GT) tells anchors apart.


def _hand_inputs(image_size, strides, gt_boxes, pred_boxes, *, gt_mask=None, labels=None, dtype=torch.float64):
    """One image; ``pred_boxes`` maps anchor index -> predicted box, the others predict a box far away."""
    anchors, counts = make_anchors(image_size, strides)
    a = anchors.shape[0]
    gt = torch.tensor(gt_boxes, dtype=dtype).reshape(1, -1, 4)
    g = gt.shape[1]
    preds = torch.tensor([1000.0, 1000.0, 1010.0, 1010.0], dtype=dtype).repeat(1, a, 1)
    for anchor, box in pred_boxes.items():
        preds[0, anchor] = torch.tensor(box, dtype=dtype)
    return AssignInputs(
        anchors=anchors.to(dtype),
        num_anchors_per_level=counts,
        gt_boxes=gt,
        gt_labels=torch.zeros(1, g, dtype=torch.int64) if labels is None else torch.tensor([labels]),
        gt_mask=torch.ones(1, g, dtype=torch.bool) if gt_mask is None else torch.tensor([gt_mask]),
        cls_logits=torch.zeros(1, a, 1, dtype=dtype),
        pred_boxes=preds,
        strides=list(strides),
    )


# A row of four stride-8 anchors, locations x = 4, 12, 20, 28 at y = 4 (indices 0-3).
ROW = dict(image_size=(8, 32), strides=(8,))
GT_LEFT = [0.0, 0.0, 16.0, 8.0]  # candidates: anchors 0 and 1 (centre region clipped to the box)
GT_RIGHT = [8.0, 0.0, 24.0, 8.0]  # candidates: anchors 1 and 2
COMPETING_PREDS = {
    0: [0.0, 0.0, 8.0, 8.0],  # IoU with GT_LEFT 64 / 128 = 0.5
    1: [2.0, 0.0, 18.0, 8.0],  # IoU with GT_LEFT 112 / 144 = 0.778, with GT_RIGHT 80 / 176 = 0.455
    2: [23.0, 0.0, 32.0, 8.0],  # IoU with GT_RIGHT 8 / 192 = 0.042
}


def test_image_without_gt_is_all_negative(make_batch):
    # Image 1 has no GT, image 0 has some: image 1 is all negative, image 0 as when alone;
    # a batch whose every slot is padded is all negative too.
    inputs = as_float64(make_batch(3, batch_size=2, max_gt=4, empty_image=True))
    assert bool(inputs.gt_mask[0].any()) and not bool(inputs.gt_mask[1].any())
    ota = assigners.build("ota")
    out = ota(inputs)
    assert bool((out.gt_index[1] == NEGATIVE).all()) and bool((out.gt_index[0] >= 0).any())
    assert bool((out.num_candidates[1] == 0).all())
    none = ota(dataclasses.replace(inputs, gt_mask=torch.zeros_like(inputs.gt_mask)))
    assert bool((none.gt_index == NEGATIVE).all())


def test_two_gts_competing_for_one_anchor_are_solved_jointly():
    # Both GTs have mu = 1 (sums of candidate IoUs: 0.5 + 0.778 -> 1; 0.455 + 0.042 -> 0 -> 1)
    # and anchor 1 is the best anchor of both. Regression costs 1.5 * -log IoU:
    #   GT_LEFT:  anchor 0: 1.04, anchor 1: 0.38;   GT_RIGHT: anchor 1: 1.18, anchor 2: 4.77.
    # A per-anchor rule (lowest cost wins) gives anchor 1 to GT_LEFT and leaves GT_RIGHT
    # anchor 2 (total 0.38 + 4.77 = 5.15); the transport plan is the cheaper whole,
    # GT_LEFT -> anchor 0 and GT_RIGHT -> anchor 1 (1.04 + 1.18 = 2.22). Anchors 2 and 3 are
    # the background's (mu_bg = 4 - 2 = 2).
    inputs = _hand_inputs(**ROW, gt_boxes=[GT_LEFT, GT_RIGHT], pred_boxes=COMPETING_PREDS)
    out = assigners.build("ota")(inputs)
    assert out.gt_index.tolist() == [[0, 1, NEGATIVE, NEGATIVE]]
    assert out.num_candidates.tolist() == [[2, 2]]
    # Either slot order: the result follows the GTs.
    swapped = _hand_inputs(**ROW, gt_boxes=[GT_RIGHT, GT_LEFT], pred_boxes=COMPETING_PREDS)
    assert assigners.build("ota")(swapped).gt_index.tolist() == [[1, 0, NEGATIVE, NEGATIVE]]
    assert torch.equal(ota_reference(inputs)[0], out.gt_index)


def test_anchor_with_non_finite_prediction_goes_to_no_gt():
    # As above, but anchor 1 predicts NaN: it is negative and no candidate, so each GT keeps
    # its other candidate (GT_LEFT: anchor 0, GT_RIGHT: anchor 2).
    inputs = _hand_inputs(**ROW, gt_boxes=[GT_LEFT, GT_RIGHT], pred_boxes=COMPETING_PREDS)
    pred_boxes = inputs.pred_boxes.clone()
    pred_boxes[0, 1] = float("nan")
    out = assigners.build("ota")(dataclasses.replace(inputs, pred_boxes=pred_boxes))
    assert out.gt_index.tolist() == [[0, NEGATIVE, 1, NEGATIVE]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gt_without_candidate_still_gets_its_cheapest_anchor(dtype):
    # A 2x2 GT between the locations: no location lies inside it, so it has no candidate and
    # every one of its costs carries the 1e6 penalty (fcos.py:311). OTA does not skip it:
    # the IoUs summed for its dynamic k are all masked to 0, so mu = max(1, 0) = 1, and the
    # penalty, the same on every anchor, does not change where its unit goes: to anchor 1,
    # whose prediction is the GT itself (IoU 1, regression cost 0; every other anchor has
    # IoU 0, cost 1.5 * -log(eps) = 23.8, so e^-238 of the share).
    inputs = _hand_inputs(**ROW, gt_boxes=[[13.0, 1.0, 15.0, 3.0]], pred_boxes={1: [13.0, 1.0, 15.0, 3.0]}, dtype=dtype)
    out = assigners.build("ota")(inputs)
    assert out.num_candidates.tolist() == [[0]]
    assert out.gt_index.tolist() == [[NEGATIVE, 0, NEGATIVE, NEGATIVE]]


def test_positives_of_one_gt_cross_a_pyramid_level():
    # Two levels on a 32 x 32 image: stride 8 (locations 4, 12, 20, 28; indices 0-15, row
    # major) and stride 16 (locations 8, 24; indices 16-19). GT [2, 2, 14, 14] has five
    # candidates: (4, 4), (12, 4), (4, 12), (12, 12) at stride 8 (indices 0, 1, 4, 5) and
    # (8, 8) at stride 16 (index 16). Anchors 0 and 16 predict the GT exactly (IoU 1),
    # anchors 1, 4, 5 a 3.6 x 3.6 box inside it (IoU 0.09). Dynamic k: int(1 + 1 + 3 x 0.09)
    # = 2, and the two units go to the two zero-cost anchors, one on each level.
    small = [2.0, 2.0, 5.6, 5.6]
    preds = {0: [2.0, 2.0, 14.0, 14.0], 16: [2.0, 2.0, 14.0, 14.0], 1: small, 4: small, 5: small}
    inputs = _hand_inputs(image_size=(32, 32), strides=(8, 16), gt_boxes=[[2.0, 2.0, 14.0, 14.0]], pred_boxes=preds)
    assert inputs.num_anchors_per_level == [16, 4]
    out = assigners.build("ota")(inputs)
    assert out.num_candidates.tolist() == [[5]]
    assert (out.gt_index[0] == 0).nonzero().flatten().tolist() == [0, 16]
    assert bool((out.gt_index[0, [i for i in range(20) if i not in (0, 16)]] == NEGATIVE).all())


def test_padded_slots_never_positive_and_change_nothing():
    # The competing pair in slots 1 and 3; slot 0 holds a copy of GT_LEFT, slot 2 a box
    # covering everything and slot 4 NaN, all padded: the result is the two-GT one, mapped
    # to slots 1 and 3, and padded slots have no candidates.
    inputs = _hand_inputs(
        **ROW,
        gt_boxes=[GT_LEFT, GT_LEFT, [-100.0, -100.0, 100.0, 100.0], GT_RIGHT, [float("nan")] * 4],
        gt_mask=[False, True, False, True, False],
        labels=[0, 0, 0, 0, 0],
        pred_boxes=COMPETING_PREDS,
    )
    out = assigners.build("ota")(inputs)
    assert out.gt_index.tolist() == [[1, 3, NEGATIVE, NEGATIVE]]
    assert out.num_candidates.tolist() == [[0, 2, 0, 2, 0]]


@pytest.mark.parametrize(
    ("gt_box", "params", "expected"),
    [
        # Centre (32, 4), half-side 2.5 x 8 = 20: locations strictly inside (12, 52), so
        # x = 20, 28, 36, 44 (12 lies on the border of the region and is out).
        ([0.0, 0.0, 64.0, 8.0], {}, [2, 3, 4, 5]),
        # Half-side 3 x 8 = 24: (8, 56), x = 12 ... 52.
        ([0.0, 0.0, 64.0, 8.0], {"center_radius": 3.0}, [1, 2, 3, 4, 5, 6]),
        # A region wider than the box is clipped to it, and a location must lie more than
        # 0.01 px inside the box: x = 4 is 0.005 px from the left side (out), then 0.015 (in).
        ([3.995, 0.0, 64.0, 8.0], {"center_radius": 10.0}, [1, 2, 3, 4, 5, 6, 7]),
        ([3.985, 0.0, 64.0, 8.0], {"center_radius": 10.0}, [0, 1, 2, 3, 4, 5, 6, 7]),
    ],
)
def test_centre_prior(monkeypatch, gt_box, params, expected):
    # Eight stride-8 locations x = 4, 12, ..., 60 at y = 4; the candidates are read from
    # the centre prior the assigner computes, and counted in num_candidates.
    seen = {}
    centre_prior_of = assigners.ota.centre_prior
    monkeypatch.setattr(assigners.ota, "centre_prior", lambda *a: seen.setdefault("prior", centre_prior_of(*a)))
    inputs = _hand_inputs(image_size=(8, 64), strides=(8,), gt_boxes=[gt_box], pred_boxes={})
    out = assigners.build("ota", **params)(inputs)
    assert seen["prior"][0, 0].nonzero().flatten().tolist() == expected
    assert out.num_candidates.tolist() == [[len(expected)]]


def test_exact_tie_of_rescaled_shares_goes_to_the_larger_raw_share(monkeypatch):
    # Five stride-8 locations x = 4 ... 36. GT A = [0, 0, 24, 8] has candidates 0, 1, 2 and
    # GT B = [16, 0, 40, 8] candidates 2, 3, 4. Predictions: anchors 0, 1 a sliver of A
    # (IoU 8 / 192 = 0.04), anchors 3, 4 a sliver of B (0.04), anchor 2 [12, 0, 36, 8]
    # (IoU 96 / 288 = 0.33 with A, 160 / 224 = 0.71 with B); mu = 1 for both. With
    # sinkhorn_eps = 1 the plans are spread out and both GTs send their largest share to
    # anchor 2, so after rescaling both read exactly 1 there. The tie goes to B, which sends
    # more of anchor 2 (0.60 against 0.36), in either slot order; A keeps anchors 0 and 1.
    a, b = [0.0, 0.0, 24.0, 8.0], [16.0, 0.0, 40.0, 8.0]
    sliver_a, sliver_b = [0.0, 0.0, 1.0, 8.0], [39.0, 0.0, 40.0, 8.0]
    preds = {0: sliver_a, 1: sliver_a, 2: [12.0, 0.0, 36.0, 8.0], 3: sliver_b, 4: sliver_b}
    plans = []
    plan_of = assigners.ota.sinkhorn_plan
    monkeypatch.setattr(assigners.ota, "sinkhorn_plan", lambda *args: plans.append(plan_of(*args)) or plans[-1])
    for order, expected in (([a, b], [[0, 0, 1, NEGATIVE, NEGATIVE]]), ([b, a], [[1, 1, 0, NEGATIVE, NEGATIVE]])):
        inputs = _hand_inputs(image_size=(8, 40), strides=(8,), gt_boxes=order, pred_boxes=preds)
        out = assigners.build("ota", sinkhorn_eps=1.0)(inputs)
        assert plans[-1][0, :2].argmax(dim=1).tolist() == [2, 2], "both GTs peak at anchor 2"
        assert out.gt_index.tolist() == expected
        assert torch.equal(ota_reference(inputs, sinkhorn_eps=1.0)[0], out.gt_index)


def test_identical_gts_tie_and_the_lower_slot_takes_the_anchors():
    # Two copies of GT_LEFT have identical cost rows, hence identical plans: together they
    # supply 2 units, which fill its two candidates (anchors 0 and 1), half from each copy.
    # Both anchors are exact ties between the copies (rescaled and raw share) and go to the
    # lower slot, so OTA may leave a (duplicate) GT without any positive.
    inputs = _hand_inputs(**ROW, gt_boxes=[GT_LEFT, GT_LEFT], pred_boxes=COMPETING_PREDS)
    out = assigners.build("ota")(inputs)
    assert out.gt_index.tolist() == [[0, 0, NEGATIVE, NEGATIVE]]


def test_more_supply_than_anchors_stays_valid():
    # Five real GTs with mu >= 1 each on four anchors: the background's supply 4 - 5 < 0 is
    # clamped to 0 (officially log of a negative number, NaN). Every anchor still gets one
    # label and only real GTs get positives.
    inputs = _hand_inputs(
        **ROW, gt_boxes=[GT_LEFT, GT_RIGHT, GT_LEFT, GT_RIGHT, [0.0, 0.0, 32.0, 8.0]], pred_boxes=COMPETING_PREDS
    )
    out = assigners.build("ota")(inputs)
    assert out.gt_index.shape == (1, 4)
    assert bool(((out.gt_index >= 0) & (out.gt_index < 5) | (out.gt_index == NEGATIVE)).all())
    assert bool((out.gt_index >= 0).any())


# ----------------------------------------------------------------------------------------
# Parameters and inputs.


def test_defaults_are_the_official_config():
    ota = assigners.build("ota")
    assert (ota.top_candidates, ota.reg_weight, ota.sinkhorn_eps, ota.sinkhorn_iters) == (20, 1.5, 0.1, 50)
    assert (ota.center_radius, ota.focal_alpha, ota.focal_gamma) == (2.5, 0.25, 2.0)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("top_candidates", 0, "top_candidates must be a positive int"),
        ("top_candidates", 2.0, "top_candidates must be a positive int"),
        ("top_candidates", True, "top_candidates must be a positive int"),
        ("sinkhorn_iters", -1, "sinkhorn_iters must be a positive int"),
        ("sinkhorn_iters", None, "sinkhorn_iters must be a positive int"),
        ("reg_weight", -0.5, r"reg_weight must be in \[0.0, inf\)"),
        ("reg_weight", float("nan"), "reg_weight must be a finite number"),
        ("reg_weight", "1.5", "reg_weight must be a finite number"),
        ("sinkhorn_eps", 0.0, r"sinkhorn_eps must be in \(0.0, inf\)"),
        ("sinkhorn_eps", float("inf"), "sinkhorn_eps must be a finite number"),
        ("center_radius", 0, r"center_radius must be in \(0.0, inf\)"),
        ("center_radius", False, "center_radius must be a finite number"),
        ("focal_alpha", 1.5, r"focal_alpha must be in \[0.0, 1.0\]"),
        ("focal_alpha", -0.1, r"focal_alpha must be in \[0.0, 1.0\]"),
        ("focal_gamma", -2.0, r"focal_gamma must be in \[0.0, inf\)"),
    ],
)
def test_rejects_bad_parameters(name, value, message):
    with pytest.raises(ValueError, match=message):
        assigners.build("ota", **{name: value})


def test_accepts_boundary_parameters(make_batch):
    inputs = make_batch(4)
    for params in (
        {"reg_weight": 0},
        {"focal_alpha": 0.0, "focal_gamma": 0},
        {"focal_alpha": 1},
        {"top_candidates": 10_000},
    ):
        out = assigners.build("ota", **params)(inputs)
        assert tuple(out.gt_index.shape) == (inputs.batch_size, inputs.anchors.shape[0])


def test_needs_strides(make_batch):
    with pytest.raises(ValueError, match="assigner 'ota' .*needs AssignInputs.strides"):
        assigners.build("ota")(dataclasses.replace(make_batch(5), strides=None))


@pytest.mark.parametrize("missing", [("cls_logits",), ("pred_boxes",), ("cls_logits", "pred_boxes")])
def test_needs_predictions(make_batch, missing):
    inputs = dataclasses.replace(make_batch(6), **dict.fromkeys(missing))
    with pytest.raises(ValueError, match=f"assigner 'ota' .*needs {' and '.join(missing)}; got None"):
        assigners.build("ota")(inputs)


def test_float32_inputs_work_in_float32(make_batch):
    # The same batch in float32 and float64 agrees on nearly every anchor (rounding may
    # flip near ties); both give valid assignments.
    inputs = make_batch(7, batch_size=3, max_gt=6)
    single = assigners.build("ota")(inputs).gt_index
    double = assigners.build("ota")(as_float64(inputs)).gt_index
    assert (single == double).double().mean() >= 0.99


@requires_cuda
def test_cuda_equals_cpu(make_batch):
    inputs = as_float64(make_batch(8, batch_size=4, max_gt=8))
    cuda_inputs = as_float64(make_batch(8, batch_size=4, max_gt=8, device="cuda"))
    ota = assigners.build("ota")
    assert torch.equal(ota(inputs).gt_index, ota(cuda_inputs).gt_index.cpu())
