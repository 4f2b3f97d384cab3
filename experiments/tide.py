"""Error analysis of a run's detections: the AP lost to each error type, as TIDE defines them.

Bolya et al., "TIDE: A General Toolbox for Identifying Object Detection Errors", ECCV 2020; restated
from its reference code (tidecv 1.0.1, ``quantify.py``, ``ap.py``, ``errors/``), which the tests use
as the oracle. tidecv itself is not a dependency: it is unmaintained since 2020 and imports OpenCV
for its plots. Torch-free: numpy and pycocotools.

At IoU threshold ``pos`` (0.5) and background threshold ``bg`` (0.1), per image, with detections sorted
by score and cut to the best ``max_dets`` (100, over all classes):
- a detection is a true positive when it is matched greedily, in score order, to the unmatched GT of
  its class of highest IoU, and that IoU is >= ``pos``; an unmatched detection inside a crowd region of
  its class (intersection over its own area > ``pos``) is ignored;
- every other detection is one error, the first that applies: **loc** (its best same-class IoU is in
  [bg, pos]), **cls** (IoU >= pos with a GT of another class), **dupe** (IoU >= pos with a same-class
  GT already matched), **bkg** (IoU <= bg with every GT), else **both**;
- a GT left unmatched that no loc/cls error could take is **miss**ed.
The dAP of an error type is the AP at ``pos`` after fixing only the errors of that type, minus the AP:
loc and cls errors become true positives (only the highest-scoring one per GT, the others are dropped),
dupe, bkg and both errors are dropped, missed GTs are removed from the count of positives (negative
gains are reported as 0). **fp**: the AP with every false positive scored 0; **fn**: with every
unmatched GT removed (both minus the AP, not clamped). AP is TIDE's: per class, the 101-point
interpolated precision at ``pos``, averaged over the classes with a detection or a GT.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from .runfiles import MAIN_ERRORS

RECALL_POINTS = np.array([step / 100 for step in range(101)])  # as TIDE (and COCO) write them: 0.3 is 30 / 100


@dataclass
class _Error:
    kind: str
    cls: int
    pred_id: int = -1  # -1 for a missed GT
    score: float = 0.0
    ignored: bool = False  # the detection was ignored (crowd); it has no data point before a fix
    gt_key: tuple | None = None  # (image, gt index) the error could be fixed against, for loc and cls
    gt_usable: bool = False  # that GT was unmatched when the error was found
    fixed_cls: int = -1  # for cls errors: the class of the GT it would match


@dataclass
class _Run:
    points: dict[int, list] = field(default_factory=lambda: defaultdict(list))  # cls -> [(id, score, correct)]
    gt_positives: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    false_negatives: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    errors: list[_Error] = field(default_factory=list)
    best_for_gt: dict[tuple, tuple[float, int]] = field(default_factory=dict)  # gt key -> (score, pred id)


def class_ap(points: list, num_gt: int) -> float:
    """TIDE's AP of one class: 101-point interpolated precision (percent); points are (id, score, correct)."""
    if num_gt == 0 or not points:
        return 0.0
    ordered = sorted(points, key=lambda point: -point[1])
    correct = np.array([point[2] for point in ordered], dtype=bool)
    true_positives = np.cumsum(correct)
    precision = true_positives / np.arange(1, len(ordered) + 1)
    recall = true_positives / num_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    indices = np.searchsorted(recall, RECALL_POINTS, side="left")
    interpolated = np.where(indices < len(precision), precision[np.minimum(indices, len(precision) - 1)], 0.0)
    return float(interpolated.sum() / 101 * 100)


def mean_ap(points: dict[int, list], gt_positives: dict[int, int]) -> float:
    classes = [c for c in set(points) | set(gt_positives) if points.get(c) or gt_positives.get(c, 0) != 0]
    return float(np.mean([class_ap(points.get(c, []), gt_positives.get(c, 0)) for c in classes])) if classes else 0.0


def _image(run: _Run, image: int, preds: list[dict], gts: list[dict], pos: float, bg: float, max_dets: int) -> None:
    """Match one image's detections and record its data points and errors (tidecv ``_eval_image``)."""
    truths = [g for g in gts if not g["iscrowd"]]
    crowds = [g for g in gts if g["iscrowd"]]
    for truth in truths:
        run.gt_positives[truth["category_id"]] += 1
    if not preds:
        for truth in truths:
            run.false_negatives[truth["category_id"]] += 1
            run.errors.append(_Error("miss", truth["category_id"]))
        return
    preds = sorted(preds, key=lambda p: -p["score"])[:max_dets]
    boxes = [p["bbox"] for p in preds]
    pred_cls = np.array([p["category_id"] for p in preds])
    used = np.zeros(len(preds), dtype=object)
    used[:] = False
    gt_used = np.zeros(len(truths), dtype=bool)
    if truths:
        iou = np.asarray(mask_utils.iou(boxes, [t["bbox"] for t in truths], [0] * len(truths))).reshape(len(preds), -1)
        same_cls = pred_cls[:, None] == np.array([t["category_id"] for t in truths])[None, :]
        cls_iou = iou * same_cls
        buffer = cls_iou.copy()
        for index in range(len(preds)):
            best = int(np.argmax(buffer[index]))
            if buffer[index, best] >= pos:
                used[index], gt_used[best] = True, True
                buffer[:, best] = 0
    for crowd in crowds:
        crowd_iou = np.asarray(mask_utils.iou(boxes, [crowd["bbox"]], [1])).reshape(-1)
        for index in range(len(preds)):
            if used[index] is False and crowd_iou[index] > pos and crowd["category_id"] == pred_cls[index]:
                used[index] = None
    gt_usable = np.zeros(len(truths), dtype=bool)
    for index, pred in enumerate(preds):
        cls, score, pred_id = int(pred["category_id"]), float(pred["score"]), int(pred["_id"])
        if used[index] is not None:
            run.points[cls].append((pred_id, score, bool(used[index])))
        if used[index] is True:
            continue
        error = _Error("", cls, pred_id, score, ignored=used[index] is None)
        if not truths:
            error.kind = "bkg"
        else:
            loc_best = int(np.argmax(cls_iou[index]))
            cls_best = int(np.argmax(iou[index] * ~same_cls[index]))
            dupe = (cls_iou[index] * gt_used).max()
            if bg <= cls_iou[index, loc_best] <= pos:
                error.kind, target = "loc", loc_best
            elif (iou[index] * ~same_cls[index])[cls_best] >= pos:
                error.kind, target = "cls", cls_best
            elif dupe >= pos:
                error.kind, target = "dupe", None
            elif iou[index].max() <= bg:
                error.kind, target = "bkg", None
            else:
                error.kind, target = "both", None
            if target is not None:
                key = (image, target)
                error.gt_key = key
                error.gt_usable = not gt_used[target]
                if error.gt_usable:
                    gt_usable[target] = True
                    # BestGTMatch: the first (highest-scoring) detection of a GT keeps it, on ties too.
                    if key not in run.best_for_gt or run.best_for_gt[key][0] < score:
                        run.best_for_gt[key] = (score, pred_id)
                if error.kind == "cls":
                    error.fixed_cls = int(truths[target]["category_id"])
        run.errors.append(error)
    for index, truth in enumerate(truths):
        if not gt_used[index]:
            run.false_negatives[truth["category_id"]] += 1
            if not gt_usable[index]:
                run.errors.append(_Error("miss", truth["category_id"]))


def _fixed(run: _Run, kind: str | None, transform=None, remove_false_negatives: bool = False) -> float:
    """TIDE's mAP after fixing the errors of ``kind`` (tidecv ``fix_errors``; None fixes nothing)."""
    gt_positives = dict(run.gt_positives)
    points: dict[int, list] = defaultdict(list)
    for error in run.errors:
        if error.kind == kind:
            if error.kind == "miss":
                gt_positives[error.cls] -= 1
                continue
            if error.kind in ("loc", "cls") and error.gt_usable and run.best_for_gt[error.gt_key][1] == error.pred_id:
                cls = error.fixed_cls if error.kind == "cls" else error.cls
                point = (error.pred_id, error.score, True)
            else:
                continue  # dropped: dupe, bkg, both, and loc/cls errors that are not their GT's best
        elif error.kind == "miss" or error.ignored:
            continue
        else:
            cls, point = error.cls, (error.pred_id, error.score, False)
        points[cls].append(transform(point) if transform else point)
    for cls in gt_positives:
        for point in run.points.get(cls, []):
            if point[2]:
                points[cls].append(transform(point) if transform else point)
    if remove_false_negatives:
        gt_positives = {cls: count - run.false_negatives.get(cls, 0) for cls, count in gt_positives.items()}
    return mean_ap(points, gt_positives)


def tide_errors(coco_gt: Any, results: list[dict], *, pos: float = 0.5, bg: float = 0.1,
                max_dets: int = 100) -> dict[str, Any]:
    """dAP of each error type (``MAIN_ERRORS``, ``SPECIAL_ERRORS``), the AP they are relative to (``ap``) and
    the number of errors of each main type (``counts``).

    coco_gt: a pycocotools ``COCO``; results: COCO results dicts (``image_id``, ``category_id``, ``bbox``
    xywh, ``score``), as ``detections.json`` holds them.
    """
    by_image: dict[int, list[dict]] = defaultdict(list)
    for pred_id, det in enumerate(results):
        by_image[int(det["image_id"])].append({**det, "_id": pred_id})
    run = _Run()
    for image in [img["id"] for img in coco_gt.dataset.get("images", [])]:
        gts = [{"category_id": a["category_id"], "bbox": a["bbox"], "iscrowd": bool(a.get("iscrowd", 0))}
               for a in coco_gt.imgToAnns.get(image, [])]
        _image(run, image, by_image.get(image, []), gts, pos, bg, max_dets)
    ap = mean_ap(run.points, run.gt_positives)
    errors: dict[str, Any] = {kind: max(_fixed(run, kind) - ap, 0.0) for kind in MAIN_ERRORS}
    errors["fp"] = _fixed(run, None, transform=lambda p: (p[0], 1.0 if p[2] else 0.0, p[2])) - ap
    errors["fn"] = _fixed(run, None, remove_false_negatives=True) - ap
    errors["ap"] = ap
    errors["counts"] = {kind: sum(e.kind == kind for e in run.errors) for kind in MAIN_ERRORS}
    return errors


def add_errors(run_dir: Path) -> dict[str, Any]:
    """Compute ``errors`` of a finished run from its ``detections.json`` and the val annotations its
    ``metrics.json`` names, and write them into that ``metrics.json`` (runs finished before error analyses
    existed). Returns the errors; FileNotFoundError / ValueError naming what is missing."""
    import contextlib
    import io
    import json

    from pycocotools.coco import COCO

    from .runfiles import RunPaths, read_metrics, val_annotation_file, write_metrics

    paths = RunPaths(run_dir)
    metrics = read_metrics(paths.metrics)
    if not metrics or metrics.get("status") != "done":
        raise ValueError(f"{paths.metrics}: not a done run")
    ann_file = val_annotation_file(run_dir)
    if not paths.detections.is_file():
        raise FileNotFoundError(f"{paths.detections} does not exist (detections are kept by runs, not committed)")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_file))
    metrics["errors"] = tide_errors(coco, json.loads(paths.detections.read_text()))
    write_metrics(paths.metrics, metrics)
    return metrics["errors"]


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.tide RUN_DIR [...]``: add the error analysis to finished runs (``add_errors``)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m experiments.tide", description=main.__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    status = 0
    for run_dir in parser.parse_args(argv).run_dirs:
        try:
            errors = add_errors(run_dir)
        except (FileNotFoundError, ValueError) as exc:
            print(f"experiments.tide: error: {exc}", file=sys.stderr)
            status = 1
            continue
        print(f"[assignbench] {run_dir}: " + "  ".join(f"{k} {errors[k]:.2f}" for k in (*MAIN_ERRORS, "fp", "fn")))
    return status


__all__ = ["add_errors", "class_ap", "main", "mean_ap", "tide_errors"]

if __name__ == "__main__":
    raise SystemExit(main())
