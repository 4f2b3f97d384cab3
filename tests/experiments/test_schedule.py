"""Optimiser and LR schedule: the maskrcnn-benchmark conventions ATSS/PAA train with."""

import pytest
import torch

from experiments.build import build_optimizer, lr_factor


def test_lr_factor_constant_warmup_then_steps():
    kw = dict(warmup_iters=100, warmup_factor=1 / 3, steps=[600, 800], gamma=0.1)
    assert lr_factor(0, **kw) == pytest.approx(1 / 3)
    assert lr_factor(99, **kw) == pytest.approx(1 / 3)
    assert lr_factor(100, **kw) == 1.0
    assert lr_factor(599, **kw) == 1.0
    assert lr_factor(600, **kw) == pytest.approx(0.1)
    assert lr_factor(800, **kw) == pytest.approx(0.01)


def test_bias_gets_double_lr_and_no_weight_decay():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4))
    opt = build_optimizer(model, lr=0.01, momentum=0.9, weight_decay=1e-4, bias_lr_factor=2.0)
    weights, biases = opt.param_groups
    assert weights["lr"] == 0.01 and weights["weight_decay"] == 1e-4
    assert biases["lr"] == 0.02 and biases["weight_decay"] == 0.0
    assert len(weights["params"]) == 2 and len(biases["params"]) == 2
    assert opt.defaults["momentum"] == 0.9
