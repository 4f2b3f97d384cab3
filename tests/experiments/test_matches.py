"""experiments.matches: COCOeval's per-detection matches, read on hand-built and random COCO sets.

The random-set builders here (``random_coco``, ``cocoeval_ap``, ``resampled``) are also the
oracle of tests/analysis/test_bootstrap.py.
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from experiments.matches import (
    MATCH_KEYS,
    MatchesError,
    MatchesMismatchError,
    check_same_images,
    compute_matches,
    load_matches,
    save_matches,
)

CATEGORY_IDS = (2, 4, 7, 9)  # the last one never has a GT


def make_coco(images: list[dict], annotations: list[dict], categories: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def random_gt(seed: int, n_images: int = 15) -> COCO:
    """A random GT set: 0-4 boxes per image in the first three categories (15% crowd); the fourth
    category has none. Image ids 3, 8, 13, ... (not contiguous)."""
    rng = np.random.default_rng(seed)
    images = [{"id": 5 * i + 3, "width": 100, "height": 80} for i in range(n_images)]
    categories = [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]
    annotations = []
    for image in images:
        for _ in range(int(rng.integers(0, 5))):
            w, h = rng.uniform(5, 40, 2)
            x, y = rng.uniform(0, 100 - w), rng.uniform(0, 80 - h)
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image["id"], "category_id": int(rng.choice(CATEGORY_IDS[:3])),
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.random() < 0.15)}
            )
    return make_coco(images, annotations, categories)


def random_detections(coco_gt: COCO, seed: int, distinct_scores: bool = False) -> list[dict]:
    """Detections near ``coco_gt``: 1-2 jittered copies of 80% of the GTs, 0-5 random boxes in any
    category (the one without GT too) on all but the last two images (which may then have none), and
    120 on the first image and category (past maxDets 100). Scores rounded to 2 decimals (many
    ties) unless ``distinct_scores``."""
    rng = np.random.default_rng([seed, 1])

    def score() -> float:
        return float(rng.random()) if distinct_scores else round(float(rng.random()), 2)

    results = []
    for annotation in coco_gt.dataset["annotations"]:
        if rng.random() < 0.2:
            continue
        x, y, w, h = annotation["bbox"]
        for _ in range(int(rng.integers(1, 3))):
            dx, dy, dw, dh = rng.normal(0, 0.12, 4)
            box = [x + dx * w, y + dy * h, w * np.exp(dw), h * np.exp(dh)]
            results.append({"image_id": annotation["image_id"], "category_id": annotation["category_id"],
                            "bbox": box, "score": score()})
    image_ids = sorted(coco_gt.imgs)
    for image_id in image_ids[:-2]:
        for _ in range(int(rng.integers(0, 6))):
            w, h = rng.uniform(5, 40, 2)
            results.append({"image_id": image_id, "category_id": int(rng.choice(CATEGORY_IDS)),
                            "bbox": [rng.uniform(0, 60), rng.uniform(0, 40), w, h], "score": score()})
    for _ in range(120):
        w, h = rng.uniform(5, 40, 2)
        results.append({"image_id": image_ids[0], "category_id": CATEGORY_IDS[0],
                        "bbox": [rng.uniform(0, 60), rng.uniform(0, 40), w, h], "score": score()})
    return results


def random_coco(seed: int, n_images: int = 15, distinct_scores: bool = False) -> tuple[COCO, list[dict]]:
    """``random_gt`` and ``random_detections`` of one seed."""
    coco_gt = random_gt(seed, n_images)
    return coco_gt, random_detections(coco_gt, seed, distinct_scores)


def cocoeval_ap(coco_gt: COCO, results: list[dict]) -> float:
    """COCOeval's stats[0] (bbox AP, a fraction) of ``results``: the oracle."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


def resampled(coco_gt: COCO, results: list[dict], weights: np.ndarray) -> tuple[COCO, list[dict]]:
    """The data set holding image i (sorted id order) ``weights[i]`` times: copy c > 0 of an image is a
    new image (id + c * 10**6) with copies of its GT and detections; weight 0 drops the image."""
    offset = 10**6
    image_ids = sorted(coco_gt.imgs)
    images, annotations, copies = [], [], []
    for image_id, weight in zip(image_ids, weights):
        for c in range(int(weight)):
            new_id = image_id + c * offset
            images.append({**coco_gt.imgs[image_id], "id": new_id})
            for annotation in coco_gt.imgToAnns.get(image_id, []):
                annotations.append({**annotation, "id": len(annotations) + 1, "image_id": new_id})
            copies += [{**r, "image_id": new_id} for r in results if r["image_id"] == image_id]
    for annotation in annotations:
        annotation.pop("ignore", None)  # set by an earlier COCOeval on the original
    return make_coco(images, annotations, list(coco_gt.dataset["categories"])), copies


# ----------------------------------------------------------------------------- hand-built


def _one_image():
    """One image: GT 1 (category 1), a crowd GT 2 (category 1), GT 3 (category 2); four detections."""
    images = [{"id": 7, "width": 200, "height": 200}]
    annotations = [
        {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 2, "image_id": 7, "category_id": 1, "bbox": [100, 100, 80, 80], "area": 6400, "iscrowd": 1},
        {"id": 3, "image_id": 7, "category_id": 2, "bbox": [10, 120, 40, 40], "area": 1600, "iscrowd": 0},
    ]
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "none"}]
    results = [
        {"image_id": 7, "category_id": 1, "bbox": [10, 10, 40, 40], "score": 0.9},  # GT 1 exactly: tp at every t
        # GT 1 shifted by 8 px in x: IoU 32*40 / (48*40) = 0.667 -> tp at t <= 0.65 only, but GT 1 is
        # taken by the 0.9 detection first, so it is a false positive everywhere.
        {"image_id": 7, "category_id": 1, "bbox": [18, 10, 40, 40], "score": 0.8},
        {"image_id": 7, "category_id": 1, "bbox": [110, 110, 20, 20], "score": 0.7},  # inside the crowd: ignored
        {"image_id": 7, "category_id": 2, "bbox": [18, 120, 40, 40], "score": 0.6},  # IoU 0.667 with GT 3
    ]
    return make_coco(images, annotations, categories), results


def test_hand_built_matches():
    coco, results = _one_image()
    matches = compute_matches(coco, results)
    assert set(matches) == set(MATCH_KEYS)
    assert matches["image_ids"].tolist() == [7] and matches["category_ids"].tolist() == [1, 2, 3]
    assert matches["num_gt"].tolist() == [[1, 1, 0]]  # the crowd GT is ignored
    assert matches["det_category"].tolist() == [0, 0, 0, 1] and matches["det_image"].tolist() == [0, 0, 0, 0]
    assert matches["det_score"].tolist() == [0.9, 0.8, 0.7, 0.6]
    thresholds = matches["iou_thresholds"]
    assert np.allclose(thresholds, np.linspace(0.5, 0.95, 10))
    tp, ignored = matches["det_tp"], matches["det_ignore"]
    assert tp[0].all() and not ignored[0].any()
    assert not tp[1].any() and not ignored[1].any()
    assert not tp[2].any() and ignored[2].all()  # IoU with a crowd GT is intersection / detection area = 1
    assert tp[3].tolist() == (thresholds <= 2 / 3).tolist() and not ignored[3].any()


def test_order_is_accumulates_and_detections_stop_at_100():
    coco, results = random_coco(0)
    matches = compute_matches(coco, results)
    category, image, score = matches["det_category"], matches["det_image"], matches["det_score"]
    key = category.astype(np.int64) * len(matches["image_ids"]) + image
    assert np.all(np.diff(key) >= 0)  # category, then image
    same = np.diff(key) == 0
    assert np.all(np.diff(score)[same] <= 0)  # score descending within an image
    assert np.bincount(key).max() == 100  # 120 detections on one image and category: 100 kept
    assert matches["image_ids"].tolist() == sorted(coco.imgs)
    assert matches["category_ids"].tolist() == list(CATEGORY_IDS)
    assert matches["num_gt"][:, 3].sum() == 0 and (category == 3).any()  # detections of a category without GT
    non_crowd = np.zeros_like(matches["num_gt"])
    for annotation in coco.anns.values():
        if not annotation["iscrowd"]:
            non_crowd[(annotation["image_id"] - 3) // 5, CATEGORY_IDS.index(annotation["category_id"])] += 1
    assert np.array_equal(matches["num_gt"], non_crowd)


def test_no_detections():
    coco, _ = _one_image()
    matches = compute_matches(coco, [])
    assert matches["det_score"].shape == (0,) and matches["det_tp"].shape == (0, 10)
    assert matches["num_gt"].tolist() == [[1, 1, 0]]


def test_save_and_load_round_trip(tmp_path):
    coco, results = random_coco(1)
    matches = compute_matches(coco, results)
    path = tmp_path / "run" / "eval_matches.npz"
    save_matches(path, matches)
    assert [p.name for p in path.parent.iterdir()] == ["eval_matches.npz"]  # no temp file left behind
    loaded = load_matches(path)
    assert set(loaded) == set(MATCH_KEYS)
    for key in MATCH_KEYS:
        assert loaded[key].dtype == matches[key].dtype and np.array_equal(loaded[key], matches[key]), key
    save_matches(path, compute_matches(coco, results[:3]))  # overwrite in place
    assert len(load_matches(path)["det_score"]) == 3


def test_unreadable_and_inconsistent_files_raise_naming_them(tmp_path):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(MatchesError, match="broken.npz"):
        load_matches(broken)
    with pytest.raises(MatchesError, match="missing.npz"):
        load_matches(tmp_path / "missing.npz")
    coco, results = _one_image()
    matches = compute_matches(coco, results)
    with pytest.raises(MatchesError, match="det_tp has shape"):
        save_matches(tmp_path / "bad.npz", {**matches, "det_tp": matches["det_tp"][:, :3]})
    partial = tmp_path / "partial.npz"
    np.savez(partial, image_ids=matches["image_ids"])
    with pytest.raises(MatchesError, match="partial.npz: matches lack category_ids"):
        load_matches(partial)


def test_runs_on_other_images_are_refused_naming_both():
    coco, results = random_coco(2)
    matches = compute_matches(coco, results)
    other = {**matches, "image_ids": matches["image_ids"] + 1}
    check_same_images(matches, dict(matches), "a/eval_matches.npz", "b/eval_matches.npz")
    with pytest.raises(MatchesMismatchError, match=r"a/eval_matches\.npz and b/eval_matches\.npz .* same images"):
        check_same_images(matches, other, "a/eval_matches.npz", "b/eval_matches.npz")
    fewer = {**matches, "category_ids": matches["category_ids"][:2]}
    with pytest.raises(MatchesMismatchError, match="same categories"):
        check_same_images(matches, fewer, "a", "b")
