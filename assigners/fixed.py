"""Fixed-rule baselines on PAA's anchor score, as in the PAA paper's ablation of assignment rules.

Both use exactly PAA's anchor loss (Eq. 1-2) and PAA's candidates (per GT and level, the
``topk`` lowest-loss IoU-pre-matched anchors; ``CandidateAssigner``), and replace the GMM
separation with a fixed rule:
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

from .anchor_score import CandidateAssigner, rank_within_group
from .base import NEGATIVE, AssignInputs, Assignment, check_positive_int
from .registry import register_assigner


@register_assigner("fnp", uses_predictions=True)
class FixedNumPositivesAssigner(CandidateAssigner):
    """``fnp``: per GT, the ``num_pos`` lowest-loss of PAA's candidates are positive."""

    def __init__(
        self,
        num_pos: int = 9,
        topk: int = 9,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        giou_weight: float = 1.0,
    ):
        check_positive_int(num_pos, "num_pos")
        super().__init__(topk, focal_alpha, focal_gamma, giou_weight)
        self.num_pos = num_pos

    def assign(self, inputs: AssignInputs) -> Assignment:
        losses, candidates = self.score_candidates(inputs)
        rank = rank_within_group(losses.loss, candidates.gt, candidates.mask, inputs.num_gt_slots)
        positive = candidates.mask & (rank < self.num_pos)
        gt_index = torch.where(positive, candidates.gt, NEGATIVE)
        return Assignment(gt_index=gt_index, num_candidates=candidates.num_candidates)


@register_assigner("fsr", uses_predictions=True)
class FixedScoreAssigner(CandidateAssigner):
    """``fsr``: PAA's candidates with score exp(-loss) >= ``min_score`` are positive."""

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

    def assign(self, inputs: AssignInputs) -> Assignment:
        losses, candidates = self.score_candidates(inputs)
        positive = candidates.mask & (losses.score >= self.min_score)
        gt_index = torch.where(positive, candidates.gt, NEGATIVE)
        return Assignment(gt_index=gt_index, num_candidates=candidates.num_candidates)


__all__ = ["FixedNumPositivesAssigner", "FixedScoreAssigner"]
