"""Per-detection COCOeval matches of one evaluation (``eval_matches.npz``): what paired CIs of AP need.

COCOeval's AP (``stats[0]``: bbox, IoU 0.50:0.95, area "all", maxDets 100) is a function of, per
category, the detections sorted by score, whether each is a true positive / ignored at each IoU
threshold, and the number of non-ignored GTs. ``compute_matches`` runs ``COCOeval.evaluate()`` once
and reads exactly those from its per-image results (``evalImgs``: ``dtMatches``, ``dtIgnore``,
``gtIgnore``, ``dtScores``), so ``analysis.bootstrap`` can recompute the AP of any resample of the
images without matching boxes again.

Arrays of a matches dict (``D`` detections, ``I`` images, ``K`` categories, ``T`` IoU thresholds):

- ``image_ids`` (I,) int64 and ``category_ids`` (K,) int64: COCOeval's ``params.imgIds`` and
  ``params.catIds`` (sorted); two runs are comparable only when both are equal.
- ``iou_thresholds`` (T,) and ``recall_thresholds`` (101,) float64: COCOeval's ``iouThrs``, ``recThrs``.
- ``det_image`` (D,) and ``det_category`` (D,) int32: indices into ``image_ids`` / ``category_ids``.
- ``det_score`` (D,) float64.
- ``det_tp`` (D, T) bool: matched to a GT and not ignored (COCOeval's ``tps``); ``det_ignore`` (D, T)
  bool: ``dtIgnore`` (matched to a crowd or ignored GT). A detection neither is a false positive.
- ``num_gt`` (I, K) int32: non-ignored GTs (``gtIgnore == 0``) of each image and category.

Detections are stored in the order COCOeval's ``accumulate`` concatenates them: category, then
image (in ``image_ids`` order), then score descending within the image (COCOeval's mergesort), at
most 100 per image and category. The order matters for tied scores, which a stable sort by score
keeps in this order, as COCOeval's does. Torch-free: numpy and pycocotools only.
"""

from __future__ import annotations

import contextlib
import copy
import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from experiments.runfiles import MATCHES_FILE, atomic_write_bytes

__all__ = [
    "MATCHES_FILE",
    "MATCH_KEYS",
    "MAX_DETS",
    "MatchesError",
    "MatchesMismatchError",
    "check_same_images",
    "compute_matches",
    "load_matches",
    "matches_from_eval",
    "save_matches",
    "validate_matches",
]

MAX_DETS = 100  # stats[0]'s maxDets
AREA = "all"  # stats[0]'s area range
MATCH_KEYS = (
    "image_ids",
    "category_ids",
    "iou_thresholds",
    "recall_thresholds",
    "det_image",
    "det_category",
    "det_score",
    "det_tp",
    "det_ignore",
    "num_gt",
)


class MatchesError(ValueError):
    """A matches file or dict is unreadable or inconsistent; the message names it."""


class MatchesMismatchError(MatchesError):
    """Two runs' matches were not scored on the same images and categories; the message names both."""


def compute_matches(coco_gt, results: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Run bbox ``COCOeval.evaluate()`` of ``results`` against ``coco_gt`` once and return its matches.

    coco_gt: a pycocotools ``COCO`` with the ground truth (COCOeval sets each annotation's
    ``ignore`` field, as ``experiments.evaluation.coco_evaluate`` does). results: COCO results
    dicts (``image_id``, ``category_id``, ``bbox`` xywh, ``score``); not modified. An empty list
    gives matches without detections.
    """
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(copy.deepcopy(results)) if results else no_detections(coco_gt)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
    return matches_from_eval(evaluator)


def no_detections(coco_gt):
    """An empty results ``COCO`` over ``coco_gt``'s images and categories (``loadRes`` rejects [])."""
    from pycocotools.coco import COCO

    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": list(coco_gt.dataset["categories"]),
        "annotations": [],
    }
    coco_dt.createIndex()
    return coco_dt


def matches_from_eval(evaluator) -> dict[str, np.ndarray]:
    """The matches of a bbox ``COCOeval`` on which ``evaluate()`` has run (``accumulate`` need not).

    Reads ``evalImgs`` for area range "all" as ``accumulate`` does for maxDets 100: entry
    ``k * A * I + a * I + i`` is category k, area range a, image i; None where the image has
    neither GT nor detections of the category.
    """
    params = evaluator.params
    if not evaluator.evalImgs:
        raise MatchesError("COCOeval.evaluate() has not run: evalImgs is empty")
    image_ids = np.asarray(params.imgIds, dtype=np.int64)
    category_ids = np.asarray(params.catIds, dtype=np.int64)
    num_images, num_areas = len(image_ids), len(params.areaRng)
    area = params.areaRngLbl.index(AREA)
    num_thresholds = len(params.iouThrs)
    num_gt = np.zeros((num_images, len(category_ids)), dtype=np.int32)
    det_image, det_category, det_score, det_tp, det_ignore = [], [], [], [], []
    for k in range(len(category_ids)):
        offset = k * num_areas * num_images + area * num_images
        for i in range(num_images):
            entry = evaluator.evalImgs[offset + i]
            if entry is None:
                continue
            num_gt[i, k] = np.count_nonzero(np.asarray(entry["gtIgnore"]) == 0)
            scores = np.asarray(entry["dtScores"][:MAX_DETS], dtype=np.float64)
            if not len(scores):
                continue
            # accumulate: tps = dtm & ~dtIg, where dtm holds the matched GT's id (0: none).
            matched = np.asarray(entry["dtMatches"])[:, :MAX_DETS] != 0
            ignored = np.asarray(entry["dtIgnore"], dtype=bool)[:, :MAX_DETS]
            det_image.append(np.full(len(scores), i, dtype=np.int32))
            det_category.append(np.full(len(scores), k, dtype=np.int32))
            det_score.append(scores)
            det_tp.append((matched & ~ignored).T)
            det_ignore.append(ignored.T)
    empty_flags = np.zeros((0, num_thresholds), dtype=bool)
    return {
        "image_ids": image_ids,
        "category_ids": category_ids,
        "iou_thresholds": np.asarray(params.iouThrs, dtype=np.float64),
        "recall_thresholds": np.asarray(params.recThrs, dtype=np.float64),
        "det_image": np.concatenate(det_image) if det_image else np.zeros(0, dtype=np.int32),
        "det_category": np.concatenate(det_category) if det_category else np.zeros(0, dtype=np.int32),
        "det_score": np.concatenate(det_score) if det_score else np.zeros(0, dtype=np.float64),
        "det_tp": np.concatenate(det_tp) if det_tp else empty_flags,
        "det_ignore": np.concatenate(det_ignore) if det_ignore else empty_flags.copy(),
        "num_gt": num_gt,
    }


def validate_matches(matches: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """``matches`` with every array of MATCH_KEYS at its dtype; raises MatchesError naming ``source``
    when one is missing or the shapes disagree."""
    missing = [key for key in MATCH_KEYS if key not in matches]
    if missing:
        raise MatchesError(f"{source}: matches lack {', '.join(missing)}")
    out = {
        "image_ids": np.asarray(matches["image_ids"], dtype=np.int64).reshape(-1),
        "category_ids": np.asarray(matches["category_ids"], dtype=np.int64).reshape(-1),
        "iou_thresholds": np.asarray(matches["iou_thresholds"], dtype=np.float64).reshape(-1),
        "recall_thresholds": np.asarray(matches["recall_thresholds"], dtype=np.float64).reshape(-1),
        "det_image": np.asarray(matches["det_image"], dtype=np.int32).reshape(-1),
        "det_category": np.asarray(matches["det_category"], dtype=np.int32).reshape(-1),
        "det_score": np.asarray(matches["det_score"], dtype=np.float64).reshape(-1),
        "det_tp": np.asarray(matches["det_tp"], dtype=bool),
        "det_ignore": np.asarray(matches["det_ignore"], dtype=bool),
        "num_gt": np.asarray(matches["num_gt"], dtype=np.int32),
    }
    num_dets, num_images = len(out["det_score"]), len(out["image_ids"])
    num_categories, num_thresholds = len(out["category_ids"]), len(out["iou_thresholds"])
    problems = []
    if len(out["det_image"]) != num_dets or len(out["det_category"]) != num_dets:
        problems.append("det_image, det_category and det_score differ in length")
    for key in ("det_tp", "det_ignore"):
        if out[key].shape != (num_dets, num_thresholds):
            problems.append(f"{key} has shape {out[key].shape}, expected {(num_dets, num_thresholds)}")
    if out["num_gt"].shape != (num_images, num_categories):
        problems.append(f"num_gt has shape {out['num_gt'].shape}, expected {(num_images, num_categories)}")
    if num_dets and not (0 <= out["det_image"].min() and out["det_image"].max() < num_images):
        problems.append("det_image indexes past image_ids")
    if num_dets and not (0 <= out["det_category"].min() and out["det_category"].max() < num_categories):
        problems.append("det_category indexes past category_ids")
    if not problems and np.any(out["det_tp"] & out["det_ignore"]):
        problems.append("a detection is both a true positive and ignored")
    if problems:
        raise MatchesError(f"{source}: inconsistent matches: {'; '.join(problems)}")
    return out


def save_matches(path: str | Path, matches: dict[str, np.ndarray]) -> None:
    """Write ``matches`` to ``path`` as a compressed npz, atomically (temp file in the same
    directory, then ``os.replace``: readers see the old file or the new one, never a part)."""
    checked = validate_matches(matches, str(path))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **checked)
    atomic_write_bytes(path, buffer.getvalue())


def load_matches(path: str | Path) -> dict[str, np.ndarray]:
    """Read a file of ``save_matches``; raises MatchesError (naming ``path``) when absent, unreadable
    or inconsistent."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            matches = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise MatchesError(f"{path}: unreadable matches file: {exc}") from exc
    return validate_matches(matches, str(path))


def check_same_images(
    first: dict[str, np.ndarray], second: dict[str, np.ndarray], first_name: str, second_name: str
) -> None:
    """Raise MatchesMismatchError, naming both, unless the two were scored on the same images and
    categories (equal ``image_ids`` and ``category_ids``), so that image i means the same in both."""
    for key, what in (("image_ids", "images"), ("category_ids", "categories")):
        a, b = np.asarray(first[key]), np.asarray(second[key])
        if a.shape != b.shape or not np.array_equal(a, b):
            only_first = np.setdiff1d(a, b)[:5].tolist()
            only_second = np.setdiff1d(b, a)[:5].tolist()
            raise MatchesMismatchError(
                f"{first_name} and {second_name} were not scored on the same {what}: "
                f"{len(a)} vs {len(b)} {key}; only in the first: {only_first}, only in the second: "
                f"{only_second} (at most 5 shown); paired CIs need the same val set"
            )
