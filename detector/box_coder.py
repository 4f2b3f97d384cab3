"""Anchor-relative box deltas (dx, dy, dw, dh) as in Faster R-CNN / RetinaNet / ATSS / PAA.

    dx = wx * (gx - ax) / aw,  dy = wy * (gy - ay) / ah,  dw = ww * log(gw / aw),  dh = wh * log(gh / ah)

with centres (x1 + x2) / 2 and sizes x2 - x1 (no +1; see ``anchors.py``), weights (10, 10, 5, 5).
Decoding clamps dw / wh and dh / wh at log(1000 / 16) before ``exp`` so a wild prediction cannot
overflow (the official code's guard).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DEFAULT_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return 0.5 * (x1 + x2), 0.5 * (y1 + y2), x2 - x1, y2 - y1


class BoxCoder:
    """Encode GT boxes against anchors and decode predicted deltas back to boxes.

    Both methods broadcast over leading dimensions: e.g. deltas (B, A, 4) with anchors (A, 4).
    """

    def __init__(
        self, weights: tuple[float, float, float, float] = DEFAULT_WEIGHTS, scale_clamp: float = DEFAULT_SCALE_CLAMP
    ):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = float(scale_clamp)

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """(..., 4) xyxy boxes relative to (..., 4) xyxy anchors -> (..., 4) deltas."""
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = _centre_size(anchors)
        gx, gy, gw, gh = _centre_size(boxes)
        return torch.stack(
            [wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)], dim=-1
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """(..., 4) deltas applied to (..., 4) xyxy anchors -> (..., 4) xyxy boxes.

        Computed in the promoted dtype of the two (float32 anchors keep fp16 deltas exact enough).
        """
        dtype = torch.promote_types(deltas.dtype, anchors.dtype)
        deltas, anchors = deltas.to(dtype), anchors.to(dtype)
        wx, wy, ww, wh = self.weights
        ax, ay, aw, ah = _centre_size(anchors)
        dx, dy, dw, dh = deltas.unbind(-1)
        cx = dx / wx * aw + ax
        cy = dy / wy * ah + ay
        half_w = 0.5 * torch.exp((dw / ww).clamp(max=self.scale_clamp)) * aw
        half_h = 0.5 * torch.exp((dh / wh).clamp(max=self.scale_clamp)) * ah
        return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)
