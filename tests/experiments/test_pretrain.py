"""The digits-pretrained backbone: train-split crops only, cached with its record, loaded by the backbone."""

import json

import pytest
import torch

import experiments.pretrain as pretrain
from detector.backbone import ResNetBackbone
from experiments.data import build_digits

TINY = {"image_size": 96, "num_train": 12, "num_val": 4}
TINY_RECIPE = {**pretrain.RECIPE, "crop_size": 32, "epochs": 1, "batch_size": 8}


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return build_digits(tmp_path_factory.mktemp("data"), **TINY)


def test_crops_are_the_train_boxes_only(digits_dir):
    crops, labels, ranks = pretrain.train_crops(digits_dir, 32, 0.15)
    train = json.loads((digits_dir / "annotations" / "instances_train.json").read_text())
    boxes = [a for a in train["annotations"] if not a.get("iscrowd", 0)]
    assert crops.shape == (len(boxes), 3, 32, 32) and crops.dtype == torch.uint8
    assert labels.min() >= 0 and labels.max() < 10 and int(ranks.max()) < len(train["images"])


def test_backbone_is_built_once_cached_and_leaves_the_callers_rng_alone(digits_dir, monkeypatch):
    torch.manual_seed(123)
    expected_next = torch.rand(3, generator=torch.Generator().manual_seed(0))  # an unrelated stream
    state_before = torch.random.get_rng_state()
    path = pretrain.digits_backbone(digits_dir, TINY_RECIPE)
    assert torch.equal(torch.random.get_rng_state(), state_before)
    record = json.loads(path.with_suffix(".json").read_text())
    assert record["recipe"] == TINY_RECIPE and 0.0 <= record["holdout_accuracy"] <= 1.0
    assert record["train_crops"] > 0 and record["holdout_crops"] > 0 and record["build_seconds"] > 0
    monkeypatch.setattr(pretrain, "train_classifier", lambda *a, **k: pytest.fail("rebuilt a cached backbone"))
    assert pretrain.digits_backbone(digits_dir, TINY_RECIPE) == path
    assert torch.rand(3, generator=torch.Generator().manual_seed(0)).equal(expected_next)


def test_the_backbone_loads_the_file_and_rejects_a_foreign_one(digits_dir, tmp_path):
    path = pretrain.digits_backbone(digits_dir, TINY_RECIPE)
    state = torch.load(path, weights_only=True)
    backbone = ResNetBackbone("resnet18", weights=str(path), norm="bn", frozen_stages=0)
    assert torch.equal(backbone.stem[0].weight, state["conv1.weight"])
    assert torch.equal(backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    with pytest.raises(ValueError, match="not a state dict of this backbone"):
        ResNetBackbone("resnet50", weights=str(path), norm="bn", frozen_stages=0)
    with pytest.raises(ValueError, match="cannot load"):
        ResNetBackbone("resnet18", weights=str(path), norm="gn", frozen_stages=0)


@pytest.mark.slow
def test_a_run_with_model_weights_digits_starts_from_the_cached_backbone(tmp_path):
    from experiments.engine import build_run

    from .test_engine import tiny_cfg

    cfg, _ = tiny_cfg(tmp_path, "model.weights=digits", "schedule.iters=1")
    run = build_run(cfg, tmp_path / "run")
    (path,) = sorted((tmp_path / "data").glob("*/pretrained/resnet18-*.pt"))
    state = torch.load(path, weights_only=True)
    assert torch.equal(run.model.backbone.stem[0].weight.cpu(), state["conv1.weight"])
    assert json.loads(path.with_suffix(".json").read_text())["recipe"]["arch"] == "resnet18"
