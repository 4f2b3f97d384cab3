"""Bad data: a clear error naming the file (and image), or a counted fix, never a lost run.

Defined behaviour:

* A missing or malformed annotation JSON, or a missing image file, fails the run before its
  first iteration (``build_dataset`` and ``CocoDetection.validate``) with a DatasetError naming
  the file, and the image id for images; ``metrics.json`` records it and nothing was trained.
* An image file that exists but cannot be decoded is found when it is first read (checking every
  image up front would decode the whole data set); the run fails then with the path and image id.
* Boxes with w or h <= 0, boxes outside the image and annotations of unknown categories are
  clipped or dropped by the loader, with one warning that counts each kind; training goes on.
* ``iscrowd`` annotations: in training, negatives covering a crowd box (IoF >= 0.5) are ignored;
  in evaluation COCOeval handles them as usual (a detection on a crowd region is no false
  positive). Box-only conversions without ``iscrowd`` / ``area`` fields evaluate normally.
* Images without boxes train as all-negative, with finite losses.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import assigners
from detector import DetectionLoss, DetectorOutput, build_scorer, make_anchors
from experiments.data import CocoDetection
from experiments.evaluation import coco_evaluate

from . import build_tiny_digits, execute_in_process, run_dir, stats_iters, tiny_coco_overrides, tiny_overrides


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory) -> Path:
    """A data root holding the digits set of ``tiny_overrides``, generated once for this module."""
    base = tmp_path_factory.mktemp("digits")
    build_tiny_digits(base)
    return base / "data"


def digits_copy(digits_root: Path, data_root: Path) -> Path:
    """Copy the generated digits set under ``data_root``; returns its folder (the engine's cache hit)."""
    shutil.copytree(digits_root, data_root)
    (folder,) = [p for p in data_root.iterdir() if p.is_dir()]
    return folder


def coco_layout(digits_root: Path, root: Path, edit=None) -> Path:
    """The digits set as a user-converted COCO 2017 folder (``data=coco``), with ``edit(split, json)`` applied."""
    (source,) = [p for p in digits_root.iterdir() if p.is_dir()]
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copytree(source / split, root / f"{split}2017")
        dataset = json.loads((source / "annotations" / f"instances_{split}.json").read_text())
        if edit is not None:
            edit(split, dataset)
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(dataset))
    return root


def failed_metrics(tmp_path: Path, run_name: str = "max_iou_none-s0") -> dict:
    metrics = json.loads((run_dir(tmp_path, run_name) / "metrics.json").read_text())
    assert metrics["status"] == "failed", metrics
    return metrics


# ----------------------------------------------------------------------------- files


@pytest.mark.slow
def test_a_missing_val_image_fails_before_iteration_one_naming_path_and_id(tmp_path, digits_root):
    folder = digits_copy(digits_root, tmp_path / "data")
    image = json.loads((folder / "annotations" / "instances_val.json").read_text())["images"][3]
    missing = folder / "val" / image["file_name"]
    missing.unlink()

    execute_in_process(tiny_overrides(tmp_path))
    error = failed_metrics(tmp_path)["error"]
    assert error.startswith("DatasetError: instances_val.json: 1 image file(s) missing")
    assert f"{missing} (image id {image['id']})" in error
    run = run_dir(tmp_path, "max_iou_none-s0")
    assert not (run / "stats.csv").exists() and not (run / "checkpoints").exists()


@pytest.mark.slow
def test_an_undecodable_train_image_fails_the_run_naming_path_and_id(tmp_path, digits_root):
    folder = digits_copy(digits_root, tmp_path / "data")
    image = json.loads((folder / "annotations" / "instances_train.json").read_text())["images"][5]
    broken = folder / "train" / image["file_name"]
    broken.write_bytes(b"\x89PNG but not really")

    # 12 iterations of 2 images read each of the 24 training images once.
    execute_in_process(tiny_overrides(tmp_path, "schedule.iters=12", "schedule.checkpoint_every=100"))
    error = failed_metrics(tmp_path)["error"]
    assert error.startswith(f"DatasetError: cannot read image {broken} (image id {image['id']})"), error


def _string_in_a_bbox(split: str, dataset: dict) -> None:
    """A ``coco_layout`` edit: the third training annotation's box holds a string."""
    if split == "train":
        dataset["annotations"][2]["bbox"] = ["4", 4, 10, 10]


BROKEN_ANNOTATIONS = [
    ("no_folder", "DatasetError: COCO 2017 train split not found: {root}/train2017 does not exist"),
    ("no_annotation_file", "DatasetError: COCO 2017 train split not found: "
                           "{root}/annotations/instances_train2017.json does not exist"),
    ("not_json", "DatasetError: malformed annotation file {root}/annotations/instances_train2017.json: "),
    ("bbox_not_numbers", "DatasetError: malformed annotation file {root}/annotations/instances_train2017.json: "
                         "annotation 3 bbox ['4', 4, 10, 10] is not [x, y, w, h] (four numbers)"),
]


@pytest.mark.parametrize(("kind", "message"), BROKEN_ANNOTATIONS, ids=[kind for kind, _ in BROKEN_ANNOTATIONS])
def test_missing_or_malformed_annotations_fail_before_training_naming_the_file(tmp_path, digits_root, kind, message):
    root = tmp_path / "coco"
    if kind == "no_folder":
        root.mkdir()
    else:
        coco_layout(digits_root, root, _string_in_a_bbox if kind == "bbox_not_numbers" else None)
    annotation_file = root / "annotations" / "instances_train2017.json"
    if kind == "no_annotation_file":
        annotation_file.unlink()
    elif kind == "not_json":
        annotation_file.write_text('{"images": [{"id": 1, "file_name": ')

    execute_in_process(tiny_coco_overrides(tmp_path, root))
    error = failed_metrics(tmp_path)["error"]
    assert error.startswith(message.format(root=root)), error
    assert not (run_dir(tmp_path, "max_iou_none-s0") / "stats.csv").exists()


# ----------------------------------------------------------------------------- annotations


def _user_conversion(split: str, dataset: dict) -> None:
    """A careless box-only conversion: no ``area``/``iscrowd`` fields, three quarters of the training
    images without boxes, bad boxes and an unknown category, and one crowd region per split."""
    for ann in dataset["annotations"]:
        del ann["area"], ann["iscrowd"]
    first_ids = [image["id"] for image in dataset["images"][:2]]
    if split == "train":
        kept_images = {image["id"] for image in dataset["images"][:6]}
        dataset["annotations"] = [ann for ann in dataset["annotations"] if ann["image_id"] in kept_images]
        next_id = max(ann["id"] for ann in dataset["annotations"]) + 1
        bad = [
            [5, 5, 0, 4],  # zero width: dropped
            [5, 5, 4, -3],  # negative height: dropped
            [200, 10, 5, 5],  # right of the 96 px image: nothing left after clipping, dropped
            [80, 80, 30, 30],  # partly outside: clipped to [80, 80, 96, 96]
        ]
        for offset, bbox in enumerate(bad):
            dataset["annotations"].append({"id": next_id + offset, "image_id": first_ids[0], "category_id": 1,
                                           "bbox": bbox})
        dataset["annotations"].append({"id": next_id + len(bad), "image_id": first_ids[0], "category_id": 99,
                                       "bbox": [1, 1, 3, 3]})
    crowd_id = max(ann["id"] for ann in dataset["annotations"]) + 1
    dataset["annotations"].append({"id": crowd_id, "image_id": first_ids[1], "category_id": 2,
                                   "bbox": [0, 0, 48, 48], "iscrowd": 1})


@pytest.mark.slow
def test_a_careless_conversion_trains_with_counted_fixes_and_all_negative_images(tmp_path, digits_root):
    root = coco_layout(digits_root, tmp_path / "coco", _user_conversion)
    with pytest.warns(UserWarning) as record:
        metrics = execute_in_process(
            # data.filter_empty=false: COCO's default (as the official code) drops images without an
            # annotation from training; this test is about training on them.
            tiny_coco_overrides(tmp_path, root, "schedule.iters=6", "data.filter_empty=false"),
            raise_on_failure=True,
        )
    messages = [str(w.message) for w in record]
    assert (
        "instances_train2017.json: dropped 3 boxes with non-positive size, clipped 1 box to the image, "
        "dropped 1 annotation with unknown category_id 99"
    ) in messages
    assert not any(m.startswith("instances_val2017.json") for m in messages)  # val needed no fix
    assert metrics["status"] == "done" and metrics["iters"] == 6 and 0.0 <= metrics["AP"] <= 100.0

    run = run_dir(tmp_path, "max_iou_none-s0")
    assert stats_iters(run) == [1, 2, 3, 4, 5, 6]
    with open(run / "stats.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(math.isfinite(float(value)) for row in rows for value in row.values())
    assert any(float(row["num_gt"]) == 0 for row in rows), "no all-negative batch was drawn; keep fewer boxes"


def test_the_careless_conversion_keeps_crowd_regions_apart_and_empty_images(tmp_path, digits_root):
    root = coco_layout(digits_root, tmp_path / "coco", _user_conversion)
    with pytest.warns(UserWarning):
        dataset = CocoDetection(root / "train2017", root / "annotations" / "instances_train2017.json",
                                train=False, min_size=96, max_size=96)
    _, crowd_target = dataset[1]
    torch.testing.assert_close(crowd_target["crowd_boxes"], torch.tensor([[0.0, 0.0, 48.0, 48.0]]))
    assert not bool((crowd_target["boxes"] == torch.tensor([0.0, 0.0, 48.0, 48.0])).all(dim=1).any())
    assert sum(dataset[i][1]["boxes"].shape[0] == 0 for i in range(len(dataset))) == 18


def test_cocoeval_ignores_detections_on_crowd_regions_even_without_area_fields(tmp_path):
    # One 96x96 image: object A (normal) and crowd region C. The best-scored detection lies on C.
    # COCOeval matches it to the crowd region and ignores it: AP 100. Were C not known as a crowd,
    # that detection would be a false positive ranked first: precision 1/2 at full recall.
    def write(crowd: bool) -> CocoDetection:
        annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30]}]
        if crowd:
            annotations.append({"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 40], "iscrowd": 1})
        ann_file = tmp_path / f"instances_crowd_{crowd}.json"
        ann_file.write_text(json.dumps({
            "images": [{"id": 1, "file_name": "x.png", "width": 96, "height": 96}],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "thing"}],
        }))
        return CocoDetection(tmp_path, ann_file, train=False)

    detections = [
        {"image_id": 1, "category_id": 1, "bbox": [52, 52, 20, 20], "score": 0.95},  # inside C
        {"image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.9},  # on A
    ]
    with_crowd = coco_evaluate(write(crowd=True).coco, detections)
    without_crowd = coco_evaluate(write(crowd=False).coco, detections)
    assert with_crowd["AP50"] == pytest.approx(100.0)
    assert without_crowd["AP50"] == pytest.approx(50.0)  # interpolated precision 1/2 at every recall


# ----------------------------------------------------------------------------- crowd in training


@pytest.mark.parametrize("assigner_name", ["max_iou", "atss", "paa", "fnp", "fsr"])
def test_negatives_inside_a_crowd_region_leave_the_classification_loss(assigner_name):
    # Zero logits: every non-ignored anchor adds the same focal terms (C negatives, or one positive
    # and C - 1 negatives), so ignoring n negatives lowers the summed loss by n * C * focal_neg.
    anchors, counts = make_anchors([(8, 8), (4, 4)], [8, 16], anchor_scale=2.0)  # 16 and 32 px anchors
    num_classes, focal_neg = 2, 0.75 * 0.25 * math.log(2.0)
    gt = {"boxes": torch.tensor([[4.0, 4.0, 28.0, 28.0]]), "labels": torch.tensor([1])}
    crowd_box = [32.0, 32.0, 64.0, 64.0]
    out = DetectorOutput(
        cls_logits=torch.zeros(1, anchors.shape[0], num_classes), box_deltas=torch.zeros(1, anchors.shape[0], 4),
        quality=None, anchors=anchors, num_anchors_per_level=counts, strides=[8, 16],
    )
    criterion = DetectionLoss(assigners.build(assigner_name), build_scorer("none"), num_classes, crowd_ignore_iof=0.5)
    plain, info = criterion(out, [gt])
    crowded, _ = criterion(out, [{**gt, "crowd_boxes": torch.tensor([crowd_box])}])

    # Independent count: negatives with at least half their area inside the crowd box.
    def inside_fraction(anchor: list[float]) -> float:
        width = max(0.0, min(anchor[2], crowd_box[2]) - max(anchor[0], crowd_box[0]))
        height = max(0.0, min(anchor[3], crowd_box[3]) - max(anchor[1], crowd_box[1]))
        return width * height / ((anchor[2] - anchor[0]) * (anchor[3] - anchor[1]))

    gt_index = info["assignment"].gt_index[0].tolist()
    ignored = sum(
        1 for anchor, label in zip(anchors.tolist(), gt_index) if label == assigners.NEGATIVE and inside_fraction(anchor) >= 0.5
    )
    assert ignored > 0
    num_pos = max(1, int((info["assignment"].gt_index >= 0).sum()))
    expected = plain["loss_cls"].item() - ignored * num_classes * focal_neg / num_pos
    assert crowded["loss_cls"].item() == pytest.approx(expected, rel=1e-5)
