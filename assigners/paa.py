"""Probabilistic Anchor Assignment (``paa``): Kim & Lee, ECCV 2020, Sec. 3.1 and Fig. 3.

1. Anchor loss of every anchor for its IoU-pre-matched GT (Eq. 1-2; ``anchor_score``).
2. Candidates: per GT and pyramid level, the ``topk`` lowest-loss pre-matched anchors.
3. Per GT, a two-component 1-D Gaussian mixture is fitted by EM to its candidates' losses
   sorted ascending (``gmm``); component 0 (initialised at the lowest loss) is foreground.
   ``gmm_dtype`` "float32" (default) fits as the official code does, which hands sklearn the
   float32 losses; "float64" fits in double precision (the labels of a few percent of GTs
   differ between the two on random candidate sets; ``gmm``'s tests measure it).
4. The candidates are split into positives / ignored / negatives by one of the paper's
   separation schemes (Fig. 3), ``scheme`` "a"-"d"; everything else is negative.

Separation schemes, on a GT's candidates sorted by ascending loss (positions 0..n-1),
with "fg peak" = the smallest position among foreground-labelled candidates of highest
mixture log-density (the official ``fg_max_idx``) and "bg peak" likewise for background:
  a: positive where the predicted component is foreground (p(fg) >= p(bg)), else negative.
  b: positive up to the fg peak; ignored strictly between the fg peak and the bg peak;
     negative from the bg peak on (no bg-labelled candidate: the rest is ignored).
  c: positive up to the fg peak, the rest negative (paper default, the official code).
  d: positive up to the fg peak; the rest ignored where labelled foreground, negative
     where labelled background.
  b_official: (b) as the only runnable official code of it (kkhoot/PAA before commit 65bde62):
     positive up to the fg peak; with a bg-labelled candidate, the last (p + 1) candidates
     negative, p the bg peak's position, and every other candidate ignored (positives win
     where the two overlap); without one, the rest negative. ``b`` keeps the paper's reading.
As in the official code, a GT with a single candidate gets it as positive, a GT whose
candidates all fall in the background component gets all of them as positive (for
recall), and a GT without candidates gets no positive (``Assignment.num_candidates``).

Conflicts: none can arise. Every anchor is pre-matched to at most one GT and candidates
are drawn from a GT's own pre-matched anchors, so the candidate sets of different GTs
are disjoint and each anchor receives at most one label. (The official code labels GTs
one after another; with disjoint sets its order does not matter either.)

Ties: equal losses are ordered by anchor index (stable sorts), so results are
deterministic and equal across devices and GMM backends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .anchor_score import AnchorLoss, CandidateAssigner, Candidates, group_rank
from .base import IGNORED, NEGATIVE, AssignInputs, Assignment
from .gmm import GMM_BACKENDS, GMM_DTYPES, fit_gmm
from .registry import register_assigner

PAA_SCHEMES = ("a", "b", "c", "d", "b_official")


@dataclass(frozen=True)
class CandidateRows:
    """Candidates of every GT slot as rows sorted by ascending loss.

    loss: (B * G, K) float64, row b * G + g holds GT g of image b; K is the most
        candidates a GT can have (sum over levels of min(topk, anchors in level)).
    mask: (B * G, K) bool, True on the first ``num_candidates`` entries of a row.
    position: (N,) int64 flat position (row * K + column) in ``loss`` of each entry of
        ``Candidates.index``.
    """

    loss: Tensor
    mask: Tensor
    position: Tensor


def sort_candidates(anchor_loss: AnchorLoss, candidates: Candidates, max_per_gt: int) -> CandidateRows:
    """Each GT's candidate losses as a row, sorted ascending (ties: anchor index).

    ``Candidates.index`` lists the candidates in this order already (GT row, loss, anchor); an
    entry's column is its position within its GT's run.
    """
    b, _ = anchor_loss.loss.shape
    g = candidates.num_candidates.shape[1]
    device = anchor_loss.loss.device
    position = candidates.row * max_per_gt + group_rank(candidates.row)
    loss = torch.zeros(b * g * max_per_gt, dtype=torch.float64, device=device)
    mask = torch.zeros(b * g * max_per_gt, dtype=torch.bool, device=device)
    loss[position] = anchor_loss.loss.reshape(-1)[candidates.index].to(torch.float64)
    mask[position] = True
    return CandidateRows(loss=loss.view(b * g, max_per_gt), mask=mask.view(b * g, max_per_gt), position=position)


def _first_peak(log_density: Tensor, selected: Tensor) -> Tensor:
    """(N,) smallest position among ``selected`` entries of highest log-density; K if none."""
    k = log_density.shape[1]
    best = torch.where(selected, log_density, float("-inf")).amax(dim=1, keepdim=True)
    is_peak = selected & (log_density == best)
    return torch.where(is_peak, torch.arange(k, device=log_density.device), k).amin(dim=1)


def split_by_scheme(labels: Tensor, log_density: Tensor, mask: Tensor, scheme: str) -> tuple[Tensor, Tensor]:
    """Separate sorted candidates into positives and ignored ones (PAA Fig. 3, ``scheme``).

    labels: (N, K) int64 predicted mixture component (0 foreground, 1 background);
    log_density: (N, K) float mixture log-density of each candidate (sklearn
    ``score_samples``); mask: (N, K) bool valid candidates, each row sorted by ascending
    loss; scheme: one of ``PAA_SCHEMES`` (checked by ``PAAAssigner``, not here). Returns
    (positive, ignored), both (N, K) bool; other valid candidates are negative. Rows without
    any foreground candidate are all positive.
    """
    n, k = mask.shape
    if n == 0 or k == 0:
        return torch.zeros_like(mask), torch.zeros_like(mask)
    foreground = mask & (labels == 0)
    position = torch.arange(k, device=mask.device)  # broadcasts over the rows
    if scheme == "a":
        positive = foreground
    else:
        positive = mask & (position <= _first_peak(log_density, foreground).unsqueeze(1))
    # No foreground component at all: every candidate is positive (official, for recall).
    no_foreground = ~foreground.any(dim=1, keepdim=True)
    if scheme in ("a", "c"):
        return torch.where(no_foreground, mask, positive), torch.zeros_like(mask)
    rest = mask & ~positive
    background = mask & (labels == 1)
    if scheme == "b":
        ignored = rest & (position < _first_peak(log_density, background).unsqueeze(1))
    elif scheme == "b_official":
        # inds[-bg_max_idx - 1:] of the official code: the last bg_peak + 1 of the row's candidates.
        tail_start = mask.sum(dim=1, keepdim=True) - _first_peak(log_density, background).unsqueeze(1) - 1
        has_background = background.any(dim=1, keepdim=True)
        ignored = rest & has_background & (position < tail_start)
    else:  # "d"
        ignored = rest & foreground
    return torch.where(no_foreground, mask, positive), ignored & ~no_foreground


def separate_candidates(
    sorted_loss: Tensor,
    mask: Tensor,
    *,
    scheme: str = "c",
    gmm_backend: str = "auto",
    gmm_dtype: str = "float32",
) -> tuple[Tensor, Tensor]:
    """PAA's probabilistic separation of each GT's candidates (Sec. 3.1, Fig. 3).

    sorted_loss: (N, K) float candidate losses, each row ascending over its valid prefix;
    mask: (N, K) bool valid candidates. Rows with >= 2 candidates get a two-component GMM
    (``gmm.fit_gmm`` with ``gmm_backend`` and the EM precision ``gmm_dtype``, a key of
    ``GMM_DTYPES``) and ``split_by_scheme``; a row with a single candidate makes it positive.
    ``scheme``, ``gmm_backend`` and ``gmm_dtype`` are assumed valid (``PAAAssigner`` checks
    them). Returns (positive, ignored), (N, K) bool.
    """
    num_candidates = mask.sum(dim=1)
    positive = mask & (num_candidates == 1).unsqueeze(1)
    ignored = torch.zeros_like(mask)
    fit_rows = (num_candidates >= 2).nonzero(as_tuple=True)[0]
    if fit_rows.numel() > 0:
        fit_mask = mask[fit_rows]
        fit = fit_gmm(sorted_loss[fit_rows], fit_mask, backend=gmm_backend, dtype=GMM_DTYPES[gmm_dtype])
        fit_positive, fit_ignored = split_by_scheme(fit.labels, fit.log_density, fit_mask, scheme)
        positive[fit_rows] = fit_positive
        ignored[fit_rows] = fit_ignored
    return positive, ignored


@register_assigner("paa", uses_predictions=True)
class PAAAssigner(CandidateAssigner):
    """Probabilistic Anchor Assignment; see the module docstring.

    scheme: separation scheme of Fig. 3, one of "a", "b", "c" (default), "d".
    topk: candidates per GT per pyramid level (paper: 9).
    gmm_backend: "auto" (default: "triton" on CUDA, "torch" on CPU), "torch" (batched EM
        over all GTs), "triton" (the same EM as one fused kernel; CUDA) or "sklearn"
        (official per-GT loop).
    gmm_dtype: EM precision, "float32" (default: the official code hands sklearn float32
        losses, which it then fits partly in float32; ``gmm`` module docstring) or "float64".
    focal_alpha, focal_gamma, giou_weight: anchor-loss parameters (Eq. 1-2).
    """

    def __init__(
        self,
        scheme: str = "c",
        topk: int = 9,
        gmm_backend: str = "auto",
        gmm_dtype: str = "float32",
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        giou_weight: float = 1.0,
    ):
        if scheme not in PAA_SCHEMES:
            raise ValueError(f"unknown PAA scheme '{scheme}'; valid choices: {', '.join(PAA_SCHEMES)}")
        if gmm_backend not in GMM_BACKENDS:
            raise ValueError(f"unknown gmm_backend '{gmm_backend}'; valid choices: {', '.join(GMM_BACKENDS)}")
        if gmm_dtype not in GMM_DTYPES:
            raise ValueError(f"unknown gmm_dtype '{gmm_dtype}'; valid choices: {', '.join(GMM_DTYPES)}")
        super().__init__(topk, focal_alpha, focal_gamma, giou_weight)
        self.scheme = scheme
        self.gmm_backend = gmm_backend
        self.gmm_dtype = gmm_dtype

    def assign(self, inputs: AssignInputs) -> Assignment:
        b, a = inputs.batch_size, inputs.anchors.shape[0]
        losses, candidates = self.score_candidates(inputs)
        max_per_gt = sum(min(self.topk, count) for count in inputs.num_anchors_per_level)
        rows = sort_candidates(losses, candidates, max_per_gt)
        positive, ignored = separate_candidates(
            rows.loss, rows.mask, scheme=self.scheme, gmm_backend=self.gmm_backend, gmm_dtype=self.gmm_dtype
        )

        # Each candidate's label, read at its place in the rows; every other anchor is negative.
        # Candidate sets are disjoint (module docstring), so no anchor is written twice.
        is_positive = positive.view(-1)[rows.position]
        is_ignored = ignored.view(-1)[rows.position]
        candidate_gt = candidates.row.remainder(inputs.num_gt_slots)
        label = torch.where(is_positive, candidate_gt, torch.where(is_ignored, IGNORED, NEGATIVE))
        gt_index = torch.full((b * a,), NEGATIVE, dtype=torch.int64, device=label.device)
        gt_index[candidates.index] = label
        return Assignment(gt_index=gt_index.view(b, a), num_candidates=candidates.num_candidates)


__all__ = [
    "PAA_SCHEMES",
    "CandidateRows",
    "PAAAssigner",
    "separate_candidates",
    "sort_candidates",
    "split_by_scheme",
]
