"""The contract types: ``AssignInputs`` validation of ``strides`` and the ``Assignment`` defaults."""

from __future__ import annotations

import dataclasses

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

