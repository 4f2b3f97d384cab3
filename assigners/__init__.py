"""Label assigners for dense detectors: pure, batched functions of tensors.

    a = assigners.build("paa", scheme="c", topk=9)
    out = a(assigners.AssignInputs(...))
    out.gt_index  # (B, A): >= 0 GT index, -1 negative, -2 ignored

Each assigner registers itself with ``@register_assigner(name, uses_predictions=...)`` next to
its class.

Box convention, a deliberate difference from the official PAA/ATSS code: coordinates are
continuous (torchvision's ``box_iou``: width = x2 - x1), where maskrcnn-benchmark adds 1 pixel to
every width and height in its IoU and box coding; the continuous convention is the one torchvision,
detectron2 and pycocotools use, and the difference matters most for small boxes.

Every module of this package is imported below, so a new assigner is one new module
(plus its Hydra config and its test): nothing here needs an edit for it to be registered.
"""

from __future__ import annotations

import importlib as _importlib
import pkgutil as _pkgutil

from .anchor_score import AnchorLoss, CandidateAssigner, Candidates, anchor_loss, select_candidates
from .atss import ATSSAssigner
from .base import (
    IGNORED,
    NEGATIVE,
    Assigner,
    AssignInputs,
    Assignment,
    assignment_stats,
    gt_anchor_iou,
)
from .fixed import FixedNumPositivesAssigner, FixedScoreAssigner
from .geometry import batched_box_iou, box_centers, centers_inside_boxes
from .gmm import GMMFit, fit_gmm, fit_gmm_batched, fit_gmm_sklearn
from .max_iou import MaxIoUAssigner, max_iou_match
from .paa import PAA_SCHEMES, PAAAssigner, separate_candidates, split_by_scheme
from .registry import assigner_class, available, build, register_assigner

for _module in _pkgutil.iter_modules(__path__):
    _importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "IGNORED",
    "NEGATIVE",
    "PAA_SCHEMES",
    "ATSSAssigner",
    "AnchorLoss",
    "AssignInputs",
    "Assigner",
    "Assignment",
    "CandidateAssigner",
    "Candidates",
    "FixedNumPositivesAssigner",
    "FixedScoreAssigner",
    "GMMFit",
    "MaxIoUAssigner",
    "PAAAssigner",
    "anchor_loss",
    "assigner_class",
    "assignment_stats",
    "available",
    "batched_box_iou",
    "box_centers",
    "build",
    "centers_inside_boxes",
    "fit_gmm",
    "fit_gmm_batched",
    "fit_gmm_sklearn",
    "gt_anchor_iou",
    "max_iou_match",
    "register_assigner",
    "select_candidates",
    "separate_candidates",
    "split_by_scheme",
]
