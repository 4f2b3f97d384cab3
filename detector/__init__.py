"""The shared dense detector: backbone, FPN, head, anchors, box coder, losses, scorers, inference.

Typical use::

    model = Detector(num_classes=80, backbone="resnet50", weights="ResNet50_Weights.IMAGENET1K_V1")
    out = model(images)  # DetectorOutput
    losses, info = DetectionLoss(assigner, build_scorer("iou"), 80)(out, targets)  # weights: the scorer's
    detections = postprocess(out, image_sizes, build_scorer("iou"), score_voting=True)

The two-stage model (Faster R-CNN with any assigner in its RPN) follows the same steps::

    model = TwoStageDetector(num_classes=80, rpn_assigner=assigner)
    losses, info = TwoStageLoss(model, build_scorer("none"))(model(images), targets)
"""

from .anchors import make_anchors
from .backbone import ResNetBackbone, group_norm, num_groups_for
from .box_coder import BoxCoder
from .fpn import FPN
from .head import DenseHead, Scale, flatten_levels
from .losses import (
    AssignTimer,
    DetectionLoss,
    build_assign_inputs,
    crowd_overlap,
    device_loss_normalizers,
    pad_boxes,
    pad_targets,
    timed_assign,
)
from .model import Detector, DetectorOutput
from .postprocess import postprocess, score_vote
from .rpn import AssignedRPN, RPNHeadWithIoU
from .scorers import (
    SCORERS,
    CenternessScorer,
    IoUScorer,
    NoScorer,
    Scorer,
    available_scorers,
    build_scorer,
    centerness,
    elementwise_box_iou,
    register_scorer,
)
from .two_stage import TwoStageDetector, TwoStageLoss, TwoStageOutput

__all__ = [
    "AssignTimer",
    "AssignedRPN",
    "FPN",
    "SCORERS",
    "BoxCoder",
    "CenternessScorer",
    "DenseHead",
    "DetectionLoss",
    "Detector",
    "DetectorOutput",
    "IoUScorer",
    "NoScorer",
    "RPNHeadWithIoU",
    "ResNetBackbone",
    "Scorer",
    "Scale",
    "TwoStageDetector",
    "TwoStageLoss",
    "TwoStageOutput",
    "available_scorers",
    "build_assign_inputs",
    "build_scorer",
    "centerness",
    "crowd_overlap",
    "device_loss_normalizers",
    "elementwise_box_iou",
    "flatten_levels",
    "group_norm",
    "make_anchors",
    "num_groups_for",
    "pad_boxes",
    "pad_targets",
    "postprocess",
    "register_scorer",
    "score_vote",
    "timed_assign",
]
