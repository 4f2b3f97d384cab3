"""Shared fixtures for the assigner tests: devices and random detection batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from assigners import AssignInputs, gt_anchor_iou

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="CUDA is not available")
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every available device: "cpu", and "cuda" when there is one."""
    return request.param


def make_anchors(image_size, strides=(8, 16, 32, 64, 128), scale=8.0):
    """Square anchors of side ``scale * stride``, one per location, levels in order.

    Returns ((A, 4) float32 xyxy, num_anchors_per_level)."""
    height, width = image_size
    anchors, counts = [], []
    for stride in strides:
        ys = (torch.arange(-(-height // stride), dtype=torch.float32) + 0.5) * stride
        xs = (torch.arange(-(-width // stride), dtype=torch.float32) + 0.5) * stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        half = scale * stride / 2
        boxes = torch.stack([cx - half, cy - half, cx + half, cy + half], dim=-1).reshape(-1, 4)
        anchors.append(boxes)
        counts.append(boxes.shape[0])
    return torch.cat(anchors), counts


def random_batch(
    seed: int,
    *,
    batch_size: int = 3,
    max_gt: int = 6,
    image_size=(96, 128),
    strides=(8, 16, 32, 64, 128),
    num_classes: int = 5,
    predictions: bool = True,
    empty_image: bool = True,
    device="cpu",
) -> AssignInputs:
    """A random batch with padded GT slots, noisy predictions and (optionally) an image without GT.

    Anchors of side 8 x stride, one per location, with ``strides`` recorded in ``AssignInputs``.

    Real GTs sit in random slots; padded slots hold garbage boxes and labels. GT sizes
    range from a few pixels to larger than the image. Predictions lean towards the max-IoU
    GT of each anchor (logit of its class raised, box pulled towards it) plus noise, so
    anchor losses form the two modes PAA expects.
    """
    gen = torch.Generator().manual_seed(seed)
    height, width = image_size
    anchors, counts = make_anchors(image_size, strides)
    b, g = batch_size, max_gt
    num_real = torch.randint(1, g + 1, (b,), generator=gen)
    if empty_image and b > 1:
        num_real[-1] = 0
    gt_mask = torch.zeros(b, g, dtype=torch.bool)
    for i in range(b):
        gt_mask[i, torch.randperm(g, generator=gen)[: int(num_real[i])]] = True
    size = torch.rand(b, g, 2, generator=gen) ** 2 * torch.tensor([width, height]) * 1.2 + 2.0
    centre = torch.rand(b, g, 2, generator=gen) * torch.tensor([width, height])
    boxes = torch.cat([centre - size / 2, centre + size / 2], dim=-1)
    garbage = torch.randn(b, g, 4, generator=gen) * 1e3
    gt_boxes = torch.where(gt_mask.unsqueeze(-1), boxes, garbage)
    gt_labels = torch.randint(0, num_classes, (b, g), generator=gen)
    cls_logits = pred_boxes = None
    if predictions:
        a = anchors.shape[0]
        static = AssignInputs(anchors, counts, gt_boxes, gt_labels, gt_mask)
        best_iou, best_gt = gt_anchor_iou(static).max(dim=1)  # (B, A)
        best_iou = best_iou.clamp(min=0)
        cls_logits = torch.randn(b, a, num_classes, generator=gen) * 1.5 - 3.0
        label = gt_labels.gather(1, best_gt)
        bump = 6.0 * best_iou * torch.rand(b, a, generator=gen)
        cls_logits.scatter_add_(2, label.unsqueeze(-1), bump.unsqueeze(-1))
        target = gt_boxes.gather(1, best_gt.unsqueeze(-1).expand(b, a, 4))
        pull = (torch.rand(b, a, 1, generator=gen) * best_iou.unsqueeze(-1)).clamp(max=1)
        side = (anchors[:, 2:] - anchors[:, :2]).repeat(1, 2)
        noise = torch.randn(b, a, 4, generator=gen) * 0.1 * side
        pred_boxes = anchors + pull * (target - anchors) + noise
    return AssignInputs(
        anchors=anchors.to(device),
        num_anchors_per_level=counts,
        gt_boxes=gt_boxes.to(device),
        gt_labels=gt_labels.to(device),
        gt_mask=gt_mask.to(device),
        cls_logits=None if cls_logits is None else cls_logits.to(device),
        pred_boxes=None if pred_boxes is None else pred_boxes.to(device),
        strides=list(strides),
    )


@pytest.fixture
def make_batch():
    """The ``random_batch`` factory: ``make_batch(seed, batch_size=..., device=...)``."""
    return random_batch


def random_loss_rows(seed: int, num_rows: int, max_len: int = 45, min_len: int = 2):
    """Sorted candidate-loss rows of many shapes, as PAA's GMM sees them.

    Returns (loss (N, K) float64 ascending over each row's valid prefix, mask (N, K) bool).
    Row kinds cycle through: uniform, two separated modes, two overlapping modes, values
    rounded to 0.5 (ties), all equal (zero variance), exactly two samples, half-normal,
    large scale, tiny spread, one far outlier.
    """
    gen = torch.Generator().manual_seed(seed)
    loss = torch.zeros(num_rows, max_len, dtype=torch.float64)
    mask = torch.zeros(num_rows, max_len, dtype=torch.bool)
    for row in range(num_rows):
        kind = row % 10
        n = 2 if kind == 5 else int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        z = torch.randn(n, generator=gen, dtype=torch.float64)
        split = int(torch.randint(1, n, (1,), generator=gen)) if n > 1 else 1
        if kind == 0:
            values = u * 3
        elif kind == 1:
            values = torch.cat([0.2 + 0.1 * z[:split].abs(), 2.5 + 0.3 * z[split:]])
        elif kind == 2:
            values = torch.cat([0.8 + 0.4 * z[:split], 1.4 + 0.5 * z[split:]]).abs()
        elif kind == 3:
            values = torch.round(u * 8) / 2
        elif kind == 4:
            values = torch.full((n,), 1.25, dtype=torch.float64)
        elif kind == 6:
            values = z.abs() * 2
        elif kind == 7:
            values = u * 1000
        elif kind == 8:
            values = 0.7 + u * 1e-4
        elif kind == 9:
            values = torch.cat([u[:-1], torch.tensor([50.0], dtype=torch.float64)])
        else:
            values = u * 4
        loss[row, :n] = values.sort().values
        mask[row, :n] = True
    return loss, mask


def as_float64(inputs: AssignInputs) -> AssignInputs:
    """The same batch in float64, so that rounding cannot flip a near tie between an assigner and its
    loop restatement."""
    return dataclasses.replace(
        inputs,
        anchors=inputs.anchors.double(),
        gt_boxes=inputs.gt_boxes.double(),
        cls_logits=inputs.cls_logits.double(),
        pred_boxes=inputs.pred_boxes.double(),
    )
