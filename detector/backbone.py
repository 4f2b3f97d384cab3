"""ResNet / ResNeXt backbones from torchvision, returning the C2..C5 feature maps a detector needs.

Stage naming follows the papers: C2 = ``layer1`` (stride 4), C3 = ``layer2`` (stride 8),
C4 = ``layer3`` (stride 16), C5 = ``layer4`` (stride 32).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import WeightsEnum, get_weight
from torchvision.ops.misc import FrozenBatchNorm2d

from .dcn import deform_residual_blocks

ARCHITECTURES: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
    "resnet101": torchvision.models.resnet101,
    "resnext101_32x8d": torchvision.models.resnext101_32x8d,
    "resnext101_64x4d": torchvision.models.resnext101_64x4d,
}
NORMS = ("frozen_bn", "bn", "gn")
MAX_FROZEN_STAGES = 4


def num_groups_for(channels: int, max_groups: int = 32) -> int:
    """Largest group count <= ``max_groups`` that divides ``channels`` (32 for the usual 256)."""
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    raise ValueError(f"channels must be positive, got {channels}")


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups as in the ATSS/PAA heads, or fewer when ``channels`` needs it."""
    return nn.GroupNorm(num_groups_for(channels), channels)


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return group_norm
    raise ValueError(f"unknown norm '{norm}'; valid choices: {', '.join(NORMS)}")


def resolve_weights(weights: str | WeightsEnum | None) -> WeightsEnum | None:
    """Turn a name such as ``"ResNet50_Weights.IMAGENET1K_V1"`` into torchvision's weights enum.

    A path to a ``.pt`` file is not an enum: ``ResNetBackbone`` loads it itself (returns None here).
    """
    if weights is None or isinstance(weights, WeightsEnum) or is_weights_file(weights):
        return None if not isinstance(weights, WeightsEnum) else weights
    return get_weight(weights)


def is_weights_file(weights: object) -> bool:
    """Whether ``weights`` names a state-dict file (``*.pt``) rather than a torchvision weights enum."""
    return isinstance(weights, str | Path) and str(weights).endswith(".pt")


def load_weights_file(net: nn.Module, path: str | Path) -> None:
    """Load a torchvision ResNet state dict (as ``torch.save(resnet.state_dict())`` writes it) into ``net``.

    The classifier (``fc.*``) is skipped, since the detector drops it; every other key must match
    in name and shape, else ValueError names the file and the keys.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{path}: not a state dict of this backbone (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]})")
    net.load_state_dict(state, strict=False)


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier, returning ``{"c2": ..., "c5": ...}`` as asked.

    Args:
        name: one of ``ARCHITECTURES``.
        weights: None (random init), a torchvision weights name/enum, e.g.
            ``"ResNet50_Weights.IMAGENET1K_V1"`` (loaded by torchvision, downloads on first use), or
            a path to a ``.pt`` ResNet state dict (e.g. the digits-pretrained one, ``experiments.pretrain``).
        norm: ``"frozen_bn"`` (FrozenBatchNorm2d, the detection default with pretrained weights),
            ``"bn"`` (trainable BatchNorm2d) or ``"gn"`` (GroupNorm; random init only, since
            ImageNet checkpoints hold BatchNorm statistics).
        frozen_stages: 0 freezes nothing; k >= 1 freezes the stem and ``layer1..layerk``
            (k = 1 is detectron2's FREEZE_AT=2, the ATSS/PAA default).
        return_levels: which of the levels 2..5 to return (C2..C5).
        dcn_stages: the stages (levels 2..5) whose residual blocks get a modulated deformable 3x3 conv
            (DCNv2, ``detector.dcn``; the official DCN models use (3, 4, 5) for ResNet, (4, 5) for
            ResNeXt); the weights are loaded first and copied into the deformable convs.

    ``forward(images (B, 3, H, W)) -> OrderedDict[f"c{level}" -> (B, out_channels[level], H / 2**level, W / 2**level)]``.
    """

    def __init__(
        self,
        name: str = "resnet50",
        weights: str | WeightsEnum | None = None,
        norm: str = "frozen_bn",
        frozen_stages: int = 1,
        return_levels: tuple[int, ...] = (3, 4, 5),
        dcn_stages: tuple[int, ...] = (),
    ):
        super().__init__()
        if name not in ARCHITECTURES:
            raise ValueError(f"unknown backbone '{name}'; valid choices: {', '.join(ARCHITECTURES)}")
        if not 0 <= frozen_stages <= MAX_FROZEN_STAGES:
            raise ValueError(f"frozen_stages must be in [0, {MAX_FROZEN_STAGES}], got {frozen_stages}")
        if not return_levels or any(level not in (2, 3, 4, 5) for level in return_levels):
            raise ValueError(f"return_levels must be a non-empty subset of (2, 3, 4, 5), got {return_levels}")
        if any(level not in (2, 3, 4, 5) for level in dcn_stages):
            raise ValueError(f"dcn_stages must be a subset of the stages (2, 3, 4, 5), got {tuple(dcn_stages)}")
        resolved = resolve_weights(weights)
        if (resolved is not None or is_weights_file(weights)) and norm == "gn":
            raise ValueError(
                "norm='gn' cannot load ImageNet weights (they hold BatchNorm statistics); use weights=None"
            )
        net = ARCHITECTURES[name](weights=resolved, norm_layer=_norm_layer(norm))
        if is_weights_file(weights):
            load_weights_file(net, weights)

        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.dcn_stages = tuple(sorted(set(dcn_stages)))
        for level in self.dcn_stages:
            deform_residual_blocks(getattr(self, f"layer{level - 1}"))
        expansion = type(net.layer1[0]).expansion  # 1 for BasicBlock, 4 for Bottleneck
        self.out_channels = {level: 64 * 2 ** (level - 2) * expansion for level in (2, 3, 4, 5)}
        self.return_levels = tuple(sorted(return_levels))
        self.frozen_stages = frozen_stages
        for module in self._frozen_modules():
            for param in module.parameters():
                param.requires_grad_(False)

    def _frozen_modules(self) -> list[nn.Module]:
        stages = [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]
        return stages[: self.frozen_stages + 1] if self.frozen_stages > 0 else []

    def train(self, mode: bool = True) -> ResNetBackbone:
        """Frozen stages stay in eval mode so trainable BatchNorm there keeps its statistics."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        x = self.stem(images)
        features: OrderedDict[str, Tensor] = OrderedDict()
        for level, layer in zip((2, 3, 4, 5), (self.layer1, self.layer2, self.layer3, self.layer4)):
            x = layer(x)
            if level in self.return_levels:
                features[f"c{level}"] = x
            if level >= self.return_levels[-1]:
                break
        return features
