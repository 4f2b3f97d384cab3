"""Label assigners for dense detectors: pure, batched functions of tensors.

    a = assigners.build("paa", scheme="c", topk=9)
    out = a(assigners.AssignInputs(...))
    out.gt_index  # (B, A): >= 0 GT index, -1 negative, -2 ignored
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .anchor_score import AnchorLoss, Candidates, anchor_loss, select_candidates
from .atss import ATSSAssigner
from .base import (
    IGNORED,
    NEGATIVE,
    AssignInputs,
    Assignment,
    assignment_stats,
    batched_box_iou,
    gt_anchor_iou,
)
from .fixed import FixedNumPositivesAssigner, FixedScoreAssigner
from .gmm import GMMFit, fit_gmm, fit_gmm_batched, fit_gmm_sklearn
from .max_iou import MaxIoUAssigner, max_iou_match
from .paa import PAA_SCHEMES, PAAAssigner, separate_candidates, split_by_scheme

_REGISTRY: dict[str, Callable[..., Any]] = {
    "iou": MaxIoUAssigner,
    "atss": ATSSAssigner,
    "paa": PAAAssigner,
    "fnp": FixedNumPositivesAssigner,
    "fsr": FixedScoreAssigner,
}


def register(name: str, factory: Callable[..., Any]) -> None:
    _REGISTRY[name] = factory


def available() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, **kwargs: Any):
    """Build an assigner by name with its plain keyword parameters."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown assigner '{name}'; valid choices: {', '.join(available())}")
    return _REGISTRY[name](**kwargs)


__all__ = [
    "IGNORED",
    "NEGATIVE",
    "PAA_SCHEMES",
    "ATSSAssigner",
    "AnchorLoss",
    "AssignInputs",
    "Assignment",
    "Candidates",
    "FixedNumPositivesAssigner",
    "FixedScoreAssigner",
    "GMMFit",
    "MaxIoUAssigner",
    "PAAAssigner",
    "anchor_loss",
    "assignment_stats",
    "available",
    "batched_box_iou",
    "build",
    "fit_gmm",
    "fit_gmm_batched",
    "fit_gmm_sklearn",
    "gt_anchor_iou",
    "max_iou_match",
    "register",
    "select_candidates",
    "separate_candidates",
    "split_by_scheme",
]
