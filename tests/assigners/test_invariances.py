"""Properties every registered assigner must have: permutation, padding and batch invariance,
purity, determinism, robustness to degenerate boxes and non-finite predictions, CPU/CUDA agreement.

The assigners come from the registry (``assigners.available()``), each built with its defaults
and given predictions when it ``uses_predictions``, so a newly registered assigner is covered
by adding it; ``VARIANTS`` adds parameter settings that take code paths the defaults do not.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import assigners
from assigners import IGNORED, NEGATIVE, AssignInputs

from .conftest import requires_cuda

REGISTERED = assigners.available()
STATIC = [name for name in REGISTERED if not assigners.assigner_class(name).uses_predictions]
PREDICTION_AWARE = [name for name in REGISTERED if assigners.assigner_class(name).uses_predictions]
VARIANTS = [
    ("paa", {"scheme": "a"}),
    ("paa", {"scheme": "b"}),
    ("paa", {"scheme": "d"}),
    ("paa", {"gmm_backend": "sklearn"}),
]
CONFIGS = [(name, {}) for name in REGISTERED] + VARIANTS
IDS = [name + "".join(f"-{v}" for v in kwargs.values()) for name, kwargs in CONFIGS]
# Assigners that may rightly leave a GT without positives (a fixed score threshold).
MAY_LEAVE_GT_WITHOUT_POSITIVE = {"fsr"}


def _batch(make_batch, assigner, seed: int, **kwargs) -> AssignInputs:
    """``make_batch(seed, ...)`` with predictions exactly when the assigner uses them."""
    return make_batch(seed, predictions=assigner.uses_predictions, **kwargs)


def _images(tensor, index: slice):
    return None if tensor is None else tensor[index]


def _replace(inputs: AssignInputs, **changes) -> AssignInputs:
    return dataclasses.replace(inputs, **changes)


def _assert_valid(out, inputs: AssignInputs) -> None:
    b, g, a = inputs.batch_size, inputs.num_gt_slots, inputs.anchors.shape[0]
    assert out.gt_index.dtype == torch.int64 and tuple(out.gt_index.shape) == (b, a)
    index = out.gt_index
    assert bool(((index == NEGATIVE) | (index == IGNORED) | ((index >= 0) & (index < g))).all())
    positive = index >= 0
    images = torch.arange(b, device=index.device).unsqueeze(1).expand(b, a)
    assert bool(inputs.gt_mask[images[positive], index[positive]].all()), "positive for a padded GT slot"
    if out.num_candidates is not None:
        assert tuple(out.num_candidates.shape) == (b, g)
        assert bool((out.num_candidates[~inputs.gt_mask] == 0).all())
        assert bool((out.num_candidates >= 0).all())
    if out.soft_target is not None:
        assert out.soft_target.is_floating_point() and tuple(out.soft_target.shape) == (b, a)
        target = out.soft_target[positive]
        assert bool(((target >= 0) & (target <= 1)).all())


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=IDS)
def test_permuting_gt_slots_permutes_result(make_batch, device, name, kwargs):
    assigner = assigners.build(name, **kwargs)
    inputs = _batch(make_batch, assigner, 11, batch_size=3, max_gt=6, device=device)
    perm = torch.tensor([4, 2, 0, 5, 1, 3], device=device)  # new slot j holds old slot perm[j]
    inverse = torch.argsort(perm)
    permuted = _replace(
        inputs, gt_boxes=inputs.gt_boxes[:, perm], gt_labels=inputs.gt_labels[:, perm], gt_mask=inputs.gt_mask[:, perm]
    )
    before, after = assigner(inputs), assigner(permuted)
    expected = torch.where(before.gt_index >= 0, inverse[before.gt_index.clamp(min=0)], before.gt_index)
    assert torch.equal(after.gt_index, expected)
    if before.num_candidates is not None:
        assert torch.equal(after.num_candidates, before.num_candidates[:, perm])


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=IDS)
def test_padded_slots_change_nothing(make_batch, device, name, kwargs):
    assigner = assigners.build(name, **kwargs)
    inputs = _batch(make_batch, assigner, 12, batch_size=3, max_gt=5, device=device)
    b = inputs.batch_size
    garbage = torch.tensor(
        [[float("nan"), 0.0, 1e9, 5.0], [-1e9, -1e9, 1e9, 1e9], [50.0, 50.0, 10.0, 10.0]], device=device
    ).expand(b, 3, 4)
    padded = _replace(
        inputs,
        gt_boxes=torch.cat([inputs.gt_boxes, garbage], dim=1),
        gt_labels=torch.cat([inputs.gt_labels, torch.full((b, 3), 1, device=device)], dim=1),
        gt_mask=torch.cat([inputs.gt_mask, torch.zeros(b, 3, dtype=torch.bool, device=device)], dim=1),
    )
    before, after = assigner(inputs), assigner(padded)
    assert torch.equal(after.gt_index, before.gt_index)
    if before.num_candidates is not None:
        assert torch.equal(after.num_candidates[:, :5], before.num_candidates)
        assert bool((after.num_candidates[:, 5:] == 0).all())


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=IDS)
def test_image_result_does_not_depend_on_batch(make_batch, name, kwargs):
    assigner = assigners.build(name, **kwargs)
    inputs = _batch(make_batch, assigner, 13, batch_size=4, max_gt=6)
    together = assigner(inputs)
    for i in range(inputs.batch_size):
        image = slice(i, i + 1)
        alone = assigner(
            _replace(
                inputs,
                gt_boxes=inputs.gt_boxes[image],
                gt_labels=inputs.gt_labels[image],
                gt_mask=inputs.gt_mask[image],
                cls_logits=_images(inputs.cls_logits, image),
                pred_boxes=_images(inputs.pred_boxes, image),
            )
        )
        assert torch.equal(alone.gt_index[0], together.gt_index[i])


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=IDS)
def test_pure_and_deterministic(make_batch, name, kwargs):
    assigner = assigners.build(name, **kwargs)
    inputs = _batch(make_batch, assigner, 14, batch_size=3, max_gt=6)
    snapshot = {f.name: getattr(inputs, f.name) for f in dataclasses.fields(inputs)}
    snapshot = {k: v.clone() if isinstance(v, torch.Tensor) else list(v) for k, v in snapshot.items() if v is not None}
    first, second = assigner(inputs), assigner(inputs)
    assert _same_assignment(first, second)
    for key, value in snapshot.items():
        current = getattr(inputs, key)
        assert torch.equal(current, value) if isinstance(value, torch.Tensor) else current == value, key


def _hostile_batch(make_batch, device, predictions: bool = True):
    """Real GTs: a 1-px box, a box much larger than the image, a box outside the image;
    predictions (None unless ``predictions``) with NaN/Inf logits and boxes on a fifth of the anchors."""
    inputs = make_batch(15, batch_size=2, max_gt=4, empty_image=False, device=device)
    gt_boxes = inputs.gt_boxes.clone()
    gt_boxes[0, 0] = torch.tensor([40.0, 40.0, 41.0, 41.0])
    gt_boxes[0, 1] = torch.tensor([-300.0, -200.0, 900.0, 700.0])
    gt_boxes[0, 2] = torch.tensor([500.0, 500.0, 530.0, 520.0])
    gt_mask = inputs.gt_mask.clone()
    gt_mask[0, :3] = True
    gen = torch.Generator().manual_seed(0)
    a = inputs.anchors.shape[0]
    logits, boxes = inputs.cls_logits.clone(), inputs.pred_boxes.clone()
    for value, target in [(float("nan"), logits), (float("inf"), logits), (float("-inf"), logits)]:
        hit = (torch.rand(2, a, generator=gen) < 0.07).to(device)
        target[hit] = value
    for value in (float("nan"), float("inf"), -1e30):
        hit = (torch.rand(2, a, generator=gen) < 0.07).to(device)
        boxes[hit] = value
    if not predictions:
        logits = boxes = None
    return _replace(inputs, gt_boxes=gt_boxes, gt_mask=gt_mask, cls_logits=logits, pred_boxes=boxes)


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=IDS)
def test_degenerate_boxes_and_non_finite_predictions(make_batch, device, name, kwargs):
    assigner = assigners.build(name, **kwargs)
    inputs = _hostile_batch(make_batch, device, assigner.uses_predictions)
    out = assigner(inputs)
    _assert_valid(out, inputs)
    # The GT much larger than the image always has anchors to overlap.
    if name not in MAY_LEAVE_GT_WITHOUT_POSITIVE:
        assert bool((out.gt_index[0] == 1).any())


@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=IDS)
def test_no_gt_at_all(make_batch, device, name, kwargs):
    assigner = assigners.build(name, **kwargs)
    inputs = _batch(make_batch, assigner, 16, batch_size=2, max_gt=3, device=device)
    all_padded = _replace(inputs, gt_mask=torch.zeros_like(inputs.gt_mask))
    no_slots = _replace(
        inputs, gt_boxes=inputs.gt_boxes[:, :0], gt_labels=inputs.gt_labels[:, :0], gt_mask=inputs.gt_mask[:, :0]
    )
    for case in (all_padded, no_slots):
        out = assigner(case)
        _assert_valid(out, case)
        assert bool((out.gt_index == NEGATIVE).all())


def _same_assignment(first, second) -> bool:
    """Every field of two ``Assignment``s equal: both None, or equal tensors."""
    for field in dataclasses.fields(first):
        a, b = getattr(first, field.name), getattr(second, field.name)
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
            return False
    return True


@pytest.mark.parametrize("name", STATIC)
def test_static_assigners_give_the_same_result_with_and_without_predictions(make_batch, name):
    assigner = assigners.build(name)
    for inputs in (make_batch(17), _hostile_batch(make_batch, "cpu")):
        without = _replace(inputs, cls_logits=None, pred_boxes=None)
        assert _same_assignment(assigner(inputs), assigner(without))


@pytest.mark.parametrize("missing", [("pred_boxes",), ("cls_logits",), ("cls_logits", "pred_boxes")])
@pytest.mark.parametrize("name", PREDICTION_AWARE)
def test_prediction_aware_assigners_need_predictions(make_batch, name, missing):
    inputs = _replace(make_batch(18), **dict.fromkeys(missing))
    with pytest.raises(ValueError, match=f"assigner '{name}' .*needs {' and '.join(missing)}; got None"):
        assigners.build(name)(inputs)


def test_registry_lists_every_assigner():
    assert {"max_iou", "atss", "paa", "fnp", "fsr"} <= set(REGISTERED)
    assert {"max_iou", "atss"} <= set(STATIC) and {"paa", "fnp", "fsr"} <= set(PREDICTION_AWARE)


@requires_cuda
@pytest.mark.parametrize(("name", "kwargs"), CONFIGS, ids=IDS)
def test_cuda_equals_cpu(make_batch, name, kwargs):
    assigner = assigners.build(name, **kwargs)
    differing_images = total = 0
    for seed in range(3):
        cpu = assigner(_batch(make_batch, assigner, seed, batch_size=4, max_gt=8))
        cuda = assigner(_batch(make_batch, assigner, seed, batch_size=4, max_gt=8, device="cuda"))
        assert cuda.gt_index.device.type == "cuda"
        differing_images += int((cpu.gt_index != cuda.gt_index.cpu()).any(dim=1).sum())
        total += 4
    # IoU-only assigners are exact; loss-based ones may differ by float rounding of the
    # losses on rare near-ties, at most one image in twelve.
    assert differing_images == 0 if name in STATIC else differing_images <= 1


@requires_cuda
def test_hostile_batch_on_cuda_matches_cpu(make_batch):
    for name, kwargs in CONFIGS:
        assigner = assigners.build(name, **kwargs)
        cpu = assigner(_hostile_batch(make_batch, "cpu", assigner.uses_predictions)).gt_index
        cuda = assigner(_hostile_batch(make_batch, "cuda", assigner.uses_predictions)).gt_index.cpu()
        assert (cpu == cuda).float().mean() >= 0.99, name
