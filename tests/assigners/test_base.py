"""The contract types: ``AssignInputs`` validation of ``strides`` and the ``Assignment`` defaults."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

import assigners
from assigners import Assignment

from .conftest import random_batch


def test_strides_are_optional_and_need_one_positive_entry_per_level():
    inputs = random_batch(0, predictions=False)  # five levels
    assert inputs.strides == [8, 16, 32, 64, 128]
    assert dataclasses.replace(inputs, strides=None).strides is None
    for bad in ([8, 16, 32, 64], [8, 16, 32, 64, 128, 256], [8, 16, 0, 64, 128]):
        with pytest.raises(ValueError, match="one positive stride per level"):
            dataclasses.replace(inputs, strides=bad)


def test_assignment_soft_target_defaults_to_none():
    out = Assignment(gt_index=torch.tensor([[0, -1, -2]]))
    assert out.soft_target is None and out.num_candidates is None


@pytest.mark.parametrize("name", ["max_iou", "atss", "paa", "fnp", "fsr"])
def test_hard_target_assigners_return_no_soft_target(name):
    assigner = assigners.build(name)
    inputs = random_batch(1, predictions=assigner.uses_predictions)
    assert assigner(inputs).soft_target is None



@pytest.mark.parametrize("name", ["tal", "simota", "ota", "dsl"])
@pytest.mark.parametrize("max_pairs", [1, 3 * 257, 10**9])
def test_assigning_in_groups_of_images_equals_one_call(make_batch, name, max_pairs, monkeypatch):
    # Images are independent, so groups of one image (max_pairs 1), of a few, or the whole batch give
    # the same assignment; the dense-cost assigners bound their memory this way.
    inputs = make_batch(3, batch_size=4, max_gt=6)
    whole = assigners.build(name)(inputs)
    module = importlib.import_module(type(assigners.build(name)).assign.__module__)  # where it reads the bound
    monkeypatch.setattr(module, "DENSE_MAX_PAIRS", max_pairs)
    grouped = assigners.build(name)(inputs)
    for field in ("gt_index", "num_candidates", "soft_target"):
        mine, theirs = getattr(grouped, field), getattr(whole, field)
        assert (mine is None and theirs is None) or torch.equal(mine, theirs), field


def test_anchor_strides_repeat_each_levels_stride(make_batch):
    inputs = dataclasses.replace(make_batch(0), anchors=torch.zeros(5, 4), num_anchors_per_level=[3, 2],
                                 strides=[8, 16], cls_logits=None, pred_boxes=None)
    assert assigners.base.anchor_strides(inputs, "x").tolist() == [8.0, 8.0, 8.0, 16.0, 16.0]
    with pytest.raises(ValueError, match="assigner 'x' .*needs AssignInputs.strides"):
        assigners.base.anchor_strides(dataclasses.replace(inputs, strides=None), "x")
