"""The shared single-anchor dense head of ATSS / PAA (one anchor per location).

Two towers of ``num_convs`` conv3x3 -> GroupNorm -> ReLU are shared over pyramid levels. The class
tower feeds a conv predicting C logits; the box tower feeds a conv predicting 4 box deltas (scaled
by a learnable per-level scalar) and, with ``use_quality``, a conv predicting one localization
quality logit (PAA Sec. 3.3 puts the IoU prediction on the box tower, as ATSS does centerness).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .backbone import group_norm
from .dcn import ModulatedDeformConv


class Scale(nn.Module):
    """Multiplies its input by a learnable scalar (init 1.0); one per level for the box deltas."""

    def __init__(self, init_value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(init_value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(channels: int, num_convs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(num_convs):
        # In place: GroupNorm's backward needs its input, not its output, so the ReLU may overwrite it.
        layers += [nn.Conv2d(channels, channels, 3, padding=1), group_norm(channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def flatten_levels(maps: list[Tensor]) -> Tensor:
    """[(B, K, H_l, W_l)] -> (B, sum_l H_l * W_l, K), levels concatenated, row-major within a level."""
    return torch.cat([m.permute(0, 2, 3, 1).flatten(1, 2) for m in maps], dim=1)


class DenseHead(nn.Module):
    """Class, box-delta and optional quality predictions for every location of every level.

    Args:
        in_channels: channels of every pyramid level.
        num_classes: C, foreground classes (sigmoid, no background logit).
        num_levels: number of pyramid levels (one learnable box Scale each).
        num_convs: convs per tower.
        use_quality: add the quality (IoU / centerness) branch on the box tower.
        prior_prob: initial foreground probability of every class logit (RetinaNet Sec. 4.1).
        dcn_tower: the last conv of each tower is a modulated deformable conv (DCNv2, ``detector.dcn``),
            as the official DCN models (``USE_DCN_IN_TOWER``); it starts from the plain conv's
            initialisation with zero offsets.

    ``forward(features)`` maps a list of (B, in_channels, H_l, W_l) to
    ``(cls_logits (B, A, C), box_deltas (B, A, 4), quality (B, A) logits or None)``
    with A = sum_l H_l * W_l.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        num_levels: int,
        num_convs: int = 4,
        use_quality: bool = True,
        prior_prob: float = 0.01,
        dcn_tower: bool = False,
    ):
        super().__init__()
        if not 0.0 < prior_prob < 1.0:
            raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
        self.num_classes = num_classes
        self.cls_tower = _tower(in_channels, num_convs)
        self.box_tower = _tower(in_channels, num_convs)
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.box_deltas = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.quality = nn.Conv2d(in_channels, 1, 3, padding=1) if use_quality else None
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.constant_(module.bias, 0.0)
        # Focal-loss prior: sigmoid(bias) = prior_prob for every class at initialisation.
        nn.init.constant_(self.cls_logits.bias, -math.log((1.0 - prior_prob) / prior_prob))
        if dcn_tower and num_convs > 0:
            for tower in (self.cls_tower, self.box_tower):
                last = len(tower) - 3  # conv, norm, ReLU per layer
                tower[last] = ModulatedDeformConv.from_conv(tower[last])

    @property
    def use_quality(self) -> bool:
        return self.quality is not None

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        if len(features) != len(self.scales):
            raise ValueError(f"head built for {len(self.scales)} levels, got {len(features)} feature maps")
        # The box-delta and quality convs read the same box feature: one conv with both filter banks
        # (concatenated once per call, so the parameters stay two modules) computes the same outputs
        # in one pass, a conv call fewer per level.
        box_weight, box_bias = self.box_deltas.weight, self.box_deltas.bias
        if self.quality is not None:
            box_weight = torch.cat([box_weight, self.quality.weight])
            box_bias = torch.cat([box_bias, self.quality.bias])
        cls_maps, box_maps, quality_maps = [], [], []
        for feature, scale in zip(features, self.scales):
            cls_maps.append(self.cls_logits(self.cls_tower(feature)))
            box_outputs = F.conv2d(self.box_tower(feature), box_weight, box_bias, padding=1)
            box_maps.append(scale(box_outputs[:, :4]))
            if self.quality is not None:
                quality_maps.append(box_outputs[:, 4:])
        quality = flatten_levels(quality_maps).squeeze(-1) if self.quality is not None else None
        return flatten_levels(cls_maps), flatten_levels(box_maps), quality
