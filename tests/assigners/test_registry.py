"""The assigner registry: every registered class is named by its key and says whether it uses predictions."""

from __future__ import annotations

import pytest
import torch

import assigners
from assigners import registry

from .conftest import random_batch


@pytest.mark.parametrize("name", assigners.available())
def test_every_registered_class_is_named_by_its_key(name):
    cls = assigners.assigner_class(name)
    assert issubclass(cls, assigners.Assigner)
    assert cls.name == name
    assert isinstance(cls.uses_predictions, bool)
    built = assigners.build(name)
    assert type(built) is cls and built.name == name


def test_build_passes_parameters_and_refuses_unknown_names():
    assert assigners.build("atss", topk=3).topk == 3
    with pytest.raises(ValueError, match="unknown assigner 'nope'; valid choices: atss, dsl, fnp, fsr, max_iou, ota, paa, simota, tal"):
        assigners.build("nope")
    with pytest.raises(ValueError, match="unknown assigner 'iou'"):  # renamed to max_iou
        assigners.build("iou")


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made in a test go to a copy of the registry, dropped after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_register_assigner_sets_name_and_uses_predictions(scratch_registry):
    @assigners.register_assigner("every_anchor_negative", uses_predictions=False)
    class EveryAnchorNegative(assigners.Assigner):
        def assign(self, inputs):
            b, a = inputs.batch_size, inputs.anchors.shape[0]
            grad_enabled.append(torch.is_grad_enabled())
            return assigners.Assignment(gt_index=torch.full((b, a), assigners.NEGATIVE))

    grad_enabled: list[bool] = []
    assert EveryAnchorNegative.name == "every_anchor_negative" and EveryAnchorNegative.uses_predictions is False
    assert "every_anchor_negative" in assigners.available()
    out = assigners.build("every_anchor_negative")(random_batch(0, predictions=False))
    assert bool((out.gt_index == assigners.NEGATIVE).all())
    assert grad_enabled == [False], "assign runs under torch.no_grad()"


def test_register_assigner_refuses_duplicates_and_non_bool_flags(scratch_registry):
    with pytest.raises(ValueError, match="'atss' is already registered"):
        assigners.register_assigner("atss", uses_predictions=False)(type("Other", (assigners.Assigner,), {}))
    with pytest.raises(TypeError, match="must be a bool"):
        assigners.register_assigner("new", uses_predictions=1)(type("New", (assigners.Assigner,), {}))
    with pytest.raises(TypeError, match="Assigner subclass"):
        assigners.register_assigner("plain", uses_predictions=False)(type("Plain", (), {}))
    assert not {"new", "plain"} & set(assigners.available())
