"""The evaluation benchmark's detections, and equal AP from both COCOeval backends on them."""

from __future__ import annotations

import contextlib
import io

import pytest
from pycocotools.coco import COCO

from benchmarks.eval import jittered_detections
from experiments.evaluation import coco_evaluate


def _coco_gt() -> COCO:
    images = [{"id": i, "width": 128, "height": 96, "file_name": f"{i}.png"} for i in (1, 2, 3)]
    boxes = {1: [[10, 10, 30, 20], [60, 40, 20, 30]], 2: [[5, 50, 50, 40]], 3: []}
    annotations = [
        {"id": 10 * image_id + k, "image_id": image_id, "category_id": 7 + k % 2, "bbox": box,
         "area": box[2] * box[3], "iscrowd": 0}
        for image_id, image_boxes in boxes.items()
        for k, box in enumerate(image_boxes)
    ]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": 7, "name": "a"}, {"id": 8, "name": "b"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def test_detections_are_seeded_and_refer_to_the_gt():
    coco = _coco_gt()
    results = jittered_detections(coco)
    assert results == jittered_detections(coco)
    assert {r["image_id"] for r in results} == {1, 2, 3}  # false positives on the image without GT too
    assert {r["category_id"] for r in results} <= {7, 8}
    assert all(r["bbox"][2] > 0 and r["bbox"][3] > 0 and 0 <= r["score"] <= 1 for r in results)


def test_both_backends_give_the_same_ap():
    coco = _coco_gt()
    results = jittered_detections(coco)
    expected = coco_evaluate(coco, results, backend="pycocotools")
    faster = coco_evaluate(coco, results, backend="faster")
    assert faster.keys() == expected.keys()
    for name, value in expected.items():  # None: an area range without GT
        assert faster[name] is None if value is None else faster[name] == pytest.approx(value, rel=0, abs=1e-9)
