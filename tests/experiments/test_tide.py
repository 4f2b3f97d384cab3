"""TIDE error analysis (experiments.tide): hand-built cases, and the reference code (tidecv) as the oracle."""

import numpy as np
import pytest
from pycocotools.coco import COCO

from experiments.runfiles import MAIN_ERRORS
from experiments.tide import class_ap, tide_errors


def make_coco(images: dict[int, list[tuple]]) -> COCO:
    """images: {image id: [(category, [x, y, w, h], iscrowd), ...]}, categories 1-3."""
    coco = COCO()
    annotations = []
    for image, anns in images.items():
        for category, box, crowd in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image, "category_id": category, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": int(crowd)})
    coco.dataset = {"images": [{"id": i, "width": 200, "height": 200} for i in images],
                    "annotations": annotations, "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}
    coco.createIndex()
    return coco


def det(image, category, box, score):
    return {"image_id": image, "category_id": category, "bbox": box, "score": score}


GT_BOX = [10, 10, 40, 40]


def test_class_ap_by_hand():
    # 2 GTs; detections by score: TP, FP, TP -> precision 1, 1/2, 2/3 -> interpolated 1 up to recall 0.5,
    # 2/3 up to recall 1: AP = (51 * 1 + 50 * 2/3) / 101.
    points = [(0, 0.9, True), (1, 0.8, False), (2, 0.7, True)]
    assert class_ap(points, 2) == pytest.approx((51 + 50 * 2 / 3) / 101 * 100)
    assert class_ap([], 3) == 0.0 and class_ap(points, 0) == 0.0


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("loc", det(1, 1, [25, 10, 40, 40], 0.95)),  # IoU 25 / 55 = 0.45 with the class-1 GT, which is free
        ("cls", det(1, 2, [10, 10, 40, 40], 0.95)),  # IoU 1 with the GT, wrong class
        ("dupe", det(1, 1, [11, 10, 40, 40], 0.5)),  # IoU 0.95 with the GT, which the 0.9 box matched first
        ("bkg", det(1, 1, [150, 150, 20, 20], 0.5)),  # no overlap with anything
        ("both", det(1, 2, [25, 10, 40, 40], 0.5)),  # IoU 0.45 with a GT of another class
    ],
)
def test_one_error_of_each_kind(kind, extra):
    # Image 1 has one class-1 GT. The 0.9 detection is a true positive, except for "loc" and "cls", where
    # the error is the only detection (so the GT is free to take it when fixed).
    coco = make_coco({1: [(1, GT_BOX, False)]})
    true_positive = det(1, 1, GT_BOX, 0.9)
    results = [extra] if kind in ("loc", "cls") else [true_positive, extra]
    errors = tide_errors(coco, results)
    assert errors["counts"] == {k: int(k == kind) for k in MAIN_ERRORS}
    if kind in ("loc", "cls"):
        # AP 0 (the GT is missed); fixing the error makes it a true positive: AP 100, dAP 100. The GT is
        # not counted as missed, since the error can take it.
        assert errors["ap"] == 0.0 and errors[kind] == pytest.approx(100.0)
        assert errors["fn"] == pytest.approx(0.0)  # no GT left to count: the class has 0 positives, AP 0
    elif kind == "both":
        # The class-2 detection makes class 2 a class of the mAP with no GT (AP 0): mAP (100 + 0) / 2;
        # dropping it leaves class 1 alone: dAP 50 (TIDE averages over classes with a detection or a GT).
        assert errors["ap"] == pytest.approx(50.0) and errors[kind] == pytest.approx(50.0)
    else:
        # TP at 0.9 first: AP 100 whatever follows; dropping the error changes nothing.
        assert errors["ap"] == pytest.approx(100.0) and errors[kind] == 0.0


def test_false_positive_above_the_true_one_costs_ap_that_its_fix_returns():
    # A background detection scoring above the true positive: precision 1/2 at recall 1 -> AP 50; dropping
    # it (bkg fix) gives 100; scoring every false positive 0 (fp) too.
    coco = make_coco({1: [(1, GT_BOX, False)]})
    errors = tide_errors(coco, [det(1, 1, [150, 150, 20, 20], 0.95), det(1, 1, GT_BOX, 0.9)])
    assert errors["ap"] == pytest.approx(50.0)
    assert errors["bkg"] == pytest.approx(50.0) and errors["fp"] == pytest.approx(50.0)
    assert errors["loc"] == errors["cls"] == errors["miss"] == 0.0


def test_missed_gt_and_crowd_ignore():
    # Two GTs, one detected: AP ~ 50 (recall 1/2); the other GT is missed -> removing it gives 100. A
    # detection inside a crowd region of its class is ignored: no data point, and (with GTs in the image) it
    # still gets an error type (here bkg: it overlaps no GT).
    coco = make_coco({1: [(1, GT_BOX, False), (1, [100, 100, 40, 40], False), (1, [150, 0, 50, 50], True)]})
    errors = tide_errors(coco, [det(1, 1, GT_BOX, 0.9), det(1, 1, [160, 10, 20, 20], 0.95)])
    assert errors["ap"] == pytest.approx(51 / 101 * 100)
    assert errors["miss"] == pytest.approx(100 - 51 / 101 * 100)
    assert errors["counts"]["miss"] == 1 and errors["counts"]["bkg"] == 1


def _random_case(seed):
    rng = np.random.default_rng(seed)
    images, results = {}, []
    for image in range(1, 13):
        anns = []
        for _ in range(rng.integers(0, 6)):
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(8, 60, 2)
            anns.append((int(rng.integers(1, 4)), [float(x), float(y), float(w), float(h)], bool(rng.random() < 0.1)))
        images[image] = anns
        for category, (x, y, w, h), _ in anns:
            for _ in range(rng.integers(0, 4)):  # jittered copies, sometimes of another class
                jitter = rng.normal(0, 0.25, 4) * [w, h, w, h]
                cls = category if rng.random() < 0.8 else int(rng.integers(1, 4))
                results.append(det(image, cls, [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]),
                                                max(1.0, h + jitter[3])], float(rng.random())))
        for _ in range(rng.integers(0, 3)):  # background
            results.append(det(image, int(rng.integers(1, 4)), [*rng.uniform(0, 180, 2).tolist(), 15.0, 15.0],
                               float(rng.random())))
    return images, results


@pytest.mark.parametrize("seed", range(6))
def test_equals_the_reference_code(seed):
    from tidecv import TIDE
    from tidecv.data import Data
    from tidecv.errors.main_errors import (
        BackgroundError,
        BoxError,
        ClassError,
        DuplicateError,
        FalseNegativeError,
        FalsePositiveError,
        MissedError,
        OtherError,
    )

    images, results = _random_case(seed)
    gt, preds = Data("gt"), Data("preds")
    for image, anns in images.items():
        gt.add_image(image, str(image))
        for category, box, crowd in anns:
            (gt.add_ignore_region if crowd else gt.add_ground_truth)(image, category, box)
    for d in results:
        preds.add_detection(d["image_id"], d["category_id"], d["score"], d["bbox"])
    run = TIDE().evaluate(gt, preds, mode=TIDE.BOX)
    main, special = run.fix_main_errors(), run.fix_special_errors()
    ours = tide_errors(make_coco(images), results)
    assert ours["ap"] == pytest.approx(run.ap, abs=1e-9)
    kinds = {"cls": ClassError, "loc": BoxError, "both": OtherError, "dupe": DuplicateError,
             "bkg": BackgroundError, "miss": MissedError}
    assert {k: ours[k] for k in kinds} == pytest.approx({k: main[v] for k, v in kinds.items()}, abs=1e-9)
    assert ours["fp"] == pytest.approx(special[FalsePositiveError], abs=1e-9)
    assert ours["fn"] == pytest.approx(special[FalseNegativeError], abs=1e-9)
    assert ours["counts"] == {k: len(run.error_dict[v]) for k, v in kinds.items()}


def test_add_errors_to_a_finished_run(tmp_path, capsys):
    import json

    from experiments.tide import main

    images = {1: [(1, GT_BOX, False)]}
    ann = tmp_path / "instances_val.json"
    coco = make_coco(images)
    ann.write_text(json.dumps(coco.dataset))
    run = tmp_path / "g" / "a-s0"
    run.mkdir(parents=True)
    from experiments.runfiles import METRIC_FIELDS

    metrics = dict.fromkeys(METRIC_FIELDS) | {"status": "done", "environment": {"annotations": [str(ann), str(ann)]}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "detections.json").write_text(json.dumps([det(1, 1, [150, 150, 20, 20], 0.95), det(1, 1, GT_BOX, 0.9)]))
    assert main([str(run)]) == 0
    errors = json.loads((run / "metrics.json").read_text())["errors"]
    assert errors["ap"] == pytest.approx(50.0) and errors["bkg"] == pytest.approx(50.0)
    (run / "detections.json").unlink()
    assert main([str(run)]) == 1 and "detections.json does not exist" in capsys.readouterr().err
