"""The shared single-anchor detector: backbone -> FPN -> dense head, plus anchors.

It knows nothing of assigners or scorers; ``DetectionLoss`` and ``postprocess`` consume its
``DetectorOutput``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .anchors import make_anchors
from .backbone import ResNetBackbone
from .box_coder import BoxCoder
from .fpn import FPN, validate_levels
from .head import DenseHead

ANCHOR_CACHE_SIZE = 32


@dataclass
class DetectorOutput:
    """Raw dense predictions of one batch, flattened over levels (level order, row-major).

    cls_logits: (B, A, C) class logits.
    box_deltas: (B, A, 4) deltas w.r.t. ``anchors`` (decode with ``Detector.box_coder``).
    quality: (B, A) quality logits (IoU or centerness), or None without a quality branch.
    anchors: (A, 4) xyxy pixels.
    num_anchors_per_level: list[int], sums to A.
    strides: stride in pixels of each level.
    """

    cls_logits: Tensor
    box_deltas: Tensor
    quality: Tensor | None
    anchors: Tensor
    num_anchors_per_level: list[int]
    strides: list[int]


class Detector(nn.Module):
    """ResNet-FPN single-anchor detector of ATSS / PAA (one square anchor per location).

    ``forward(images (B, 3, H, W) float in [0, 1]) -> DetectorOutput``. H and W should be
    multiples of ``size_divisibility`` (the largest stride) so every level's stride is exact.

    ``channels_last`` runs the backbone and the FPN on channels-last (NHWC) maps with channels-last
    conv weights, the layout oneDNN's CPU convolutions, BatchNorm and max-pooling compute in without
    reordering; the head's input is made contiguous again (NCHW), since GroupNorm's CPU kernels are
    slower on channels-last maps. The outputs equal the default layout's up to float reassociation,
    but trainable BatchNorm's channels-last CPU kernel sums its statistics less precisely (about 5e-6
    relative error against float64, 1e-7 in the default layout). On one CPU thread
    (``benchmarks.train``, ResNet-18, 128 px, batch 8) a training step takes 2-7% less time.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        weights: str | None = None,
        norm: str = "frozen_bn",
        frozen_stages: int = 1,
        fpn_channels: int = 256,
        num_convs: int = 4,
        levels: tuple[int, ...] = (3, 4, 5, 6, 7),
        anchor_scale: float = 8.0,
        use_quality: bool = True,
        prior_prob: float = 0.01,
        pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        dcn_stages: tuple[int, ...] = (),
        dcn_tower: bool = False,
        channels_last: bool = False,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.levels = validate_levels(tuple(levels))
        self.strides = [2**level for level in self.levels]
        self.size_divisibility = self.strides[-1]
        self.num_classes = num_classes
        self.anchor_scale = float(anchor_scale)
        self.backbone = ResNetBackbone(
            backbone,
            weights=weights,
            norm=norm,
            frozen_stages=frozen_stages,
            return_levels=tuple(range(self.levels[0], 6)),
            dcn_stages=tuple(dcn_stages),
        )
        self.fpn = FPN(self.backbone.out_channels, fpn_channels, self.levels)
        self.head = DenseHead(fpn_channels, num_classes, len(self.levels), num_convs, use_quality, prior_prob,
                              dcn_tower=dcn_tower)
        self.box_coder = BoxCoder()
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)
        self._anchor_cache: OrderedDict[tuple, tuple[Tensor, list[int]]] = OrderedDict()
        self.channels_last = bool(channels_last)
        if self.channels_last:
            # The conv weights take the layout of the activations; ``.to(device)`` and ``load_state_dict``
            # keep it, and a checkpoint loads into either layout.
            self.backbone.to(memory_format=torch.channels_last)
            self.fpn.to(memory_format=torch.channels_last)

    @property
    def use_quality(self) -> bool:
        return self.head.use_quality

    def anchors_for(
        self, feature_sizes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor, list[int]]:
        """Anchors for these feature sizes, cached (LRU) by sizes, device and dtype. Do not modify them in place."""
        key = (tuple(feature_sizes), device, dtype)
        if key in self._anchor_cache:
            self._anchor_cache.move_to_end(key)
        else:
            self._anchor_cache[key] = make_anchors(list(feature_sizes), self.strides, self.anchor_scale, device, dtype)
            if len(self._anchor_cache) > ANCHOR_CACHE_SIZE:
                self._anchor_cache.popitem(last=False)
        return self._anchor_cache[key]

    def forward(self, images: Tensor) -> DetectorOutput:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        normalized = (images - self.pixel_mean) / self.pixel_std
        if self.channels_last:
            normalized = normalized.contiguous(memory_format=torch.channels_last)
        features = self.fpn(self.backbone(normalized))
        if self.channels_last:
            # The head stays in the default layout: GroupNorm's CPU kernels are slower on channels-last maps.
            features = [feature.contiguous() for feature in features]
        cls_logits, box_deltas, quality = self.head(features)
        sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in features]
        # Anchors stay at least float32 so decoding fp16/bf16 deltas under autocast is precise.
        anchors, num_anchors_per_level = self.anchors_for(
            sizes, images.device, torch.promote_types(images.dtype, torch.float32)
        )
        return DetectorOutput(cls_logits, box_deltas, quality, anchors, list(num_anchors_per_level), list(self.strides))

    def decode(self, out: DetectorOutput) -> Tensor:
        """(B, A, 4) xyxy pixel boxes from ``out.box_deltas`` and ``out.anchors`` (keeps grad)."""
        return self.box_coder.decode(out.box_deltas, out.anchors)
