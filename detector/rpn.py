"""The region proposal network of the two-stage detector, with its anchors labelled by any assigner of ours.

``AssignedRPN`` is torchvision's ``RegionProposalNetwork`` whose anchor matching
(``assign_targets_to_anchors``, torchvision's ``Matcher(0.7, 0.3, True)``) is replaced by an assigner:
the RPN is a class-agnostic dense detector (C = 1), so its objectness logits are the assigner's
``cls_logits`` (B, A, 1), its decoded boxes the ``pred_boxes``, and every GT has label 0. Labels follow
torchvision: 1 where the assigner says positive, 0 negative, -1 ignored; the assigner's
``soft_target`` is not used (objectness targets stay hard).

What follows the official PAA-RPN (kkhoot/PAA_Faster-RCNN, ``rpn.py`` / ``rpn_outputs.py``):
- training samples 256 anchors per image, half positive at most, from the assigner's labels, PAA
  included: the official ``RPNOutputs.losses`` resamples the PAA labels (``use_resample=True``);
- an optional IoU branch (``RPNHeadWithIoU``): per anchor, a 3x3 conv on the shared RPN feature; its
  target is the IoU of the detached decoded box with the matched GT, learnt by BCE over the sampled
  positives divided by their number, and the box loss of each positive is weighted by that target;
- with the IoU branch, proposals are ranked by the unified score sqrt(sigmoid(objectness) *
  sigmoid(iou)), passed on as its logit (``unified_logits``), as the official
  ``predict_objectness_logits``.
Losses otherwise as torchvision's RPN (``compute_loss``): BCE over the sampled anchors (mean),
smooth L1 (beta 1/9) of the positives' deltas summed and divided by the sampled count. detectron2's
RPN, the official baseline, uses L1 (beta 0) and divides both sums by 256 x images; the library this
model is built on is kept for every variant, so the comparison is unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import AnchorGenerator, RegionProposalNetwork, RPNHead

from assigners import IGNORED, AssignInputs, Assignment

from .losses import AssignTimer, build_assign_inputs, pad_targets, timed_assign
from .model import DetectorOutput
from .scorers import predicted_box_iou

SMOOTH_L1_BETA = 1.0 / 9.0  # torchvision's RPN


class RPNHeadWithIoU(RPNHead):
    """torchvision's ``RPNHead`` (``conv_depth`` 3x3 convs, then per anchor a 1x1 objectness logit and
    four deltas) with an optional IoU branch: a 3x3 conv on the same feature, one logit per anchor
    (the official ``StandardRPNHead.iou``, left at PyTorch's default init as there).

    ``forward(features)`` -> (objectness [(B, K, H_l, W_l)], deltas [(B, 4K, H_l, W_l)], iou
    [(B, K, H_l, W_l)] or None), K anchors per location.
    """

    def __init__(self, in_channels: int, num_anchors: int, conv_depth: int = 1, use_iou: bool = False):
        super().__init__(in_channels, num_anchors, conv_depth)  # initialises its convs: normal(0.01), bias 0
        self.iou_pred = torch.nn.Conv2d(in_channels, num_anchors, 3, padding=1) if use_iou else None

    def forward(self, x: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        logits, deltas, ious = [], [], []
        for feature in x:
            shared = self.conv(feature)
            logits.append(self.cls_logits(shared))
            deltas.append(self.bbox_pred(shared))
            if self.iou_pred is not None:
                ious.append(self.iou_pred(shared))
        return logits, deltas, (ious if self.iou_pred is not None else None)


def flatten_anchor_maps(maps: list[Tensor], channels: int) -> Tensor:
    """[(B, K * channels, H_l, W_l)] -> (B, A, channels), A = sum of H_l * W_l * K, in the anchor order
    of torchvision's ``AnchorGenerator`` (levels, then rows, columns, anchors of a location)."""
    flat = []
    for level in maps:
        b, _, h, w = level.shape
        flat.append(level.view(b, -1, channels, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, channels))
    return torch.cat(flat, dim=1)


def unified_logits(objectness: Tensor, iou: Tensor) -> Tensor:
    """Logit of sqrt(sigmoid(objectness) * sigmoid(iou)), elementwise (the official RPN's unified score,
    ``predict_objectness_logits``), from log-sigmoids so that no probability underflows; +inf where the
    score rounds to 1."""
    log_score = 0.5 * (F.logsigmoid(objectness) + F.logsigmoid(iou))
    return log_score - torch.log(-torch.expm1(log_score))


def class_agnostic(targets: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """The targets with every GT labelled 0: the RPN's single class (C = 1)."""
    return [{"boxes": t["boxes"], "labels": torch.zeros(t["boxes"].shape[0], dtype=torch.int64,
                                                        device=t["boxes"].device)} for t in targets]


def labels_and_matched_boxes(inputs: AssignInputs, assignment: Assignment) -> tuple[Tensor, Tensor]:
    """torchvision's RPN targets from an assignment: (B, A) float labels (1 positive, 0 negative, -1
    ignored) and (B, A, 4) the box of each anchor's GT; where the anchor has none, the image's first GT
    (torchvision's ``matched_idxs.clamp(min=0)``), or zeros in an image without GT."""
    gt_index = assignment.gt_index
    labels = (gt_index >= 0).to(inputs.gt_boxes.dtype)
    labels[gt_index == IGNORED] = -1.0
    b, a = gt_index.shape
    if inputs.num_gt_slots == 0:
        return labels, inputs.gt_boxes.new_zeros(b, a, 4)
    index = gt_index.clamp(min=0).unsqueeze(-1).expand(b, a, 4)
    matched = inputs.gt_boxes.gather(1, index)
    return labels, matched.masked_fill(~inputs.gt_mask.any(dim=1).view(b, 1, 1), 0.0)


class AssignedRPN(RegionProposalNetwork):
    """torchvision's ``RegionProposalNetwork`` with anchor labels from ``assigner``; see the module docstring.

    anchor_generator, head: torchvision's ``AnchorGenerator`` and an ``RPNHeadWithIoU``.
    assigner: any ``AssignInputs -> Assignment`` callable (``assigners.build(...)``); prediction-aware
        ones (PAA) score anchors by the detached objectness and decoded boxes.
    The other arguments are torchvision's; the IoU thresholds of its matcher are not used.

    ``predict(images, features)`` gives the dense outputs and the proposals; ``loss(out, targets)`` the
    RPN losses; ``forward(images, features, targets)`` is torchvision's contract, both together.
    """

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHeadWithIoU,
        assigner: Callable[[AssignInputs], Assignment] | None,
        *,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        nms_thresh: float = 0.7,
        score_thresh: float = 0.0,
    ):
        super().__init__(anchor_generator, head, 0.7, 0.3, batch_size_per_image, positive_fraction,
                         pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh)
        del self.proposal_matcher  # replaced by the assigner
        self.assigner = assigner

    @property
    def use_iou(self) -> bool:
        return self.head.iou_pred is not None

    def decode(self, out: DetectorOutput) -> Tensor:
        """(B, A, 4) xyxy boxes from the RPN's deltas (torchvision's box coder, weights 1; keeps grad)."""
        b, a = out.box_deltas.shape[:2]
        anchors = out.anchors.unsqueeze(0).expand(b, a, 4)
        return self.box_coder.decode_single(out.box_deltas.reshape(-1, 4), anchors.reshape(-1, 4)).view(b, a, 4)

    def predict(self, images: ImageList, features: list[Tensor]) -> tuple[DetectorOutput, list[Tensor], list[Tensor]]:
        """Dense outputs (float32) and proposals of a batch whose images share the padded size.

        Returns a ``DetectorOutput`` (objectness ``cls_logits`` (B, A, 1), ``box_deltas`` (B, A, 4), IoU
        logits ``quality`` (B, A) or None, ``anchors`` (A, 4), anchors and stride of each level) and, per
        image, the proposal boxes (N_i, 4) and their scores (N_i,), detached, best first.
        """
        objectness, deltas, ious = self.head(features)
        objectness = flatten_anchor_maps(objectness, 1).float()
        deltas = flatten_anchor_maps(deltas, 4).float()
        iou = flatten_anchor_maps(ious, 1).float().squeeze(-1) if ious is not None else None
        # Anchors in float32 whatever the features' dtype (they take it: bf16 under autocast).
        shapes = [torch.empty(f.shape[-2:], dtype=torch.float32, device=f.device) for f in features]
        anchors = self.anchor_generator(ImageList(images.tensors[:1], images.image_sizes[:1]), shapes)[0]
        per_location = self.anchor_generator.num_anchors_per_location()
        num_anchors_per_level = [int(f.shape[-2] * f.shape[-1]) * k for f, k in zip(features, per_location)]
        strides = [int(images.tensors.shape[-2] // f.shape[-2]) for f in features]
        out = DetectorOutput(objectness, deltas, iou, anchors, num_anchors_per_level, strides)

        ranking = objectness.detach().squeeze(-1)
        if iou is not None:
            ranking = unified_logits(ranking, iou.detach())
        proposals = self.decode(out).detach()
        boxes, scores = self.filter_proposals(proposals, ranking, images.image_sizes, num_anchors_per_level)
        return out, boxes, scores

    def _assign(self, anchors: Tensor, targets: list[dict[str, Tensor]],
                out: DetectorOutput | None) -> tuple[AssignInputs, Assignment, AssignTimer]:
        """The assigner's view of the batch (class-agnostic GT), its assignment and timing."""
        if out is None:  # torchvision's call: one level, no predictions
            gt_boxes, gt_labels, gt_mask = pad_targets(class_agnostic(targets), anchors.device)
            inputs = AssignInputs(anchors, [anchors.shape[0]], gt_boxes, gt_labels, gt_mask)
        else:
            inputs = build_assign_inputs(out, self.decode(out), class_agnostic(targets))
        assignment, timer = timed_assign(self.assigner, inputs)
        return inputs, assignment, timer

    def assign_targets_to_anchors(
        self, anchors: list[Tensor], targets: list[dict[str, Tensor]], out: DetectorOutput | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's contract: per image, labels (A,) float (1 / 0 / -1) and matched GT boxes (A, 4).

        anchors: per image (A, 4), all equal (the images share a padded size). Called as torchvision
        calls it, without ``out``, the assigner sees one level and no predictions (enough for MaxIoU);
        with the RPN's dense outputs ``out`` it sees their levels, strides and detached predictions.
        """
        inputs, assignment, _ = self._assign(anchors[0], targets, out)
        labels, matched = labels_and_matched_boxes(inputs, assignment)
        return list(labels.unbind(0)), list(matched.unbind(0))

    def loss(self, out: DetectorOutput, targets: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """RPN losses of a batch: ``loss_cls`` (objectness), ``loss_box``, ``loss_quality`` (IoU branch; 0
        without one); and ``info`` as ``DetectionLoss`` gives it (``assign_ms``, ``inputs``, ``assignment``)."""
        inputs, assignment, timer = self._assign(out.anchors, targets, out)
        labels, matched = labels_and_matched_boxes(inputs, assignment)
        sampled_pos, sampled_neg = self.fg_bg_sampler(list(labels.unbind(0)))
        positive = torch.stack(sampled_pos).bool()
        sampled = positive | torch.stack(sampled_neg).bool()
        num_sampled = max(int(sampled.sum()), 1)

        loss_cls = F.binary_cross_entropy_with_logits(out.cls_logits[..., 0][sampled], labels[sampled],
                                                      reduction="sum") / num_sampled
        pos_image, pos_anchor = positive.nonzero(as_tuple=True)
        pos_gt = matched[pos_image, pos_anchor]
        regression_targets = self.box_coder.encode_single(pos_gt, out.anchors[pos_anchor])
        box = F.smooth_l1_loss(out.box_deltas[pos_image, pos_anchor], regression_targets, beta=SMOOTH_L1_BETA,
                               reduction="none").sum(dim=1)
        loss_quality = out.cls_logits.new_zeros(())
        if out.quality is not None:
            # PAA_Faster-RCNN rpn_losses: the box loss of each positive weighted by its IoU target.
            iou_target = predicted_box_iou(inputs.pred_boxes[pos_image, pos_anchor], pos_gt)
            box = box * iou_target
            loss_quality = F.binary_cross_entropy_with_logits(
                out.quality[pos_image, pos_anchor], iou_target, reduction="sum") / max(pos_image.numel(), 1)
        losses = {"loss_cls": loss_cls, "loss_box": box.sum() / num_sampled, "loss_quality": loss_quality}
        return losses, {"assign_ms": timer, "inputs": inputs, "assignment": assignment}

    def forward(
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        """torchvision's contract: (proposal boxes per image, losses in training)."""
        out, boxes, _ = self.predict(images, list(features.values()))
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets should not be None")
            losses, _ = self.loss(out, targets)
        return boxes, losses


__all__ = [
    "AssignedRPN",
    "RPNHeadWithIoU",
    "class_agnostic",
    "flatten_anchor_maps",
    "labels_and_matched_boxes",
    "unified_logits",
]
