"""Faster R-CNN (torchvision's ``FasterRCNN``) whose RPN anchors are labelled by any assigner of ours.

The PAA paper's second setting (kkhoot/PAA_Faster-RCNN: Faster R-CNN R-50-FPN 1x, 37.99 -> 39.29 AP
with PAA and IoU prediction in the RPN). The parts:
- backbone: our ``ResNetBackbone`` (C2-C5; torchvision weights, a ``.pt`` file such as the
  digits-pretrained one, frozen stages) and torchvision's ``FeaturePyramidNetwork`` with P6 = max-pool
  of P5 (``LastLevelMaxPool``), the FPN of detectron2's and torchvision's Faster R-CNN: P2-P6;
- RPN: ``AssignedRPN`` (``detector.rpn``) with one anchor size per level and three aspect ratios;
- box head: torchvision's ``RoIHeads`` (``MultiScaleRoIAlign`` over P2-P5, ``TwoMLPHead``,
  ``FastRCNNPredictor``), as ``FasterRCNN`` assembles them.

It fits the trainer's contract, ``model(images) -> output`` then ``criterion(output, targets)``:
``forward`` runs the backbone and the RPN (and, in eval mode, the box head: the output then holds
the detections); ``TwoStageLoss`` assigns the anchors, computes the RPN losses and runs the box
head's training step, which needs the targets. ``postprocess`` returns the detections of an eval
output, so the evaluation runs it like the single-stage model.

Departures from torchvision's ``FasterRCNN.forward``: images arrive resized and padded by the data
pipeline (its ``GeneralizedRCNNTransform`` is not used; ``forward`` normalises as ``Detector``), so
proposals and boxes are clipped to the padded size (``postprocess`` clips the detections again to
each image's own size); the box head runs in float32 outside autocast, so bf16 never rounds boxes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from assigners import AssignInputs, Assignment

from .backbone import ResNetBackbone
from .model import DetectorOutput
from .rpn import AssignedRPN, RPNHeadWithIoU
from .scorers import Scorer

ROI_FEATURES = ("0", "1", "2", "3")  # P2-P5, the names torchvision's RoI pooling reads by default


@dataclass
class TwoStageOutput(DetectorOutput):
    """The RPN's dense outputs (the ``DetectorOutput`` fields, C = 1: objectness ``cls_logits``
    (B, A, 1), ``quality`` the IoU logits or None) and what the box head needs or gave.

    features: the pyramid, {"0": P2, ..., "3": P5, "pool": P6}.
    image_size: (H, W) of the padded batch.
    proposals, proposal_scores: per image, (N_i, 4) xyxy proposal boxes and (N_i,) their scores.
    detections: in eval mode, per image {"boxes" (D, 4), "scores" (D,), "labels" (D,) in [0, C)}; else None.
    """

    features: OrderedDict[str, Tensor]
    image_size: tuple[int, int]
    proposals: list[Tensor]
    proposal_scores: list[Tensor]
    detections: list[dict[str, Tensor]] | None = None


class PyramidBackbone(nn.Module):
    """ResNet C2-C5 -> FPN P2-P5 plus P6 = max-pool(P5); ``out_channels`` as ``FasterRCNN`` asks."""

    def __init__(self, backbone: ResNetBackbone, out_channels: int):
        super().__init__()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork([backbone.out_channels[level] for level in (2, 3, 4, 5)], out_channels,
                                         extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        maps = self.body(images).values()
        return self.fpn(OrderedDict(zip(ROI_FEATURES, maps)))


class TwoStageDetector(FasterRCNN):
    """Faster R-CNN R-FPN with an assigner in its RPN; see the module docstring.

    num_classes: C (the box head adds the background class).
    backbone, weights, norm, frozen_stages: as ``Detector`` (``ResNetBackbone``).
    fpn_channels: channels of the pyramid and of the RPN head.
    num_convs: 3x3 convs of the RPN head (1 in Faster R-CNN).
    anchor_sizes: one anchor size in pixels per level P2-P6; aspect_ratios: h / w of the anchors of a location.
    use_quality: the RPN's IoU branch (the engine sets it from the scorer: ``iou`` has one, ``none`` not).
    rpn_assigner: the assigner of the RPN's anchors (the run's ``assigner``); None for inference only.
    rpn_*: torchvision's RPN settings (top-n per level before NMS, per image after).
    representation_size: width of the box head's two fully connected layers.
    box_*: torchvision's ``RoIHeads`` settings.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        weights: str | None = None,
        norm: str = "frozen_bn",
        frozen_stages: int = 1,
        fpn_channels: int = 256,
        num_convs: int = 1,
        anchor_sizes: tuple[float, ...] = (32, 64, 128, 256, 512),
        aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
        use_quality: bool = False,
        rpn_assigner: Callable[[AssignInputs], Assignment] | None = None,
        rpn_batch_size_per_image: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_pre_nms_top_n_train: int = 2000,
        rpn_pre_nms_top_n_test: int = 1000,
        rpn_post_nms_top_n_train: int = 1000,
        rpn_post_nms_top_n_test: int = 1000,
        rpn_nms_thresh: float = 0.7,
        representation_size: int = 1024,
        box_score_thresh: float = 0.05,
        box_nms_thresh: float = 0.5,
        box_detections_per_img: int = 100,
        box_batch_size_per_image: int = 512,
        box_positive_fraction: float = 0.25,
        pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225),
    ):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        anchor_sizes = tuple(float(size) for size in anchor_sizes)
        if len(anchor_sizes) != 5:
            raise ValueError(f"anchor_sizes needs one size per level P2-P6 (5), got {list(anchor_sizes)}")
        if num_convs < 1:
            raise ValueError(f"num_convs must be >= 1, got {num_convs}")
        body = ResNetBackbone(backbone, weights=weights, norm=norm, frozen_stages=frozen_stages,
                              return_levels=(2, 3, 4, 5))
        anchor_generator = AnchorGenerator(tuple((size,) for size in anchor_sizes),
                                           (tuple(float(r) for r in aspect_ratios),) * len(anchor_sizes))
        head = RPNHeadWithIoU(fpn_channels, anchor_generator.num_anchors_per_location()[0], num_convs, use_quality)
        super().__init__(
            PyramidBackbone(body, fpn_channels), num_classes=None, rpn_anchor_generator=anchor_generator,
            rpn_head=head, box_head=TwoMLPHead(fpn_channels * 7**2, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
            box_score_thresh=box_score_thresh, box_nms_thresh=box_nms_thresh,
            box_detections_per_img=box_detections_per_img, box_batch_size_per_image=box_batch_size_per_image,
            box_positive_fraction=box_positive_fraction, image_mean=list(pixel_mean), image_std=list(pixel_std),
        )
        self.rpn = AssignedRPN(
            anchor_generator, head, rpn_assigner, batch_size_per_image=rpn_batch_size_per_image,
            positive_fraction=rpn_positive_fraction,
            pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
            post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
            nms_thresh=rpn_nms_thresh,
        )
        self.num_classes = num_classes
        self.size_divisibility = 64  # the stride of P6: every level's stride is then exact
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), persistent=False)

    @property
    def use_quality(self) -> bool:
        return self.rpn.use_iou

    def decode(self, out: DetectorOutput) -> Tensor:
        """(B, A, 4) xyxy boxes of the RPN's anchors from its deltas (keeps grad)."""
        return self.rpn.decode(out)

    def forward(self, images: Tensor, targets: Any = None) -> TwoStageOutput:
        """``images`` (B, 3, H, W) float in [0, 1], padded to ``size_divisibility`` -> ``TwoStageOutput``;
        in eval mode with the detections of the box head."""
        if targets is not None:
            raise ValueError("TwoStageDetector.forward takes images only; the targets go to TwoStageLoss")
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        size = (int(images.shape[-2]), int(images.shape[-1]))
        image_list = ImageList((images - self.pixel_mean) / self.pixel_std, [size] * images.shape[0])
        features = self.backbone(image_list.tensors)
        out, proposals, scores = self.rpn.predict(image_list, list(features.values()))
        detections = None
        if not self.training:
            detections = self._detect(features, proposals, image_list.image_sizes)
        return TwoStageOutput(out.cls_logits, out.box_deltas, out.quality, out.anchors, out.num_anchors_per_level,
                              out.strides, features, size, proposals, scores, detections)

    def _box_head(self, features: OrderedDict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]],
                  targets: list[dict[str, Tensor]] | None = None):
        """torchvision's ``RoIHeads`` in float32, outside autocast."""
        floats = OrderedDict((name, feature.float()) for name, feature in features.items())
        with torch.autocast(floats["0"].device.type, enabled=False):
            return self.roi_heads(floats, proposals, image_sizes, targets)

    def _detect(self, features, proposals, image_sizes) -> list[dict[str, Tensor]]:
        detections, _ = self._box_head(features, proposals, image_sizes)
        return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - 1} for d in detections]

    def box_head_losses(self, out: TwoStageOutput, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The box head's training losses on the output's proposals (torchvision samples 512 RoIs per image, a
        quarter positive, GT boxes added): ``loss_roi_cls`` (cross-entropy), ``loss_roi_box`` (smooth L1)."""
        roi_targets = [{"boxes": t["boxes"].float(), "labels": t["labels"].to(torch.int64) + 1} for t in targets]
        _, losses = self._box_head(out.features, out.proposals, [out.image_size] * len(targets), roi_targets)
        return {"loss_roi_cls": losses["loss_classifier"], "loss_roi_box": losses["loss_box_reg"]}


class TwoStageLoss:
    """The trainer's criterion for ``TwoStageDetector``: ``loss(out, targets) -> (losses, info)``.

    losses: the RPN's ``loss_cls`` (objectness), ``loss_box``, ``loss_quality`` (the ``stats.csv`` loss
    columns: the part the assigner trains) and the box head's ``loss_roi_cls``, ``loss_roi_box``; each
    weighs 1, as in torchvision, detectron2 and the official PAA-RPN (the scorer's loss weights, those
    of the single-stage head, are not applied). info: ``assign_ms``, ``inputs``, ``assignment`` of the
    RPN, as ``DetectionLoss`` gives them. Targets are dicts with ``boxes`` (G_i, 4) xyxy and ``labels``
    (G_i,) in [0, C).

    scorer: ``none`` (no IoU branch) or ``iou`` (the RPN's IoU branch, PAA_Faster-RCNN): the RPN's quality
    branch predicts IoU only; it must match the model's ``use_quality``.
    """

    def __init__(self, model: TwoStageDetector, scorer: Scorer):
        if scorer.quality_in_classification or (scorer.has_quality_branch and not scorer.predicts_iou):
            raise ValueError(f"scorer '{scorer.name}' is not available to the two-stage model: its RPN predicts "
                             "IoU (scorer=iou) or nothing (scorer=none)")
        if scorer.has_quality_branch != model.use_quality:
            raise ValueError(f"scorer '{scorer.name}' {'needs' if scorer.has_quality_branch else 'does not use'} the "
                             f"RPN's IoU branch; build the model with use_quality={scorer.has_quality_branch}")
        if model.rpn.assigner is None:
            raise ValueError("the two-stage model has no RPN assigner to train with (rpn_assigner=None)")
        self.model = model
        self.scorer = scorer

    def __call__(self, out: TwoStageOutput, targets: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if len(targets) != out.cls_logits.shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {out.cls_logits.shape[0]} images")
        losses, info = self.model.rpn.loss(out, targets)
        losses.update(self.model.box_head_losses(out, targets))
        return losses, info


__all__ = ["PyramidBackbone", "TwoStageDetector", "TwoStageLoss", "TwoStageOutput"]
