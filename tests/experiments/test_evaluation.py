"""COCO evaluation backends and the IoU-prediction error (paper Table 2, right)."""

import copy

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from experiments.evaluation import AP_NAMES, coco_evaluate, detections_to_coco, iou_prediction_error


def _coco(dataset):
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _gt(num_images=6, seed=0):
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, num_images + 1):
        images.append({"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"})
        for _ in range(rng.integers(1, 5)):
            x, y = rng.uniform(0, 120, 2)
            w, h = rng.uniform(8, 80, 2)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.integers(1, 4)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    cats = [{"id": c, "name": str(c)} for c in (1, 2, 3)]
    return {"images": images, "annotations": anns, "categories": cats}


def test_perfect_detections_score_100_and_none_score_0():
    gt = _gt()
    coco = _coco(gt)
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
            for a in gt["annotations"]]
    ap = coco_evaluate(coco, dets)
    assert ap["AP"] == pytest.approx(100.0) and ap["AP50"] == pytest.approx(100.0)
    assert coco_evaluate(coco, []) == {**{k: 0.0 for k in AP_NAMES}, "APl": None}  # no GT above 96^2


def test_no_detections_match_cocoeval_with_one_useless_detection():
    """Oracle: COCOeval scoring one detection that overlaps no GT gives 0 where the area range has
    a scored GT and -1 where it has none; an empty result list (which loadRes rejects) must agree."""
    useless = [{"image_id": 1, "category_id": 1, "bbox": [198.0, 198.0, 1.0, 1.0], "score": 0.5}]
    patterns = set()
    for seed in range(8):
        gt = _gt(num_images=3, seed=seed)
        rng = np.random.default_rng(seed)
        for a in gt["annotations"]:  # large boxes and crowds, at random
            if rng.random() < 0.3:
                a["bbox"][2:] = [120.0, 110.0]
                a["area"] = 120.0 * 110.0
            a["iscrowd"] = int(rng.random() < 0.4)
        expected = coco_evaluate(_coco(copy.deepcopy(gt)), useless)  # (COCOeval writes into GT dicts)
        assert set(expected.values()) <= {0.0, None}
        assert coco_evaluate(_coco(gt), []) == expected, seed
        patterns.add(tuple(expected[k] is None for k in ("APs", "APm", "APl")))
    assert len(patterns) >= 3, patterns  # the seeds cover ranges with and without scored GT


def test_faster_backend_gives_the_same_six_numbers():
    pytest.importorskip("faster_coco_eval")
    gt = _gt(num_images=20, seed=1)
    coco = _coco(gt)
    rng = np.random.default_rng(2)
    dets = []
    for a in gt["annotations"]:
        for _ in range(3):  # jittered copies with random scores, some with a wrong class
            x, y, w, h = a["bbox"]
            j = rng.normal(0, 0.15, 4) * [w, h, w, h]
            cat = a["category_id"] if rng.random() > 0.2 else int(rng.integers(1, 4))
            dets.append({"image_id": a["image_id"], "category_id": cat,
                         "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])],
                         "score": float(rng.random())})
    ref = coco_evaluate(coco, dets, "pycocotools")
    fast = coco_evaluate(coco, dets, "faster")
    assert 0 < ref["AP"] < 100
    assert ref["APl"] is None and fast["APl"] is None  # no GT above 96^2 px: null, not -100
    for k in AP_NAMES[:5]:
        assert fast[k] == pytest.approx(ref[k], abs=1e-6), k


def test_unknown_backend_lists_choices():
    with pytest.raises(ValueError, match="pycocotools, faster"):
        coco_evaluate(_coco(_gt()), [{"image_id": 1}], "detectron")


def test_iou_prediction_error_by_hand():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0], [100.0, 100.0, 110.0, 110.0]])
    dets = torch.tensor(
        [
            [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 with GT 0 -> counts
            [0.0, 0.0, 10.0, 10.0],  # IoU 1.0 -> counts
            [100.0, 100.0, 110.0, 102.0],  # IoU 0.2 -> below 0.5, ignored
        ]
    )
    quality = torch.tensor([0.7, 0.9, 0.5])
    total, count = iou_prediction_error(dets, quality, gt)
    assert count == 2
    assert total == pytest.approx(abs(0.7 - 0.5) + abs(0.9 - 1.0))
    assert iou_prediction_error(dets[:0], quality[:0], gt) == (0.0, 0)


def test_detections_to_coco_undoes_the_resize():
    dets = {"boxes": torch.tensor([[20.0, 10.0, 60.0, 30.0]]), "scores": torch.tensor([0.5]),
            "labels": torch.tensor([2])}
    out = detections_to_coco(dets, image_id=7, scale=2.0, label_to_category_id=[1, 2, 5])
    assert out == [{"image_id": 7, "category_id": 5, "bbox": [10.0, 5.0, 20.0, 10.0], "score": 0.5}]
