"""Numerical edge cases through ``DetectionLoss``, for every assigner and every scorer.

Defined behaviour:

* Degenerate but finite input (a GT with one candidate, a GT with none, candidates whose losses
  are all equal so the PAA mixture sees zero variance, 1-px boxes, boxes larger than the image,
  an image without boxes) never raises, and gives finite losses, finite gradients and finite
  statistics (the float entries of ``info``, i.e. the ``stats.csv`` columns).
* NaN or Inf in the predictions (class logits, box deltas, quality logits) never makes an
  assigner raise, every anchor still gets a valid label and the statistics stay finite. The
  *loss* may be non-finite then: that is the honest value, and the engine's non-finite check
  stops the run (``status: failed``, see ``test_non_finite_loss.py``). No finite loss is ever
  made from NaN input by hiding it.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import assigners
from detector import BoxCoder, DetectionLoss, DetectorOutput, build_scorer, make_anchors

ASSIGNERS = ["max_iou", "atss", "paa", "fnp", "fsr"]
SCORERS = ["none", "centerness", "iou"]
NUM_CLASSES = 3
STAT_KEYS = ["num_gt", "num_pos", "pos_per_gt_mean", "pos_per_gt_std", "pos_iou_mean", "gt_without_pos"]


@dataclasses.dataclass
class Scene:
    """Anchors of one pyramid, the batch's targets, and optional predictions (default: all zero)."""

    anchors: torch.Tensor  # (A, 4) xyxy
    num_anchors_per_level: list[int]
    targets: list[dict[str, torch.Tensor]]
    box_deltas: torch.Tensor | None = None  # (B, A, 4)


def target(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.int64),
    }


def pyramid() -> tuple[torch.Tensor, list[int]]:
    """A 64x64 image, strides 8, 16, 32 and anchors 4 strides wide: 64 + 16 + 4 anchors."""
    return make_anchors([(8, 8), (4, 4), (2, 2)], [8, 16, 32], anchor_scale=4.0)


def two_by_two() -> tuple[torch.Tensor, list[int]]:
    """One level of four 32-px anchors tiling a 64x64 image."""
    return make_anchors([(2, 2)], [32], anchor_scale=1.0)


def scene_one_candidate() -> Scene:
    # A single anchor: every assigner has exactly one candidate (ATSS: a std of one value; PAA: no GMM).
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    return Scene(anchors, [1], [target([[4.0, 4.0, 28.0, 28.0]], [1])])


def scene_identical_losses() -> Scene:
    # The GT is centred on the four anchors' common corner: by symmetry every anchor has the same IoU
    # (400 / 2224) with it, and with all-zero predictions the same anchor loss, exactly (integer
    # coordinates); the PAA/FNP/FSR candidates' losses have zero variance, as do ATSS's IoUs.
    anchors, counts = two_by_two()
    return Scene(anchors, counts, [target([[12.0, 12.0, 52.0, 52.0]], [2])])


def scene_predictions_equal_the_gt() -> Scene:
    # Every predicted box is the GT itself: GIoU loss 0 and one focal value for every anchor.
    anchors, counts = pyramid()
    gt = torch.tensor([[10.0, 14.0, 50.0, 46.0]])
    deltas = BoxCoder().encode(gt.expand(anchors.shape[0], 4), anchors).unsqueeze(0)
    return Scene(anchors, counts, [target(gt.tolist(), [0])], box_deltas=deltas)


def scene_gt_without_candidates() -> Scene:
    # The second GT duplicates the first: every anchor pre-matches / resolves to the lower index, so
    # GT 1 has no candidate at all; the second image has no GT whatsoever.
    anchors, counts = two_by_two()
    box = [12.0, 12.0, 52.0, 52.0]
    return Scene(anchors, counts, [target([box, box], [0, 1]), target([], [])])


def scene_tiny_boxes() -> Scene:
    anchors, counts = pyramid()
    return Scene(anchors, counts, [target([[20.0, 20.0, 21.0, 21.0], [0.0, 63.0, 1.0, 64.0]], [0, 2])])


def scene_huge_boxes() -> Scene:
    anchors, counts = pyramid()
    return Scene(anchors, counts, [target([[-100.0, -80.0, 300.0, 250.0], [0.0, 0.0, 64.0, 64.0]], [1, 0])])


def scene_image_without_boxes() -> Scene:
    anchors, counts = pyramid()
    return Scene(anchors, counts, [target([], []), target([[8.0, 8.0, 40.0, 30.0]], [1])])


FINITE_SCENES = {
    "one_candidate": scene_one_candidate,
    "identical_candidate_losses": scene_identical_losses,
    "predictions_equal_the_gt": scene_predictions_equal_the_gt,
    "gt_without_candidates": scene_gt_without_candidates,
    "tiny_1px_boxes": scene_tiny_boxes,
    "boxes_larger_than_the_image": scene_huge_boxes,
    "image_without_boxes": scene_image_without_boxes,
}


def build_assigner(name: str):
    """The assigner with its default parameters (those of ``experiments/conf/assigner``)."""
    return assigners.build(name)


def detector_output(scene: Scene, scorer_name: str) -> DetectorOutput:
    """All-zero predictions (p = 1/2, boxes = anchors) unless the scene sets the deltas; leaves need grad."""
    batch, num_anchors = len(scene.targets), scene.anchors.shape[0]
    deltas = scene.box_deltas if scene.box_deltas is not None else torch.zeros(batch, num_anchors, 4)
    quality = torch.zeros(batch, num_anchors) if scorer_name != "none" else None
    return DetectorOutput(
        cls_logits=torch.zeros(batch, num_anchors, NUM_CLASSES).requires_grad_(),
        box_deltas=deltas.clone().requires_grad_(),
        quality=quality.requires_grad_() if quality is not None else None,
        anchors=scene.anchors,
        num_anchors_per_level=scene.num_anchors_per_level,
        strides=[8] * len(scene.num_anchors_per_level),
    )


def assert_valid_assignment_and_finite_stats(info: dict, targets: list[dict]) -> None:
    gt_index = info["assignment"].gt_index
    num_slots = max(t["boxes"].shape[0] for t in targets)
    assert bool(((gt_index >= assigners.IGNORED) & (gt_index < max(num_slots, 1))).all())
    for image, t in enumerate(targets):  # an anchor is positive only for a real GT of its own image
        assert bool((gt_index[image] < t["boxes"].shape[0]).all())
    stats = assigners.assignment_stats(info["inputs"], info["assignment"])
    stats["assign_ms"] = info["assign_ms"].ms
    for key in [*STAT_KEYS, "assign_ms"]:
        assert math.isfinite(float(stats[key])), (key, stats[key])
    assert stats["num_gt"] == sum(t["boxes"].shape[0] for t in targets)


@pytest.mark.parametrize("scorer_name", SCORERS)
@pytest.mark.parametrize("assigner_name", ASSIGNERS)
@pytest.mark.parametrize("scene_name", list(FINITE_SCENES))
def test_degenerate_finite_input_gives_finite_losses_gradients_and_stats(scene_name, assigner_name, scorer_name):
    scene = FINITE_SCENES[scene_name]()
    out = detector_output(scene, scorer_name)
    criterion = DetectionLoss(build_assigner(assigner_name), build_scorer(scorer_name), NUM_CLASSES)
    losses, info = criterion(out, scene.targets)
    assert_valid_assignment_and_finite_stats(info, scene.targets)
    assert all(math.isfinite(v.item()) for v in losses.values()), {k: v.item() for k, v in losses.items()}
    sum(losses.values()).backward()
    for leaf in (out.cls_logits, out.box_deltas, out.quality):
        if leaf is not None and leaf.grad is not None:
            assert bool(torch.isfinite(leaf.grad).all())


def test_the_scenes_are_the_edge_cases_they_claim():
    """Check by hand that the scenes above reach the situations they are named after."""
    # Duplicated GT: PAA's candidates all belong to GT 0, GT 1 has none; the empty image has none.
    scene = scene_gt_without_candidates()
    _, info = DetectionLoss(assigners.build("paa"), build_scorer("iou"), NUM_CLASSES)(
        detector_output(scene, "iou"), scene.targets
    )
    assert info["assignment"].num_candidates.tolist() == [[4, 0], [0, 0]]
    assert assigners.assignment_stats(info["inputs"], info["assignment"])["gt_without_pos"] == 1
    # Symmetric GT: one candidate loss repeated four times.
    scene = scene_identical_losses()
    inputs = assigners.AssignInputs(
        anchors=scene.anchors, num_anchors_per_level=scene.num_anchors_per_level,
        gt_boxes=scene.targets[0]["boxes"][None], gt_labels=scene.targets[0]["labels"][None],
        gt_mask=torch.ones(1, 1, dtype=torch.bool), cls_logits=torch.zeros(1, 4, NUM_CLASSES),
        pred_boxes=scene.anchors[None].clone(),
    )
    loss = assigners.anchor_loss(inputs).loss
    assert bool(torch.isfinite(loss).all()) and torch.unique(loss).numel() == 1
    # One anchor: one candidate.
    scene = scene_one_candidate()
    _, info = DetectionLoss(assigners.build("fsr"), build_scorer("none"), NUM_CLASSES)(
        detector_output(scene, "none"), scene.targets
    )
    assert info["assignment"].num_candidates.tolist() == [[1]]


NON_FINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}
# (scorer, corrupted prediction): every head output the scorer's model has.
CORRUPTIONS = [
    (scorer, field)
    for scorer in SCORERS
    for field in ("cls_logits", "box_deltas", "quality")
    if not (field == "quality" and scorer == "none")  # the none scorer's model has no quality branch
]


def corrupt(out: DetectorOutput, field: str, value: float, everywhere: bool) -> DetectorOutput:
    """``out`` with ``value`` in ``field`` at every other anchor (or every anchor) of every image."""
    tensor = getattr(out, field).detach().clone()
    if everywhere:
        tensor[:] = value
    else:
        tensor[:, ::2] = value
    return dataclasses.replace(out, **{field: tensor.requires_grad_()})


@pytest.mark.parametrize("everywhere", [False, True], ids=["half_the_anchors", "every_anchor"])
@pytest.mark.parametrize("value_name", list(NON_FINITE))
@pytest.mark.parametrize(("scorer_name", "field"), CORRUPTIONS)
@pytest.mark.parametrize("assigner_name", ASSIGNERS)
def test_non_finite_predictions_never_crash_and_keep_stats_finite(
    assigner_name, scorer_name, field, value_name, everywhere
):
    anchors, counts = pyramid()
    targets = [target([[10.0, 10.0, 40.0, 50.0], [30.0, 2.0, 62.0, 20.0]], [1, 2]), target([], [])]
    out = detector_output(Scene(anchors, counts, targets), scorer_name)
    out = corrupt(out, field, NON_FINITE[value_name], everywhere)
    criterion = DetectionLoss(build_assigner(assigner_name), build_scorer(scorer_name), NUM_CLASSES)
    losses, info = criterion(out, targets)
    assert_valid_assignment_and_finite_stats(info, targets)
    # The loss is whatever it is (the engine catches a non-finite one); it is a scalar per term.
    assert set(losses) == {"loss_cls", "loss_box", "loss_quality"}
    assert all(v.dim() == 0 for v in losses.values())


@pytest.mark.parametrize("assigner_name", ["paa", "fnp", "fsr"])
def test_prediction_aware_assigners_never_pick_an_anchor_with_non_finite_predictions(assigner_name):
    # Their anchor score treats a NaN/Inf prediction as the worst possible loss (never a candidate),
    # so NaN boxes on half the anchors leave the positives, and hence the box loss, finite.
    anchors, counts = pyramid()
    targets = [target([[10.0, 10.0, 40.0, 50.0]], [1])]
    out = corrupt(detector_output(Scene(anchors, counts, targets), "iou"), "box_deltas", float("nan"), False)
    losses, info = DetectionLoss(build_assigner(assigner_name), build_scorer("iou"), NUM_CLASSES)(out, targets)
    positive = info["assignment"].gt_index[0] >= 0
    assert bool(positive.any())
    assert not bool(positive[::2].any())  # the corrupted anchors
    assert all(math.isfinite(v.item()) for v in losses.values())
