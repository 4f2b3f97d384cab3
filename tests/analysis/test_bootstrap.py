"""analysis.bootstrap: weighted AP against COCOeval, and the paired bootstrap's CIs.

Oracle: pycocotools' COCOeval on the data set a resample stands for (each image copied as often
as it was drawn, ``tests.experiments.test_matches.resampled``).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from pycocotools.cocoeval import Params

from analysis.bootstrap import (
    PairedDelta,
    WeightedAP,
    grid_deltas,
    paired_bootstrap,
    paired_delta,
    resample_plan,
    weighted_ap,
)
from analysis.runs import load_runs
from experiments.matches import MatchesMismatchError, compute_matches, save_matches
from tests.experiments.test_matches import cocoeval_ap, random_coco, random_detections, random_gt, resampled


def _ones(matches) -> np.ndarray:
    return np.ones((1, len(matches["image_ids"])), dtype=np.int64)


# ----------------------------------------------------------------------------- weighted AP


@pytest.mark.parametrize("seed", range(8))
def test_all_weights_one_is_cocoevals_ap(seed):
    # Crowd GTs, a category without GT, images without detections, 120 detections on one image
    # and category, scores with ties (two decimals).
    coco, results = random_coco(seed, n_images=12 + seed)
    matches = compute_matches(coco, results)
    assert abs(weighted_ap(matches, _ones(matches))[0] / 100.0 - cocoeval_ap(coco, results)) <= 1e-12


def test_weight_two_everywhere_is_the_duplicated_data_set():
    # Distinct scores: with ties, COCOeval orders the copies of a detection by image id, not next
    # to each other (module docstring of analysis.bootstrap).
    for seed in range(3):
        coco, results = random_coco(seed, distinct_scores=True)
        matches = compute_matches(coco, results)
        twice = 2 * _ones(matches)
        expected = cocoeval_ap(*resampled(coco, results, twice[0]))
        assert abs(weighted_ap(matches, twice)[0] / 100.0 - expected) <= 1e-12


def test_any_multiset_is_the_resampled_data_set():
    coco, results = random_coco(5, distinct_scores=True)
    matches = compute_matches(coco, results)
    weights, _ = resample_plan(len(matches["image_ids"]), 1, n_resamples=6, rng_seed=3)
    assert (weights == 0).any() and (weights >= 2).any()
    ap = WeightedAP(matches)(weights)
    for row, value in zip(weights, ap):
        assert abs(value / 100.0 - cocoeval_ap(*resampled(coco, results, row))) <= 1e-12


def test_recall_thresholds_reached_is_searchsorted():
    # Every recall value the AP reads is tp / npig with integers 0 <= tp <= npig.
    coco, results = random_coco(0)
    evaluate = WeightedAP(compute_matches(coco, results))
    assert evaluate._uniform_thresholds  # the fast path; the general one is searchsorted itself
    npig = np.arange(1, 400)[:, None]
    recall = np.arange(400)[None, :] / npig.astype(np.float64)
    recall = recall[recall <= 1.0]
    expected = np.searchsorted(evaluate.recall_thresholds, recall, side="right")
    assert np.array_equal(evaluate._thresholds_reached(recall), expected)
    assert np.array_equal(evaluate._thresholds_reached(evaluate.recall_thresholds), np.arange(1, 102))


def test_no_gt_in_the_resample_is_nan_and_weights_are_checked():
    coco, results = random_coco(0)
    matches = compute_matches(coco, results)
    no_gt = (matches["num_gt"].sum(axis=1) == 0).astype(np.int64)[None]  # only the images without GT
    assert no_gt.sum() and np.isnan(weighted_ap(matches, no_gt)[0])
    with pytest.raises(ValueError, match="weights must be"):
        weighted_ap(matches, np.ones((2, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        weighted_ap(matches, -_ones(matches))


def test_resample_plan_draws_with_replacement_deterministically():
    images, seeds = resample_plan(40, 3, n_resamples=500, rng_seed=7)
    assert images.shape == (500, 40) and seeds.shape == (500, 3)
    assert np.all(images.sum(axis=1) == 40) and np.all(seeds.sum(axis=1) == 3)
    # P(an image is left out) = (1 - 1/40)^40 = 0.363
    assert abs((images == 0).mean() - (1 - 1 / 40) ** 40) < 0.02
    again, _ = resample_plan(40, 2, n_resamples=500, rng_seed=7)
    assert np.array_equal(images, again)  # the same image multisets whatever the number of seeds
    assert not np.array_equal(images, resample_plan(40, 3, n_resamples=500, rng_seed=8)[0])


# ----------------------------------------------------------------------------- paired bootstrap


def _grid(variants: dict[str, list[int]], n_images: int = 12):
    """variant -> seed -> (results, matches) of detections on one GT set; each run its own seed."""
    coco = random_gt(0, n_images)
    grid, data = {}, {}
    for v, (variant, seeds) in enumerate(variants.items()):
        for seed in seeds:
            results = random_detections(coco, 100 * v + seed, distinct_scores=True)
            data[variant, seed] = results
            grid.setdefault(variant, {})[seed] = compute_matches(coco, results)
    return coco, grid, data


def test_resample_deltas_are_cocoeval_deltas_over_drawn_seeds():
    coco, grid, data = _grid({"base": [0, 1, 2], "new": [0, 1, 2], "other": [1, 2]})
    deltas = paired_bootstrap(grid, "base", n_resamples=50, rng_seed=4)
    assert set(deltas) == {"new", "other"}
    new = deltas["new"]
    assert (new.n_seeds, new.seeds, new.n_images, new.n_resamples) == (3, (0, 1, 2), 12, 50)
    assert deltas["other"].seeds == (1, 2)  # paired by seed: only the seeds both have
    full = {key: cocoeval_ap(coco, results) * 100.0 for key, results in data.items()}
    assert new.delta_AP == pytest.approx(np.mean([full["new", s] - full["base", s] for s in (0, 1, 2)]), abs=1e-10)
    image_weights, seed_weights = resample_plan(12, 3, n_resamples=50, rng_seed=4)
    for r in range(3):
        drawn = {s: int(m) for s, m in zip((0, 1, 2), seed_weights[r]) if m}
        expected = 0.0
        for seed, multiplicity in drawn.items():
            variant_ap = cocoeval_ap(*resampled(coco, data["new", seed], image_weights[r]))
            baseline_ap = cocoeval_ap(*resampled(coco, data["base", seed], image_weights[r]))
            expected += multiplicity * (variant_ap - baseline_ap) * 100.0 / 3
        assert new.samples[r] == pytest.approx(expected, abs=1e-10)
    assert (new.ci_low, new.ci_high) == pytest.approx(tuple(np.quantile(new.samples, [0.025, 0.975])))


def test_a_difference_on_one_image_is_attributed_to_it():
    coco, results = random_coco(3, n_images=20)
    matches = compute_matches(coco, results)
    changed = 1 + int(np.argmax(matches["num_gt"][1:].sum(axis=1)))  # an image with GTs
    category = int(matches["category_ids"][np.argmax(matches["num_gt"].sum(axis=0))])
    # The variant is the baseline plus, on that one image, a false positive (outside the image: it
    # overlaps no GT) scored above every other detection. It lowers the precision of every point of
    # its category's precision-recall curve, so every resample that holds the image has delta < 0.
    false_positive = {"image_id": sorted(coco.imgs)[changed], "category_id": category, "bbox": [-50, -50, 5, 5],
                      "score": 1.0}
    variant = compute_matches(coco, [*results, false_positive])
    delta = paired_bootstrap({"base": {0: matches}, "variant": {0: variant}}, "base", rng_seed=0)["variant"]
    expected = (cocoeval_ap(coco, [*results, false_positive]) - cocoeval_ap(coco, results)) * 100.0
    assert delta.delta_AP == pytest.approx(expected, abs=1e-10) and expected < 0
    drawn = resample_plan(20, 1, rng_seed=0)[0][:, changed]
    assert delta.n_resamples == len(drawn) == 1000
    assert np.all(delta.samples[drawn == 0] == 0.0)  # without that image the two runs are the same
    assert np.all(delta.samples[drawn > 0] < 0.0)
    # It is left out of (1 - 1/20)^20 = 36% of the resamples, so the upper 97.5% bound is 0.
    assert 0.3 < (drawn == 0).mean() < 0.42
    assert delta.ci_low < 0.0 and delta.ci_high == 0.0 and not delta.excludes_zero


def test_fixed_rng_seed_gives_the_same_result():
    _, grid, _ = _grid({"base": [0, 1], "new": [0, 1]})
    first = paired_bootstrap(grid, "base", n_resamples=200, rng_seed=11)["new"]
    second = paired_bootstrap(grid, "base", n_resamples=200, rng_seed=11)["new"]
    assert first == second and np.array_equal(first.samples, second.samples)
    other = paired_bootstrap(grid, "base", n_resamples=200, rng_seed=12)["new"]
    assert not np.array_equal(first.samples, other.samples)
    assert other.delta_AP == first.delta_AP  # the point estimate uses no resample
    pair = paired_delta(grid, "new", "base", n_resamples=200, rng_seed=11)
    assert pair == first and np.array_equal(pair.samples, first.samples)
    swapped = paired_delta(grid, "base", "new", n_resamples=200, rng_seed=11)
    assert np.allclose(swapped.samples, -first.samples, rtol=0, atol=1e-12)


def test_bad_input_is_refused():
    _, grid, _ = _grid({"base": [0], "new": [0]})
    with pytest.raises(ValueError, match="baseline 'nope'"):
        paired_bootstrap(grid, "nope")
    with pytest.raises(ValueError, match="variant 'nope'"):
        paired_bootstrap(grid, "base", variants=["nope"])
    other_images = {**grid["new"][0], "image_ids": grid["new"][0]["image_ids"] + 1}
    with pytest.raises(MatchesMismatchError, match="base seed 0 and new seed 0"):
        paired_bootstrap({"base": grid["base"], "new": {0: other_images}}, "base", n_resamples=10)
    assert paired_bootstrap({"base": grid["base"], "new": {5: grid["new"][0]}}, "base", n_resamples=10) == {}


def _write_run(grid_dir, name, variant, seed, status, matches=None):
    run_dir = grid_dir / name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"status": status, "variant": variant, "seed": seed, "AP": 1.0}))
    (run_dir / "config.yaml").write_text(f"variant: {variant}\nseed: {seed}\n")
    if matches is not None:
        save_matches(run_dir / "eval_matches.npz", matches)


def test_grid_deltas_reads_the_runs_matches_files(tmp_path, caplog):
    _, grid, _ = _grid({"base": [0, 1], "new": [0, 1], "odd": [0]})
    _write_run(tmp_path, "base-s0", "base", 0, "done", grid["base"][0])
    _write_run(tmp_path, "base-s1", "base", 1, "done", grid["base"][1])
    _write_run(tmp_path, "new-s0", "new", 0, "done", grid["new"][0])
    _write_run(tmp_path, "new-s1", "new", 1, "failed", grid["new"][1])  # failed: not used
    _write_run(tmp_path, "nomatch-s0", "nomatch", 0, "done")  # no matches file
    shifted = {**grid["odd"][0], "image_ids": grid["odd"][0]["image_ids"] + 1}
    _write_run(tmp_path, "odd-s0", "odd", 0, "done", shifted)  # other images: left out, with a warning
    with caplog.at_level(logging.WARNING):
        deltas = grid_deltas(load_runs(tmp_path), "base", n_resamples=100, rng_seed=2)
    assert set(deltas) == {"new"}
    assert deltas["new"].seeds == (0,)
    expected = paired_delta({"base": grid["base"], "new": {0: grid["new"][0]}}, "new", "base", n_resamples=100,
                            rng_seed=2)
    assert deltas["new"] == expected
    assert "base-s0/eval_matches.npz and" in caplog.text and "odd-s0/eval_matches.npz" in caplog.text
    assert grid_deltas(load_runs(tmp_path), "nomatch") == {}


# ----------------------------------------------------------------------------- coverage

_PARAMS = Params("bbox")  # COCOeval's IoU and recall thresholds


def _world(rng: np.random.Generator, n_images: int) -> dict[str, np.ndarray]:
    """Shared randomness of one simulated val set: GTs (2 categories, Poisson(1.5) per image and
    category), each image's difficulty, per GT uniforms and a score noise, and false positives."""
    num_gt = rng.poisson(1.5, size=(n_images, 2))
    gt_image = np.repeat(np.arange(n_images), num_gt.sum(axis=1))
    gt_category = np.concatenate([np.repeat([0, 1], row) for row in num_gt]) if len(gt_image) else gt_image
    num_fp = rng.poisson(2.0, size=n_images)
    return {
        "num_gt": num_gt,
        "difficulty": rng.normal(0.0, 1.0, n_images),
        "gt_image": gt_image,
        "gt_category": gt_category,
        "detect": rng.random(len(gt_image)),
        "iou": rng.random(len(gt_image)),
        "gt_noise": rng.normal(0.0, 1.0, len(gt_image)),
        "fp_image": np.repeat(np.arange(n_images), num_fp),
        "fp_category": rng.integers(0, 2, num_fp.sum()),
        "fp_noise": rng.normal(0.0, 1.0, num_fp.sum()),
    }


def _detector(world: dict[str, np.ndarray], quality: float) -> dict[str, np.ndarray]:
    """Matches of a detector of ``quality`` on ``world``: a GT is found with probability
    sigmoid(1 + quality - difficulty), at IoU 0.4 + 0.6 sqrt(u) (a true positive at the thresholds
    up to it), with score sigmoid(noise + 1 + quality); false positives score sigmoid(noise - 1).
    Both variants see the same uniforms and noises (common random numbers), like two detectors
    on the same images."""
    difficulty = world["difficulty"][world["gt_image"]]
    found = world["detect"] < 1.0 / (1.0 + np.exp(-(1.0 + quality - difficulty)))
    iou = 0.4 + 0.6 * np.sqrt(world["iou"][found])
    tp = np.concatenate([iou[:, None] >= _PARAMS.iouThrs[None, :], np.zeros((len(world["fp_image"]), 10), bool)])
    score = np.concatenate([world["gt_noise"][found] + 1.0 + quality, world["fp_noise"] - 1.0])
    return {
        "image_ids": np.arange(len(world["num_gt"])),
        "category_ids": np.array([1, 2]),
        "iou_thresholds": _PARAMS.iouThrs,
        "recall_thresholds": _PARAMS.recThrs,
        "det_image": np.concatenate([world["gt_image"][found], world["fp_image"]]),
        "det_category": np.concatenate([world["gt_category"][found], world["fp_category"]]),
        "det_score": 1.0 / (1.0 + np.exp(-score)),
        "det_tp": tp,
        "det_ignore": np.zeros_like(tp),
        "num_gt": world["num_gt"],
    }


def test_95_percent_intervals_cover_the_true_difference_about_95_percent_of_the_time():
    base_quality, new_quality = 0.0, 0.4
    # The true difference: the population's, approximated on 200k images. Its own error is about
    # sd(delta at 150 images) * sqrt(150 / 200k) = 0.7 * 0.027 = 0.02 AP, against intervals about 3 AP wide.
    population, everyone = _world(np.random.default_rng(1234), 200_000), np.ones((1, 200_000), dtype=np.int64)
    true_delta = (weighted_ap(_detector(population, new_quality), everyone)
                  - weighted_ap(_detector(population, base_quality), everyone))[0]
    assert true_delta > 1.0
    replicates, covered, excludes_zero = 200, 0, 0
    for replicate in range(replicates):
        world = _world(np.random.default_rng([replicate, 99]), 150)
        grid = {"base": {0: _detector(world, base_quality)}, "new": {0: _detector(world, new_quality)}}
        # 500 resamples (not the default 1000) keep the test short; the 2.5% tails still hold 12 each.
        delta: PairedDelta = paired_bootstrap(grid, "base", n_resamples=500, rng_seed=replicate)["new"]
        covered += delta.ci_low <= true_delta <= delta.ci_high
        excludes_zero += delta.excludes_zero
    # With true coverage 95%, the share over 200 replicates has sd sqrt(.95 * .05 / 200) = 1.5%;
    # [90%, 99%] is about -3 / +2.6 sd, room for the percentile bootstrap's small-sample error (AP
    # is a ratio statistic; its mean at 150 images is 0.2 AP above the population's here). Measured:
    # 96%. An unpaired bootstrap (independent image draws for the two runs) gives intervals 3.5x
    # as wide here (10.5 AP) that cover in 100% of replicates: the upper bound catches it.
    assert 0.90 <= covered / replicates <= 0.99, (covered, true_delta)
    assert excludes_zero > replicates / 2  # and they are narrow enough to see the difference
