"""One square anchor per location per pyramid level.

Convention (kept consistent with ``BoxCoder`` and ``torchvision.ops.box_iou``): boxes are
continuous xyxy pixel coordinates with width ``x2 - x1`` (no +1). The anchor of location (y, x)
on a level of stride s is centred at ((x + 0.5) * s, (y + 0.5) * s), the centre of the s x s
input cell it sees, with side ``anchor_scale * s``. This is the centre the official ATSS/PAA
anchors have once their legacy +1 widths are dropped (their base anchor spans [0.5, s - 0.5]
around s / 2, and their point locations are x * s + s // 2); ATSS/PAA use anchor_scale = 8
(anchor 64 at stride 8).
"""

from __future__ import annotations

import torch
from torch import Tensor


def make_anchors(
    feature_sizes: list[tuple[int, int]],
    strides: list[int],
    anchor_scale: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, list[int]]:
    """Anchors for every location of every level.

    Args:
        feature_sizes: (H_l, W_l) of each level's feature map.
        strides: stride in pixels of each level.
        anchor_scale: anchor side in units of the level's stride.

    Returns:
        anchors: (A, 4) xyxy pixels, levels concatenated in order and row-major (y, then x)
            within a level, matching ``head.flatten_levels``.
        num_anchors_per_level: [H_l * W_l], sums to A.
    """
    if len(feature_sizes) != len(strides):
        raise ValueError(f"{len(feature_sizes)} feature sizes but {len(strides)} strides")
    per_level = []
    for (height, width), stride in zip(feature_sizes, strides):
        centre_x = (torch.arange(width, device=device, dtype=dtype) + 0.5) * stride
        centre_y = (torch.arange(height, device=device, dtype=dtype) + 0.5) * stride
        cy, cx = torch.meshgrid(centre_y, centre_x, indexing="ij")
        half = 0.5 * anchor_scale * stride
        per_level.append(torch.stack([cx - half, cy - half, cx + half, cy + half], dim=-1).reshape(-1, 4))
    if not per_level:
        return torch.zeros(0, 4, device=device, dtype=dtype), []
    return torch.cat(per_level), [int(h) * int(w) for h, w in feature_sizes]
