"""Training losses of the shared detector, for any assigner and scorer.

Following the official ATSS / PAA loss:
- classification: the scorer's loss (sigmoid focal loss, alpha 0.25, gamma 2; or QFL / VFL) over every
  non-ignored anchor, one-hot (or soft) targets on positives, summed and divided by the number of positives;
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
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import functional as F
from torchvision.ops import generalized_box_iou_loss

from assigners import IGNORED, NEGATIVE, AssignInputs, Assignment

from .box_coder import BoxCoder
from .model import DetectorOutput
from .scorers import Scorer

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


def device_loss_normalizers(
    num_pos: Tensor | float,
    quality_sum: Tensor | float,
    *,
    reduce_sum: Callable[[Tensor], Tensor] | None = None,
    world_size: int | None = None,
) -> tuple[Tensor, Tensor]:
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
        (num_pos_avg, quality_sum_avg) as two 0-dim float64 tensors on the device of the inputs,
        computed without reading anything back to the host (the training step divides its losses
        by them).
    """
    reduce_sum = reduce_sum or _all_reduce_sum
    world_size = world_size or _world_size()
    # One collective for both values, on the tensors' device (NCCL needs CUDA tensors).
    device = next((v.device for v in (quality_sum, num_pos) if isinstance(v, Tensor)), torch.device("cpu"))
    local = torch.stack([_device_scalar(v, device) for v in (num_pos, quality_sum)])
    total = reduce_sum(local).double() / float(world_size)
    return total[0].clamp(min=1.0), total[1].clamp(min=QUALITY_SUM_EPS)


def _device_scalar(value: Tensor | float, device: torch.device) -> Tensor:
    """A 0-dim float64 tensor on ``device``; a Python number is written by a fill kernel, not copied
    from host memory (a blocking copy on CUDA)."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=torch.float64).reshape(())
    return torch.full((), float(value), dtype=torch.float64, device=device)


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


def build_assign_inputs(out: DetectorOutput, pred_boxes: Tensor, targets: list[dict[str, Tensor]]) -> AssignInputs:
    """The assigner's view of one batch: the detector's anchors, strides and detached predictions, padded GT.

    out: the detector's (float32) output; pred_boxes: (B, A, 4) decoded xyxy boxes of ``out``;
    targets: per image ``boxes`` (G_i, 4) xyxy and ``labels`` (G_i,). The one place that builds ``AssignInputs`` from a forward pass (the loss and the snapshot use it).
    """
    gt_boxes, gt_labels, gt_mask = pad_targets(targets, out.cls_logits.device)
    return AssignInputs(
        anchors=out.anchors,
        num_anchors_per_level=list(out.num_anchors_per_level),
        gt_boxes=gt_boxes,
        gt_labels=gt_labels,
        gt_mask=gt_mask,
        cls_logits=out.cls_logits.detach(),
        pred_boxes=pred_boxes.detach(),
        strides=list(out.strides),
    )


@dataclass
class AssignTimer:
    """Wall time of one assigner call, read only when asked (on logged iterations).

    On CPU the time is taken with ``perf_counter`` around the call. On CUDA two events are recorded
    on the stream instead, so the step never waits for the GPU; ``ms`` waits for the end event.
    """

    cpu_ms: float | None = None
    start: torch.cuda.Event | None = None
    end: torch.cuda.Event | None = None

    @property
    def ms(self) -> float:
        if self.cpu_ms is not None:
            return self.cpu_ms
        self.end.synchronize()
        return float(self.start.elapsed_time(self.end))

    def __float__(self) -> float:
        return self.ms


def timed_assign(assigner: Callable[[AssignInputs], Assignment], inputs: AssignInputs) -> tuple[Assignment, AssignTimer]:
    """``assigner(inputs)`` and its ``AssignTimer``; no host-device synchronisation."""
    if inputs.anchors.is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        assignment = assigner(inputs)
        end.record()
        return assignment, AssignTimer(start=start, end=end)
    start_time = time.perf_counter()
    assignment = assigner(inputs)
    return assignment, AssignTimer(cpu_ms=(time.perf_counter() - start_time) * 1000.0)


class DetectionLoss:
    """Assign anchors, then compute the focal, GIoU and quality losses of one batch.

    Args:
        assigner: any callable ``AssignInputs -> Assignment``.
        scorer: a ``Scorer``; must match whether the model has a quality branch. Its
            ``cls_weight``, ``box_weight`` and ``quality_weight`` multiply the three losses.
        num_classes: C.
        focal_alpha, focal_gamma: focal loss parameters.
        crowd_ignore_iof: negatives covering at least this fraction of their area with a crowd
            box are ignored in the classification loss (detectron2 / mmdetection practice).
        box_coder: decodes box deltas (default ``BoxCoder()``, the detector's).

    ``loss(out, targets) -> (losses, info)``: targets are dicts with ``boxes`` (G_i, 4) xyxy,
    ``labels`` (G_i,) int64 and optionally ``crowd_boxes`` (K_i, 4). ``losses`` holds the scalar
    tensors ``loss_cls``, ``loss_box``, ``loss_quality``; ``info`` holds ``assign_ms`` (an
    ``AssignTimer``), ``inputs`` (the ``AssignInputs``) and ``assignment`` (the ``Assignment``).
    Nothing here waits for the device: ``assignment_stats(info["inputs"], info["assignment"])``
    gives the positive-sample statistics when they are to be logged.

    Classification targets are 1 on each positive's GT class, or ``Assignment.soft_target`` where
    the assigner gives one (TAL, SimOTA, DSL); the box and quality losses are unchanged by it. For the
    joint scorers (``quality_in_classification``: QFL, VFL) the target is the quality target: the soft
    target where there is one, else the IoU of the detached predicted box, which also weights the box loss.
    """

    def __init__(
        self,
        assigner: Callable[[AssignInputs], Assignment],
        scorer: Scorer,
        num_classes: int,
        *,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        crowd_ignore_iof: float = 0.5,
        box_coder: BoxCoder | None = None,
    ):
        self.assigner = assigner
        self.scorer = scorer
        self.num_classes = num_classes
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.crowd_ignore_iof = crowd_ignore_iof
        self.box_coder = box_coder or BoxCoder()

    def _check(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> None:
        has_quality = self.scorer.has_quality_branch
        if has_quality != (out.quality is not None):
            raise ValueError(
                f"scorer '{self.scorer.name}' {'needs' if has_quality else 'does not use'} a quality "
                f"branch but the model has {'one' if out.quality is not None else 'none'}; build the model with "
                f"use_quality={has_quality}"
            )
        if len(targets) != out.cls_logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {out.cls_logits.shape[0]} images")

    def _ignore_crowd_negatives(self, gt_index: Tensor, anchors: Tensor, targets: list[dict[str, Tensor]]) -> Tensor:
        """(B, A) ``gt_index`` with negatives inside a crowd region (iof >= ``crowd_ignore_iof``) set to IGNORED."""
        crowd_list = [t.get("crowd_boxes", anchors.new_zeros(0, 4)).reshape(-1, 4) for t in targets]
        if not any(c.shape[0] > 0 for c in crowd_list):
            return gt_index
        crowd_boxes, crowd_mask = pad_boxes(crowd_list, anchors.device)
        in_crowd = crowd_overlap(anchors.float(), crowd_boxes, crowd_mask) >= self.crowd_ignore_iof
        return torch.where((gt_index == NEGATIVE) & in_crowd, torch.full_like(gt_index, IGNORED), gt_index)

    def _classification_loss(self, cls_logits: Tensor, gt_index: Tensor, pos: tuple[Tensor, Tensor, Tensor],
                             positive_targets: Tensor | float, num_pos_avg: Tensor) -> Tensor:
        """The scorer's classification loss (focal, QFL or VFL) over the non-ignored anchors, divided by
        the positives; targets ``positive_targets`` (P,) (or one value) on each positive's class, 0 elsewhere."""
        pos_image, pos_anchor, pos_labels = pos
        cls_targets = torch.zeros_like(cls_logits)
        cls_targets[pos_image, pos_anchor, pos_labels] = (
            positive_targets.to(cls_targets.dtype) if isinstance(positive_targets, Tensor) else positive_targets
        )
        # Ignored anchors are masked out of the sum, not selected away: a boolean selection would read
        # their count back to the host (a synchronisation on CUDA) and copy the (B, A, C) logits.
        loss = self.scorer.classification_loss(cls_logits, cls_targets, self.focal_alpha, self.focal_gamma,
                                               valid=gt_index != IGNORED)
        return loss / num_pos_avg

    def _positive_targets(self, assignment: Assignment, pos: tuple[Tensor, Tensor, Tensor],
                          quality_targets: Tensor) -> tuple[Tensor | float, Tensor]:
        """(classification targets of the positives, their quality targets).

        Classification: the assigner's soft target where it gives one, else 1.0; for scorers whose
        class score is the quality (``quality_in_classification``), the quality target, which is then
        the assigner's soft target where it gives one (the value the assigner prescribes for the score).
        """
        pos_image, pos_anchor, _ = pos
        soft = None if assignment.soft_target is None else assignment.soft_target[pos_image, pos_anchor].to(
            quality_targets.dtype)
        if self.scorer.quality_in_classification:
            quality_targets = quality_targets if soft is None else soft
            return quality_targets, quality_targets
        return (1.0 if soft is None else soft), quality_targets

    def __call__(
        self, out: DetectorOutput, targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        self._check(out, targets)
        anchors = out.anchors
        # The assigner sees every anchor's decoded box, detached; the box loss decodes its positives again
        # with grad, so the decoding's backward pass runs over the P positives rather than all B * A anchors.
        with torch.no_grad():
            pred_boxes = self.box_coder.decode(out.box_deltas, anchors)  # (B, A, 4)
        inputs = build_assign_inputs(out, pred_boxes, targets)
        gt_boxes, gt_labels = inputs.gt_boxes, inputs.gt_labels
        assignment, assign_timer = timed_assign(self.assigner, inputs)
        info: dict[str, Any] = {"assign_ms": assign_timer, "inputs": inputs, "assignment": assignment}
        gt_index = self._ignore_crowd_negatives(assignment.gt_index, anchors, targets)

        # Positives: (P,) image and anchor indices, their GT boxes and labels. The loss's one host read (on
        # CUDA, a synchronisation), kept because P sizes every per-positive tensor below.
        pos_image, pos_anchor = torch.nonzero(gt_index >= 0, as_tuple=True)
        pos_gt = gt_index[pos_image, pos_anchor]
        pos_gt_boxes = gt_boxes[pos_image, pos_gt]
        pos_labels = gt_labels[pos_image, pos_gt]
        pos_anchors = anchors[pos_anchor]
        pos_pred_boxes = self.box_coder.decode(out.box_deltas[pos_image, pos_anchor], pos_anchors)  # (P, 4), grad

        pos = (pos_image, pos_anchor, pos_labels)
        cls_pos_targets, quality_targets = self._positive_targets(assignment, pos, self.scorer.targets(
            pos_anchors, pos_pred_boxes.detach(), pos_gt_boxes
        ))
        # Kept on the device (float32, the losses' dtype): nothing in the step waits for these values.
        num_pos_avg, quality_sum_avg = (
            norm.float() for norm in device_loss_normalizers(pos_anchor.numel(), quality_targets.sum().detach())
        )
        cls_logits = out.cls_logits.float()
        loss_cls = self._classification_loss(cls_logits, gt_index, pos, cls_pos_targets, num_pos_avg)

        # PAA Sec. 3.3: box loss weighted by the (detached) quality target, normalised by its sum.
        giou = generalized_box_iou_loss(pos_pred_boxes.float(), pos_gt_boxes, reduction="none")
        loss_box = (giou * quality_targets).sum() / quality_sum_avg

        if out.quality is not None:
            quality_logits = out.quality[pos_image, pos_anchor].float()
            loss_quality = (
                F.binary_cross_entropy_with_logits(quality_logits, quality_targets, reduction="sum") / num_pos_avg
            )
        else:
            loss_quality = cls_logits.new_zeros(())

        losses = {
            "loss_cls": loss_cls * self.scorer.cls_weight,
            "loss_box": loss_box * self.scorer.box_weight,
            "loss_quality": loss_quality * self.scorer.quality_weight,
        }
        return losses, info
