"""DCNv2 layers (detector.dcn): a deformable conv with known offsets and mask against the plain conv."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from detector import Detector
from detector.backbone import ResNetBackbone
from detector.dcn import ModulatedDeformConv
from detector.head import DenseHead


def _conv(stride=1, dilation=1, bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(5, 7, 3, stride=stride, padding=dilation, dilation=dilation, bias=bias)


def _set_offsets_and_mask(layer: ModulatedDeformConv, dx: float, dy: float, mask: float) -> None:
    """Constant predictions: every tap offset by (dy, dx) pixels and weighted ``mask``."""
    with torch.no_grad():
        layer.offset_mask.weight.zero_()
        bias = layer.offset_mask.bias
        bias[0 : 2 * layer.taps : 2] = dy  # torchvision's layout: (y, x) per tap
        bias[1 : 2 * layer.taps : 2] = dx
        bias[2 * layer.taps :] = math.log(mask / (1 - mask)) if mask < 1 else 60.0  # sigmoid(60) == 1 in float32


@pytest.mark.parametrize(("stride", "dilation"), [(1, 1), (2, 1), (1, 2)])
def test_new_layer_is_half_the_plain_conv(stride, dilation):
    # Zero-initialised offsets sample the regular grid, and every tap weighs sigmoid(0) = 1/2.
    conv = _conv(stride, dilation)
    layer = ModulatedDeformConv.from_conv(conv)
    x = torch.randn(2, 5, 11, 13)
    offset, mask = layer.offsets_and_mask(x)
    assert bool((offset == 0).all()) and bool((mask == 0.5).all())
    torch.testing.assert_close(layer(x), 0.5 * conv(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask", [0.25, 0.9, 1.0])
def test_constant_mask_scales_the_plain_conv_and_not_its_bias(mask):
    conv = _conv(bias=True)
    layer = ModulatedDeformConv.from_conv(conv)
    _set_offsets_and_mask(layer, 0.0, 0.0, mask)
    x = torch.randn(1, 5, 9, 9)
    expected = mask * (conv(x) - conv.bias.view(1, -1, 1, 1)) + conv.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_integer_offset_equals_the_conv_of_the_shifted_image():
    # Every tap moved one pixel right reads x[j + t + 1]: the plain conv of the image shifted left by
    # one column, with a zero column entering on the right. At the left edge the shifted image's zero
    # padding differs (the deformable conv reads x[0] there), so column 0 is left out.
    conv = _conv()
    layer = ModulatedDeformConv.from_conv(conv)
    _set_offsets_and_mask(layer, dx=1.0, dy=0.0, mask=1.0)
    x = torch.randn(1, 5, 8, 10)
    shifted = F.pad(x[..., 1:], (0, 1))
    torch.testing.assert_close(layer(x)[..., 1:], conv(shifted)[..., 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "stages"), [("resnet18", (3, 4, 5)), ("resnet50", (4, 5))])
def test_backbone_deforms_the_3x3_conv_of_every_block_of_the_chosen_stages(name, stages):
    backbone = ResNetBackbone(name, norm="bn", frozen_stages=0, dcn_stages=stages)
    for level in (2, 3, 4, 5):
        for block in getattr(backbone, f"layer{level - 1}"):
            assert isinstance(block.conv2, ModulatedDeformConv) == (level in stages), (level, block)
    features = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in features.values()] == [(8, 8), (4, 4), (2, 2)]
    with pytest.raises(ValueError, match="dcn_stages"):
        ResNetBackbone(name, norm="bn", dcn_stages=(6,))


def test_head_deforms_only_the_last_conv_of_each_tower():
    head = DenseHead(32, 3, num_levels=2, num_convs=3, dcn_tower=True)
    for tower in (head.cls_tower, head.box_tower):
        kinds = [type(m).__name__ for m in tower if isinstance(m, nn.Conv2d | ModulatedDeformConv)]
        assert kinds == ["Conv2d", "Conv2d", "ModulatedDeformConv"]
        # it keeps the plain tower's initialisation (normal, std 0.01; bias 0)
        assert float(tower[-3].conv.weight.detach().std()) == pytest.approx(0.01, rel=0.1)
    cls, box, quality = head([torch.randn(2, 32, 8, 8), torch.randn(2, 32, 4, 4)])
    assert cls.shape == (2, 80, 3) and box.shape == (2, 80, 4) and quality.shape == (2, 80)


def test_dcn_detector_backpropagates_into_the_offsets():
    model = Detector(num_classes=3, backbone="resnet18", norm="bn", frozen_stages=0, fpn_channels=16,
                     num_convs=1, levels=(3, 4, 5, 6, 7), dcn_stages=(3, 4, 5), dcn_tower=True)
    out = model(torch.rand(2, 3, 128, 128))
    (out.cls_logits.sum() + out.box_deltas.sum()).backward()
    offset_convs = [m.offset_mask for m in model.modules() if isinstance(m, ModulatedDeformConv)]
    assert len(offset_convs) == 2 + 2 + 2 + 2  # 2 blocks each in C3-C5, one per tower
    assert all(conv.weight.grad is not None and bool(conv.weight.grad.abs().sum() > 0) for conv in offset_convs)
