"""Training losses of the shared detector, for any assigner and scorer.

Following the official ATSS / PAA loss:
- classification: sigmoid focal loss (alpha 0.25, gamma 2) over every non-ignored anchor,
  one-hot targets on positives, summed and divided by the number of positives;
- box: GIoU loss on the decoded boxes of positives, weighted by the scorer's quality target and
  divided by the sum of those targets (PAA Sec. 3.3; the ``none`` scorer's targets are all 1,
  which makes this the plain mean over positives);
- quality: BCE-with-logits of the quality branch against the quality targets, divided by the
  number of positives.
The normalisers are averaged over processes, so every GPU divides by the same number.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from assigners import IGNORED, NEGATIVE, AssignInputs, Assignment, assignment_stats

from .box_coder import BoxCoder
from .model import DetectorOutput

QUALITY_SUM_EPS = 1e-6


def pad_boxes(boxes: list[Tensor], device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Stack [(N_i, 4)] into (B, N, 4) float32 padded with zeros, and a (B, N) bool mask of real rows."""
    size = max((b.shape[0] for b in boxes), default=0)
    padded = torch.zeros(len(boxes), size, 4, dtype=torch.float32, device=device)
    mask = torch.zeros(len(boxes), size, dtype=torch.bool, device=device)
    for i, b in enumerate(boxes):
        padded[i, : b.shape[0]] = b.to(device=device, dtype=torch.float32)
        mask[i, : b.shape[0]] = True
    return padded, mask


def pad_targets(
    targets: list[dict[str, Tensor]], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Pad per-image GT to the batch's largest count G (G = 0 allowed).

    Returns gt_boxes (B, G, 4) float32 xyxy, gt_labels (B, G) int64 (0 where padded) and
    gt_mask (B, G) bool (True for real GT).
    """
    gt_boxes, gt_mask = pad_boxes([t["boxes"].reshape(-1, 4) for t in targets], device)
    gt_labels = torch.zeros(gt_mask.shape, dtype=torch.int64, device=device)
    for i, t in enumerate(targets):
        gt_labels[i, : t["labels"].shape[0]] = t["labels"].to(device=device, dtype=torch.int64)
    return gt_boxes, gt_labels, gt_mask


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over processes when torch.distributed is running (the official ``reduce_sum``)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def loss_normalizers(
    num_pos: Tensor | float,
    quality_sum: Tensor | float,
    *,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
    world_size: int | None = None,
) -> tuple[float, float]:
    """Per-process loss normalisers, as the official ATSS / PAA code computes them.

    Both local values are summed over processes (``reduce_sum``, default an all-reduce when
    torch.distributed is initialised) and divided by ``world_size``; the positive count is then
    clamped to >= 1 and the quality sum to >= ``QUALITY_SUM_EPS``. Since DDP averages gradients
    over processes, sum_k(loss_k) / mean_k(norm_k) / world equals one process on the merged batch.

    Args:
        num_pos: this process's number of positive anchors.
        quality_sum: this process's sum of quality targets of positives.
        reduce_sum: maps a (2,) tensor to its sum over processes (tests pass a fake one).
        world_size: number of processes (default: torch.distributed's, or 1).
    Returns:
        (num_pos_avg, quality_sum_avg) as Python floats.
    """
    reduce_sum = reduce_sum or _all_reduce_sum
    world_size = world_size or _world_size()
    # One collective for both values, on the tensors' device (NCCL needs CUDA tensors).
    device = next((v.device for v in (quality_sum, num_pos) if isinstance(v, Tensor)), torch.device("cpu"))
    local = torch.stack(
        [torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in (num_pos, quality_sum)]
    )
    total = reduce_sum(local).double().cpu() / float(world_size)
    return max(float(total[0]), 1.0), max(float(total[1]), QUALITY_SUM_EPS)


def crowd_overlap(anchors: Tensor, crowd_boxes: Tensor, crowd_mask: Tensor) -> Tensor:
    """(B, A) largest intersection-over-anchor-area of each anchor with any crowd box of its image.

    anchors: (A, 4) xyxy; crowd_boxes: (B, K, 4) xyxy padded; crowd_mask: (B, K) bool.
    """
    if crowd_boxes.shape[1] == 0:
        return anchors.new_zeros(crowd_boxes.shape[0], anchors.shape[0])
    lt = torch.maximum(anchors[None, :, None, :2], crowd_boxes[:, None, :, :2])
    rb = torch.minimum(anchors[None, :, None, 2:], crowd_boxes[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # (B, A, K)
    area = ((anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])).clamp(min=1e-12)
    iof = (inter / area[None, :, None]).masked_fill(~crowd_mask[:, None, :], 0.0)
    return iof.amax(dim=-1)


class DetectionLoss:
    """Assign anchors, then compute the focal, GIoU and quality losses of one batch.

    Args:
        assigner: any callable ``AssignInputs -> Assignment``.
        scorer: from ``scorers.build_scorer``; must match whether the model has a quality branch.
        num_classes: C.
        cls_weight, box_weight, quality_weight: loss multipliers (PAA: 1.0, 1.3, 0.5).
        focal_alpha, focal_gamma: focal loss parameters.
        crowd_ignore_iof: negatives covering at least this fraction of their area with a crowd
            box are ignored in the classification loss (detectron2 / mmdetection practice).
        box_coder: decodes box deltas (default ``BoxCoder()``, the detector's).

    ``loss(out, targets) -> (losses, info)``: targets are dicts with ``boxes`` (G_i, 4) xyxy,
    ``labels`` (G_i,) int64 and optionally ``crowd_boxes`` (K_i, 4). ``losses`` holds the scalar
    tensors ``loss_cls``, ``loss_box``, ``loss_quality``; ``info`` holds ``assign_ms``, the
    ``assignment_stats`` entries and ``assignment`` (the assigner's ``Assignment``).
    """

    def __init__(
        self,
        assigner: Callable[[AssignInputs], Assignment],
        scorer: Any,
        num_classes: int,
        *,
        cls_weight: float = 1.0,
        box_weight: float = 1.3,
        quality_weight: float = 0.5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        crowd_ignore_iof: float = 0.5,
        box_coder: BoxCoder | None = None,
    ):
        self.assigner = assigner
        self.scorer = scorer
        self.num_classes = num_classes
        self.cls_weight = cls_weight
        self.box_weight = box_weight
        self.quality_weight = quality_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.crowd_ignore_iof = crowd_ignore_iof
        self.box_coder = box_coder or BoxCoder()

    def _assign(self, inputs: AssignInputs) -> tuple[Assignment, float]:
        on_cuda = inputs.anchors.is_cuda
        if on_cuda:
            torch.cuda.synchronize(inputs.anchors.device)
        start = time.perf_counter()
        assignment = self.assigner(inputs)
        if on_cuda:
            torch.cuda.synchronize(inputs.anchors.device)
        return assignment, (time.perf_counter() - start) * 1000.0

    def __call__(
        self, out: DetectorOutput, targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if self.scorer.uses_quality_branch != (out.quality is not None):
            raise ValueError(
                f"scorer '{self.scorer.name}' {'needs' if self.scorer.uses_quality_branch else 'does not use'} a quality "
                f"branch but the model has {'one' if out.quality is not None else 'none'}; build the model with "
                f"use_quality={self.scorer.uses_quality_branch}"
            )
        if len(targets) != out.cls_logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {out.cls_logits.shape[0]} images")
        device = out.cls_logits.device
        anchors = out.anchors
        gt_boxes, gt_labels, gt_mask = pad_targets(targets, device)
        pred_boxes = self.box_coder.decode(out.box_deltas, anchors)  # (B, A, 4), with grad

        inputs = AssignInputs(
            anchors=anchors,
            num_anchors_per_level=list(out.num_anchors_per_level),
            gt_boxes=gt_boxes,
            gt_labels=gt_labels,
            gt_mask=gt_mask,
            cls_logits=out.cls_logits.detach(),
            pred_boxes=pred_boxes.detach(),
        )
        assignment, assign_ms = self._assign(inputs)
        info: dict[str, Any] = {
            "assign_ms": assign_ms,
            **assignment_stats(inputs, assignment),
            "assignment": assignment,
        }

        gt_index = assignment.gt_index
        crowd_list = [t.get("crowd_boxes", gt_boxes.new_zeros(0, 4)).reshape(-1, 4) for t in targets]
        if any(c.shape[0] > 0 for c in crowd_list):
            crowd_boxes, crowd_mask = pad_boxes(crowd_list, device)
            in_crowd = crowd_overlap(anchors.float(), crowd_boxes, crowd_mask) >= self.crowd_ignore_iof
            gt_index = torch.where((gt_index == NEGATIVE) & in_crowd, torch.full_like(gt_index, IGNORED), gt_index)

        # Positives: (P,) image and anchor indices, their GT boxes and labels.
        pos_image, pos_anchor = torch.nonzero(gt_index >= 0, as_tuple=True)
        pos_gt = gt_index[pos_image, pos_anchor]
        pos_gt_boxes = gt_boxes[pos_image, pos_gt]
        pos_labels = gt_labels[pos_image, pos_gt]

        quality_targets = self.scorer.targets(
            anchors[pos_anchor], pred_boxes[pos_image, pos_anchor].detach(), pos_gt_boxes
        )
        num_pos_avg, quality_sum_avg = loss_normalizers(float(pos_anchor.numel()), quality_targets.sum().detach())

        cls_logits = out.cls_logits.float()
        cls_targets = torch.zeros_like(cls_logits)
        cls_targets[pos_image, pos_anchor, pos_labels] = 1.0
        valid = gt_index != IGNORED
        loss_cls = (
            sigmoid_focal_loss(
                cls_logits[valid], cls_targets[valid], alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
            )
            / num_pos_avg
        )

        # PAA Sec. 3.3: box loss weighted by the (detached) quality target, normalised by its sum.
        giou = generalized_box_iou_loss(pred_boxes[pos_image, pos_anchor].float(), pos_gt_boxes, reduction="none")
        loss_box = (giou * quality_targets).sum() / quality_sum_avg

        if out.quality is not None:
            quality_logits = out.quality[pos_image, pos_anchor].float()
            loss_quality = (
                F.binary_cross_entropy_with_logits(quality_logits, quality_targets, reduction="sum") / num_pos_avg
            )
        else:
            loss_quality = cls_logits.new_zeros(())

        losses = {
            "loss_cls": loss_cls * self.cls_weight,
            "loss_box": loss_box * self.box_weight,
            "loss_quality": loss_quality * self.quality_weight,
        }
        return losses, info
