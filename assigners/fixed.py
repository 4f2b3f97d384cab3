"""Fixed-rule baselines on PAA's anchor score, as in the PAA paper's ablation of assignment rules.

Both use exactly PAA's anchor loss (Eq. 1-2) and PAA's candidates (per GT and level, the
``topk`` lowest-loss IoU-pre-matched anchors), and replace the GMM separation with a
fixed rule:
- ``fnp`` (fixed number of positives): per GT, its ``num_pos`` lowest-loss candidates
  are positive (ties: lower anchor index), the rest of its candidates negative;
- ``fsr`` (fixed positive score range): candidates with score S = exp(-loss) >= ``min_score`` are
  positive, the rest negative. A GT may get no positive; it is kept and counted (see
  ``assignment_stats``' gt_without_pos), never given a fallback positive.
Non-candidate anchors are negative. Candidate sets of different GTs are disjoint (each
anchor has one pre-matched GT), so no anchor is claimed twice.
"""

from __future__ import annotations

import torch

from .anchor_score import anchor_loss, check_anchor_loss_params, check_topk, rank_within_group, select_candidates
from .base import NEGATIVE, AssignInputs, Assignment


class _CandidateRuleAssigner:
    """Shared parameters and candidate selection of ``fnp`` and ``fsr``."""

    name = ""

    def __init__(self, topk: int, focal_alpha: float, focal_gamma: float, giou_weight: float):
        check_topk(topk)
        check_anchor_loss_params(focal_alpha, focal_gamma, giou_weight)
        self.topk = topk
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.giou_weight = giou_weight

    def _candidates(self, inputs: AssignInputs):
        inputs.require_predictions(self.name)
        losses = anchor_loss(
            inputs, focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma, giou_weight=self.giou_weight
        )
        return losses, select_candidates(losses, inputs.num_anchors_per_level, self.topk, inputs.num_gt_slots)


class FixedNumPositivesAssigner(_CandidateRuleAssigner):
    """``fnp``: per GT, the ``num_pos`` lowest-loss of PAA's candidates are positive."""

    name = "fnp"

    def __init__(
        self,
        num_pos: int = 9,
        topk: int = 9,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        giou_weight: float = 1.0,
    ):
        check_topk(num_pos, "num_pos")
        super().__init__(topk, focal_alpha, focal_gamma, giou_weight)
        self.num_pos = num_pos

    @torch.no_grad()
    def __call__(self, inputs: AssignInputs) -> Assignment:
        losses, candidates = self._candidates(inputs)
        rank = rank_within_group(losses.loss, candidates.gt, candidates.mask, inputs.num_gt_slots)
        positive = candidates.mask & (rank < self.num_pos)
        gt_index = torch.where(positive, candidates.gt, NEGATIVE)
        return Assignment(gt_index=gt_index, num_candidates=candidates.num_candidates)


class FixedScoreAssigner(_CandidateRuleAssigner):
    """``fsr``: PAA's candidates with score exp(-loss) >= ``min_score`` are positive."""

    name = "fsr"

    def __init__(
        self,
        min_score: float = 0.2,
        topk: int = 9,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        giou_weight: float = 1.0,
    ):
        if not 0.0 < min_score <= 1.0:
            raise ValueError(f"min_score must be in (0, 1], got {min_score}")
        super().__init__(topk, focal_alpha, focal_gamma, giou_weight)
        self.min_score = min_score

    @torch.no_grad()
    def __call__(self, inputs: AssignInputs) -> Assignment:
        losses, candidates = self._candidates(inputs)
        positive = candidates.mask & (losses.score >= self.min_score)
        gt_index = torch.where(positive, candidates.gt, NEGATIVE)
        return Assignment(gt_index=gt_index, num_candidates=candidates.num_candidates)


__all__ = ["FixedNumPositivesAssigner", "FixedScoreAssigner"]
