"""Anchors and box coder: counts, sizes, centres and a round trip, checked against hand values."""

import math

import pytest
import torch

from detector import BoxCoder, make_anchors


def test_anchor_counts_sizes_and_centres_per_level():
    # A 64x64 image with levels P3..P7: feature maps 8x8, 4x4, 2x2, 1x1, 1x1.
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    strides = [8, 16, 32, 64, 128]
    anchors, counts = make_anchors(sizes, strides, anchor_scale=8.0)
    assert counts == [64, 16, 4, 1, 1]
    assert anchors.shape == (86, 4)
    start = 0
    for count, stride in zip(counts, strides):
        level = anchors[start : start + count]
        start += count
        torch.testing.assert_close(level[:, 2] - level[:, 0], torch.full((count,), 8.0 * stride))
        torch.testing.assert_close(level[:, 3] - level[:, 1], torch.full((count,), 8.0 * stride))
    # P3: location (y=0, x=0) is centred at (4, 4) with side 64; row-major order puts
    # (y=0, x=1) at index 1 (centre (12, 4)) and (y=1, x=0) at index 8 (centre (4, 12)).
    torch.testing.assert_close(anchors[0], torch.tensor([-28.0, -28.0, 36.0, 36.0]))
    torch.testing.assert_close(anchors[1], torch.tensor([-20.0, -28.0, 44.0, 36.0]))
    torch.testing.assert_close(anchors[8], torch.tensor([-28.0, -20.0, 36.0, 44.0]))
    # First P4 anchor: centre (8, 8), side 128.
    torch.testing.assert_close(anchors[64], torch.tensor([-56.0, -56.0, 72.0, 72.0]))
    # P7: the single location is centred at (64, 64), side 1024.
    torch.testing.assert_close(anchors[-1], torch.tensor([64.0 - 512, 64.0 - 512, 64.0 + 512, 64.0 + 512]))


def test_anchors_non_square_map_and_dtype():
    anchors, counts = make_anchors([(2, 3)], [16], anchor_scale=2.0, dtype=torch.float64)
    assert counts == [6] and anchors.dtype == torch.float64
    centres = 0.5 * (anchors[:, :2] + anchors[:, 2:])
    expected = torch.tensor([[8, 8], [24, 8], [40, 8], [8, 24], [24, 24], [40, 24]], dtype=torch.float64)
    torch.testing.assert_close(centres, expected)


def test_anchor_level_count_mismatch_raises():
    with pytest.raises(ValueError):
        make_anchors([(2, 2)], [8, 16], anchor_scale=8.0)


def test_box_coder_encode_by_hand():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[2.0, 4.0, 12.0, 24.0]])
    # centres (5, 5) -> (7, 14); sizes 10x10 -> 10x20; weights (10, 10, 5, 5).
    expected = torch.tensor([[10 * 2 / 10, 10 * 9 / 10, 5 * math.log(1.0), 5 * math.log(2.0)]])
    torch.testing.assert_close(coder.encode(gt, anchor), expected)
    torch.testing.assert_close(coder.decode(expected, anchor), gt)


def test_box_coder_round_trip_broadcasts_over_batch():
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 50, 2, generator=generator, dtype=torch.float64) * 100
    wh = torch.rand(2, 50, 2, generator=generator, dtype=torch.float64) * 200 + 1
    boxes = torch.cat([xy, xy + wh], dim=-1)
    anchors, _ = make_anchors([(5, 10)], [16], anchor_scale=4.0, dtype=torch.float64)  # (50, 4)
    coder = BoxCoder()
    deltas = coder.encode(boxes, anchors)
    assert deltas.shape == (2, 50, 4)
    torch.testing.assert_close(coder.decode(deltas, anchors), boxes)


def test_box_coder_clamps_scale_before_exp():
    coder = BoxCoder()
    anchor = torch.tensor([[0.0, 0.0, 16.0, 8.0]])
    box = coder.decode(torch.tensor([[0.0, 0.0, 1e4, -20.0]]), anchor)
    assert torch.isfinite(box).all()
    # dw / 5 = 2000 is clamped to log(1000 / 16): width 16 * 62.5 = 1000 around centre x = 8.
    torch.testing.assert_close(box[0, [0, 2]], torch.tensor([8.0 - 500.0, 8.0 + 500.0]))
    # dh / 5 = -4 is not clamped from below: height 8 * exp(-4).
    torch.testing.assert_close(box[0, 3] - box[0, 1], torch.tensor(8.0 * math.exp(-4.0)))
