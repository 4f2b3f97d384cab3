"""Feature pyramid over C_min..C5 with any number of extra stride-2 levels above P5.

Levels <= 5 come from ``torchvision.ops.FeaturePyramidNetwork``; P6, P7, ... are made from P5
by stride-2 3x3 convs with a ReLU between consecutive ones, as RetinaNet/ATSS/PAA build P6-P7
(torchvision's ``LastLevelP6P7`` with in = out channels, generalised to any count).
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork


def validate_levels(levels: tuple[int, ...]) -> tuple[int, ...]:
    """Levels must be consecutive, ascending, and start between P2 and P5."""
    levels = tuple(int(level) for level in levels)
    if not levels or not 2 <= levels[0] <= 5 or levels != tuple(range(levels[0], levels[0] + len(levels))):
        raise ValueError(f"levels must be consecutive ascending integers starting in [2, 5], got {levels}")
    return levels


class ExtraLevels(ExtraFPNBlock):
    """Appends ``num_extra`` levels to the FPN output: P_{k+1} = conv3x3/2(ReLU(P_k)), no ReLU on P5."""

    def __init__(self, channels: int, num_extra: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(num_extra))
        for conv in self.convs:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.constant_(conv.bias, 0)

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        results, names = list(results), list(names)
        top = results[-1]  # P5
        for index, conv in enumerate(self.convs):
            top = conv(top if index == 0 else F.relu(top))
            results.append(top)
            names.append(f"p_extra{index}")
        return results, names


class FPN(nn.Module):
    """Pyramid for ``levels`` (e.g. (3, 4, 5, 6, 7)) from backbone features C_min..C5.

    Args:
        in_channels: {level: channels} of the backbone maps for every level min(levels)..5.
        out_channels: channels of every pyramid level.
        levels: consecutive pyramid levels to return; stride of level l is 2**l.

    ``forward(features)`` takes the backbone's ordered maps C_min..C5 (a dict or list, lowest level
    first) and returns a list of (B, out_channels, H / 2**l, W / 2**l) maps, one per level in ``levels``.
    """

    def __init__(self, in_channels: dict[int, int], out_channels: int, levels: tuple[int, ...]):
        super().__init__()
        self.levels = validate_levels(levels)
        self.input_levels = tuple(range(self.levels[0], 6))
        missing = [level for level in self.input_levels if level not in in_channels]
        if missing:
            raise ValueError(f"FPN needs backbone channels for levels {self.input_levels}; missing {missing}")
        num_extra = max(0, self.levels[-1] - 5)
        self.fpn = FeaturePyramidNetwork(
            [in_channels[level] for level in self.input_levels],
            out_channels,
            extra_blocks=ExtraLevels(out_channels, num_extra) if num_extra else None,
        )
        self.out_channels = out_channels

    def forward(self, features: dict[str, Tensor] | list[Tensor]) -> list[Tensor]:
        maps = list(features.values()) if isinstance(features, dict) else list(features)
        if len(maps) != len(self.input_levels):
            raise ValueError(
                f"expected {len(self.input_levels)} backbone maps (C{self.input_levels[0]}..C5), got {len(maps)}"
            )
        pyramid = list(self.fpn({str(level): m for level, m in zip(self.input_levels, maps)}).values())
        # pyramid holds levels input_levels[0]..max(5, levels[-1]); drop computed levels not asked for.
        return pyramid[: len(self.levels)]
