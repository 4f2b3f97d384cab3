"""Modulated deformable convolution (DCNv2, Zhu et al., CVPR 2019) for the backbone and the head towers.

The PAA/ATSS models marked DCN replace the 3x3 conv of every residual block of the chosen ResNet
stages (C3-C5 for ResNet, C4-C5 for ResNeXt in the official configs) and the last conv of each
head tower by a modulated deformable conv. Here it is ``torchvision.ops.DeformConv2d`` fed by a
plain conv that predicts, per output location, 2 offsets and 1 modulation logit per kernel tap
(``3 * k * k`` channels: the offsets first, then the mask logits, passed through a sigmoid).

Initialisation: the offset/mask conv starts at zero, as DCNv2 (and mmcv's
``ModulatedDeformConv2dPack``) do, so a new layer samples the regular grid with every tap weighted
sigmoid(0) = 1/2, i.e. it computes half the plain convolution it replaces. The official PAA code
(maskrcnn-benchmark's ``DFConv2d``) initialises that conv with ``kaiming_uniform_(a=1)`` instead;
the zero start is kept here so that a DCN model starts from its plain twin's function (up to the
factor 1/2), which is what a side-by-side "dcn" variant should compare.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import DeformConv2d


class ModulatedDeformConv(nn.Module):
    """DCNv2 ``k x k`` conv: ``conv(x, offset, sigmoid(mask_logit))`` with offsets and mask predicted from x.

    Same arguments and output shape as the ``nn.Conv2d`` it replaces (one offset group).
    ``forward(x (B, C_in, H, W)) -> (B, C_out, H', W')``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True):
        super().__init__()
        taps = kernel_size * kernel_size
        self.taps = taps
        self.offset_mask = nn.Conv2d(in_channels, 3 * taps, kernel_size, stride, padding, dilation, bias=True)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        self.conv = DeformConv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ModulatedDeformConv:
        """A DCNv2 layer with ``conv``'s geometry and a copy of its weights (and bias)."""
        if conv.kernel_size[0] != conv.kernel_size[1] or isinstance(conv.padding, str):
            raise ValueError(f"only square kernels with numeric padding are supported, got {conv}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                    conv.dilation[0], conv.groups, conv.bias is not None)
        with torch.no_grad():
            layer.conv.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.conv.bias.copy_(conv.bias)
        return layer.to(conv.weight.device)

    def offsets_and_mask(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(offset (B, 2 k^2, H', W'), mask (B, k^2, H', W') in (0, 1)) predicted from ``x``."""
        prediction = self.offset_mask(x)
        return prediction[:, : 2 * self.taps], torch.sigmoid(prediction[:, 2 * self.taps :])

    def forward(self, x: Tensor) -> Tensor:
        offset, mask = self.offsets_and_mask(x)
        return self.conv(x, offset, mask)


def deform_residual_blocks(stage: nn.Sequential) -> None:
    """Replace, in place, the 3x3 conv of every residual block of a torchvision ResNet stage by DCNv2.

    Bottleneck: ``conv2`` (the 3x3 between the 1x1s, as maskrcnn-benchmark's DCN ResNet);
    BasicBlock (ResNet-18/34, not in the paper): its second 3x3, ``conv2``, the stride-1 one.
    """
    for block in stage:
        block.conv2 = ModulatedDeformConv.from_conv(block.conv2)


__all__ = ["ModulatedDeformConv", "deform_residual_blocks"]
