"""Paired bootstrap confidence intervals of AP differences between a grid's variants.

Input: per-detection COCOeval matches of every run (``experiments.matches``, ``eval_matches.npz``),
all scored on the same val images.

**AP of a resample.** A resample is a multiset of the val images: image i taken ``w_i`` times
(``w_i`` in 0, 1, 2, ...). ``WeightedAP`` restates COCOeval's ``accumulate`` (pycocotools
``cocoeval.py``) for bbox AP (``stats[0]``: IoU 0.50:0.95, area "all", maxDets 100) with a
detection counting ``w`` times, ``w`` its image's multiplicity:

- per category, detections sorted by score descending with a stable sort over COCOeval's own
  concatenation order (its mergesort), done once per run: weights do not change the order;
- weighted cumulative tp and fp per IoU threshold, ``npig`` = weighted count of non-ignored GTs;
- precision ``tp / (tp + fp + eps)``, made monotone from the right, read at the 101 recall
  thresholds at the first point with recall >= threshold (``searchsorted(side="left")``), 0 past
  the last point;
- AP = mean over IoU thresholds, recall thresholds and the categories with ``npig > 0``
  (COCOeval's -1 entries are left out the same way).

With all weights 1 this is COCOeval's ``stats[0]`` (to rounding, ~1e-16). With weight ``w`` it is
the AP of the data set holding each image ``w`` times as COCOeval would score it, except where
tied scores of different detections interleave copies differently (COCOeval places copies by
image id; here the ``w`` copies of a detection are adjacent). Two exact shortcuts make it fast,
vectorised over resamples: (1) only true positives can be where a recall threshold is first
reached, and a false positive's precision never exceeds that of the last true positive before it,
so precision is needed at true positives only (and detections after a category's last true
positive can be dropped); fp up to a true positive is (all detections) - (true positives) -
(ignored) up to it, so one cumulative sum over all detections serves every IoU threshold; (2) sum_r q_r = sum_j envelope_j * (#recall thresholds <= recall_j minus those
<= recall_{j-1}), which replaces the per-row searchsorted.

**Paired bootstrap.** Variants are paired with the baseline by seed (the seeds both have). Each
resample draws the images with replacement (one multiset, used for every run) and the common
seeds with replacement; its delta is the mean over the drawn seeds of AP(variant) - AP(baseline).
The CI is the percentile interval of the deltas; the point estimate is the mean over the common
seeds of the full-data delta. Torch-free.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from analysis.runs import DONE, Run
from experiments.matches import (
    MATCHES_FILE,
    MatchesError,
    MatchesMismatchError,
    check_same_images,
    load_matches,
    validate_matches,
)

log = logging.getLogger(__name__)

N_RESAMPLES = 1000
CONFIDENCE = 0.95
RNG_SEED = 0
_EPS = np.spacing(1)  # COCOeval's precision denominator guard
_CHUNK_ELEMENTS = 1 << 22  # resamples x detections of one chunk's cumulative count (int32: 16 MiB)

Matches = Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Group:
    """The true positives of one (category, IoU threshold), in score order."""

    category: int
    tp_image: np.ndarray  # (n,) image index of each true positive
    cum_index: np.ndarray  # (n,) column of the cumulative count up to and including it
    base_index: int  # column of the cumulative count before the category's first detection
    ignored_image: np.ndarray  # (m,) image index of each ignored detection of the group
    ignored_before: np.ndarray  # (n,) ignored detections before each true positive


class WeightedAP:
    """COCOeval bbox AP (percent) of image multisets of one run (module docstring).

    Built once per run from its matches (the sort and the true-positive lists); call it with
    ``weights`` (R, I) non-negative ints, the multiplicity of each image (``image_ids`` order) in
    each of R resamples; returns (R,) AP in percent, NaN where no category has a GT.
    """

    def __init__(self, matches: Matches, source: str = "matches"):
        matches = validate_matches(dict(matches), source)
        self.image_ids = matches["image_ids"]
        self.category_ids = matches["category_ids"]
        self.recall_thresholds = matches["recall_thresholds"]
        self.num_thresholds = len(matches["iou_thresholds"])
        n = len(self.recall_thresholds)
        self._uniform_thresholds = n >= 2 and np.array_equal(self.recall_thresholds, np.linspace(0.0, 1.0, n))
        # thresholds c and c - 1 of a count c in [1, n]; the padding makes the checks at the ends fail
        self._threshold_above = np.concatenate([self.recall_thresholds, [np.inf, np.inf]])
        self._threshold_below = np.concatenate([[-np.inf], self.recall_thresholds, [np.inf]])
        self.num_gt = matches["num_gt"].astype(np.float64)  # (I, K); float for an exact BLAS product
        # COCOeval: per category, mergesort by -score over its concatenation order (stored order).
        order = np.argsort(-matches["det_score"], kind="mergesort")
        order = order[np.argsort(matches["det_category"][order], kind="mergesort")]
        # A detection after its category's last true positive changes no precision that is read:
        # drop it (this also drops every detection of a category without GT, which has no tp).
        category = matches["det_category"][order]
        is_tp = matches["det_tp"][order].any(axis=1)
        last_tp = np.full(len(self.category_ids), -1, dtype=np.int64)
        np.maximum.at(last_tp, category[is_tp], np.flatnonzero(is_tp))
        order = order[np.arange(len(order)) <= last_tp[category]]
        self.det_image = matches["det_image"][order].astype(np.intp)
        category = matches["det_category"][order]
        tp, ignored = matches["det_tp"][order], matches["det_ignore"][order]
        starts = np.searchsorted(category, np.arange(len(self.category_ids) + 1))
        self._dets_per_image = np.bincount(self.det_image, minlength=len(self.image_ids)).astype(np.float64)
        has_gt = self.num_gt.sum(axis=0) > 0  # a category without GT is never scored
        self.groups: list[_Group] = []
        for k in np.flatnonzero(has_gt):
            lo, hi = int(starts[k]), int(starts[k + 1])
            for t in range(self.num_thresholds):
                tp_pos = lo + np.flatnonzero(tp[lo:hi, t])
                if not len(tp_pos):
                    continue  # precision 0 at every recall threshold
                ignored_pos = lo + np.flatnonzero(ignored[lo:hi, t])
                self.groups.append(
                    _Group(
                        category=int(k),
                        tp_image=self.det_image[tp_pos],
                        cum_index=tp_pos + 1,
                        base_index=lo,
                        ignored_image=self.det_image[ignored_pos],
                        ignored_before=np.searchsorted(ignored_pos, tp_pos),
                    )
                )

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        weights = np.asarray(weights)
        if weights.ndim != 2 or weights.shape[1] != self.num_images:
            raise ValueError(f"weights must be (R, {self.num_images}) image multiplicities, got {weights.shape}")
        if weights.size and weights.min() < 0:
            raise ValueError("weights must be non-negative")
        # Weighted counts are at most sum_i w_i (detections of image i): int32 unless that overflows.
        largest_count = (weights.astype(np.float64) @ self._dets_per_image).max(initial=0.0)
        weights = weights.astype(np.int32 if largest_count < 2**31 else np.int64)
        num_resamples = len(weights)
        npig = weights.astype(np.float64) @ self.num_gt  # (R, K), exact: integers < 2**53
        precision_sum = np.zeros_like(npig)  # sum over IoU and recall thresholds of the precision
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(len(self.det_image), 1))
        with np.errstate(divide="ignore", invalid="ignore"):
            for start in range(0, num_resamples, rows_per_chunk):
                rows = slice(start, min(start + rows_per_chunk, num_resamples))
                self._accumulate(weights[rows], npig[rows], precision_sum[rows])
        scored = npig > 0
        num_scored = scored.sum(axis=1)
        total = np.where(scored, precision_sum, 0.0).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ap = total / (num_scored * self.num_thresholds * len(self.recall_thresholds))
        return np.where(num_scored > 0, ap * 100.0, np.nan)

    def _accumulate(self, weights: np.ndarray, npig: np.ndarray, precision_sum: np.ndarray) -> None:
        """Add to ``precision_sum`` (rows, K) each group's sum of precision over recall thresholds."""
        if not self.groups:
            return
        dtype = weights.dtype  # int32, or int64 where int32 could overflow
        # cumulative[:, p + 1]: weighted count of detections at sorted positions <= p.
        cumulative = np.zeros((len(weights), len(self.det_image) + 1), dtype=dtype)
        np.cumsum(weights[:, self.det_image], axis=1, dtype=dtype, out=cumulative[:, 1:])
        for group in self.groups:
            cum_tp = np.cumsum(weights[:, group.tp_image], axis=1, dtype=dtype)
            cum_det = cumulative[:, group.cum_index] - cumulative[:, group.base_index, None]
            cum_fp = cum_det - cum_tp
            if len(group.ignored_image):
                cum_ignored = np.zeros((len(weights), len(group.ignored_image) + 1), dtype=dtype)
                np.cumsum(weights[:, group.ignored_image], axis=1, dtype=dtype, out=cum_ignored[:, 1:])
                cum_fp -= cum_ignored[:, group.ignored_before]
            tp = cum_tp.astype(np.float64)
            precision = tp / (cum_fp.astype(np.float64) + tp + _EPS)
            envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            recall = tp / npig[:, group.category, None]
            reached = self._thresholds_reached(recall)
            newly_reached = np.diff(reached, axis=1, prepend=0)
            precision_sum[:, group.category] += np.einsum("ij,ij->i", envelope, newly_reached.astype(np.float64))

    def _thresholds_reached(self, recall: np.ndarray) -> np.ndarray:
        """How many recall thresholds are <= each recall (``searchsorted(side="right")``); rows of
        a category with npig 0 (recall NaN or inf) give any count: they are not used."""
        if not self._uniform_thresholds:
            return np.searchsorted(self.recall_thresholds, recall, side="right")
        # COCOeval's linspace(0, 1, n): floor(recall * (n - 1)) + 1 is off by at most one from the
        # count; one comparison with the thresholds on each side makes it exact.
        recall = np.fmin(recall, 2.0)  # NaN and inf -> 2 (past every threshold)
        count = np.minimum((recall * (len(self.recall_thresholds) - 1)).astype(np.intp) + 1,
                           len(self.recall_thresholds))
        count += self._threshold_above[count] <= recall
        count -= self._threshold_below[count] > recall
        return count


def weighted_ap(matches: Matches, weights: np.ndarray) -> np.ndarray:
    """AP in percent (R,) of one run's ``matches`` under (R, I) image multiplicities ``weights``."""
    return WeightedAP(matches)(weights)


def _multiplicities(draws: np.ndarray, size: int) -> np.ndarray:
    """(R, size) counts of each value in each row of ``draws`` (R, n) ints in [0, size)."""
    offsets = np.arange(len(draws))[:, None] * size
    counts = np.bincount((draws + offsets).ravel(), minlength=len(draws) * size)
    return counts.reshape(len(draws), size).astype(np.int32)


def resample_plan(
    n_images: int, n_seeds: int, n_resamples: int = N_RESAMPLES, rng_seed: int = RNG_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """The resamples of a paired bootstrap: (R, n_images) image multiplicities and (R, n_seeds)
    seed multiplicities, each row drawn with replacement (n_images images, n_seeds seeds).

    Deterministic for ``rng_seed``; the image draws do not depend on ``n_seeds``, so every pair
    of variants of a grid sees the same image multisets.
    """
    if n_images < 1 or n_seeds < 1 or n_resamples < 1:
        raise ValueError(f"need n_images, n_seeds and n_resamples >= 1, got {n_images}, {n_seeds}, {n_resamples}")
    image_rng = np.random.default_rng([rng_seed, 0])
    seed_rng = np.random.default_rng([rng_seed, 1, n_seeds])
    images = _multiplicities(image_rng.integers(0, n_images, size=(n_resamples, n_images)), n_images)
    seeds = _multiplicities(seed_rng.integers(0, n_seeds, size=(n_resamples, n_seeds)), n_seeds)
    return images, seeds


@dataclasses.dataclass(frozen=True)
class PairedDelta:
    """AP(variant) - AP(baseline) in AP points, with its paired bootstrap percentile CI."""

    variant: str
    baseline: str
    delta_AP: float  # mean over the common seeds of the full-data difference
    ci_low: float
    ci_high: float
    n_seeds: int  # seeds both variants have (the pairs)
    n_images: int
    n_resamples: int
    confidence: float
    seeds: tuple[int, ...]
    samples: np.ndarray = dataclasses.field(repr=False, compare=False)  # (R,) delta of each resample

    @property
    def excludes_zero(self) -> bool:
        return bool(self.ci_low > 0.0 or self.ci_high < 0.0)

    def as_dict(self) -> dict[str, object]:
        """The scalar fields and ``excludes_zero`` (no samples), e.g. for a CSV row."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "samples"}
        return {**fields, "excludes_zero": self.excludes_zero}


def paired_bootstrap(
    grid: Mapping[str, Mapping[int, Matches]],
    baseline: str,
    *,
    variants: Sequence[str] | None = None,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    rng_seed: int = RNG_SEED,
    sources: Mapping[tuple[str, int], str] | None = None,
) -> dict[str, PairedDelta]:
    """ΔAP of each of ``variants`` (default: every other variant of ``grid``) versus ``baseline``.

    grid: variant -> seed -> matches (``experiments.matches``), all scored on the same images.
    sources: (variant, seed) -> a name for error messages (the file); default "<variant> seed <seed>".
    Variants that share no seed with the baseline are left out of the result. All variants see the
    same image multisets (``resample_plan``), so the result for one variant does not depend on
    which others are asked for. Raises ValueError for an unknown baseline or a bad parameter and
    MatchesMismatchError (naming both files) when two runs were scored on different images.
    """
    if baseline not in grid or not grid[baseline]:
        raise ValueError(f"baseline {baseline!r} has no runs with matches (variants: {sorted(grid)})")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 2:
        raise ValueError(f"n_resamples must be >= 2, got {n_resamples}")
    variants = [v for v in grid if v != baseline] if variants is None else list(variants)
    for variant in variants:
        if variant not in grid:
            raise ValueError(f"variant {variant!r} is not in the grid (variants: {sorted(grid)})")

    def name(variant: str, seed: int) -> str:
        return (sources or {}).get((variant, seed), f"{variant} seed {seed}")

    reference_seed = min(grid[baseline])
    reference = grid[baseline][reference_seed]
    for variant in (baseline, *variants):
        for seed, matches in grid[variant].items():
            check_same_images(reference, matches, name(baseline, reference_seed), name(variant, seed))
    n_images = len(reference["image_ids"])
    image_weights, _ = resample_plan(n_images, 1, n_resamples, rng_seed)
    all_ones = np.ones((1, n_images), dtype=np.int32)
    ap_cache: dict[tuple[str, int], tuple[float, np.ndarray]] = {}

    def ap(variant: str, seed: int) -> tuple[float, np.ndarray]:
        """(full-data AP, (R,) AP of each resample) of one run."""
        if (variant, seed) not in ap_cache:
            evaluate = WeightedAP(grid[variant][seed], name(variant, seed))
            ap_cache[variant, seed] = (float(evaluate(all_ones)[0]), evaluate(image_weights))
        return ap_cache[variant, seed]

    alpha = 1.0 - confidence
    out: dict[str, PairedDelta] = {}
    for variant in variants:
        seeds = sorted(set(grid[variant]) & set(grid[baseline]))
        if not seeds:
            log.info("no seed of %s is also a seed of the baseline %s: no paired CI", variant, baseline)
            continue
        _, seed_weights = resample_plan(n_images, len(seeds), n_resamples, rng_seed)
        full = [ap(variant, s)[0] - ap(baseline, s)[0] for s in seeds]
        per_seed = np.stack([ap(variant, s)[1] - ap(baseline, s)[1] for s in seeds], axis=1)  # (R, S)
        samples = (seed_weights * per_seed).sum(axis=1) / len(seeds)
        low, high = np.nanquantile(samples, [alpha / 2.0, 1.0 - alpha / 2.0])
        out[variant] = PairedDelta(
            variant=variant,
            baseline=baseline,
            delta_AP=float(np.mean(full)),
            ci_low=float(low),
            ci_high=float(high),
            n_seeds=len(seeds),
            n_images=n_images,
            n_resamples=n_resamples,
            confidence=confidence,
            seeds=tuple(int(s) for s in seeds),
            samples=samples,
        )
    return out


def paired_delta(
    grid: Mapping[str, Mapping[int, Matches]], variant: str, baseline: str, **options
) -> PairedDelta | None:
    """ΔAP of ``variant`` versus ``baseline`` (any two variants of ``grid``); None without a common
    seed. ``options`` as ``paired_bootstrap``'s; the same as its entry for ``variant``."""
    return paired_bootstrap(grid, baseline, variants=[variant], **options).get(variant)


def grid_deltas(
    runs: Iterable[Run],
    baseline: str,
    *,
    n_resamples: int = N_RESAMPLES,
    confidence: float = CONFIDENCE,
    rng_seed: int = RNG_SEED,
) -> dict[str, PairedDelta]:
    """``paired_bootstrap`` over a grid's done runs that have an ``eval_matches.npz``.

    Never raises for a run's file: an unreadable one, or one scored on other images than the
    baseline's lowest-seed run, is left out with a warning naming the files. {} when the baseline
    has no run with matches.
    """
    grid: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    sources: dict[tuple[str, int], str] = {}
    for run in runs:
        path = run.matches_path
        if run.status != DONE or run.seed is None or not path.is_file():
            continue
        if (run.variant, run.seed) in sources:
            log.warning("ignoring %s: %s seed %d already read from %s", path, run.variant, run.seed,
                        sources[run.variant, run.seed])
            continue
        try:
            grid.setdefault(run.variant, {})[run.seed] = load_matches(path)
        except MatchesError as exc:
            log.warning("ignoring %s", exc)
            continue
        sources[run.variant, run.seed] = str(path)
    if not grid.get(baseline):
        log.info("baseline %s has no run with %s: no ΔAP confidence intervals", baseline, MATCHES_FILE)
        return {}
    reference_seed = min(grid[baseline])
    reference = grid[baseline][reference_seed]
    for variant in list(grid):
        for seed in list(grid[variant]):
            try:
                check_same_images(reference, grid[variant][seed], sources[baseline, reference_seed],
                                  sources[variant, seed])
            except MatchesMismatchError as exc:
                log.warning("ignoring %s: %s", sources[variant, seed], exc)
                del grid[variant][seed]
        if not grid[variant]:
            del grid[variant]
    return paired_bootstrap(grid, baseline, n_resamples=n_resamples, confidence=confidence, rng_seed=rng_seed,
                            sources=sources)
