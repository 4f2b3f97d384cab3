"""Tests of the COCO-format loader (experiments/data/coco.py) and build_dataset, on hand-made tiny files."""

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.data import CocoDetection, DatasetError, build_dataset, collate

RED, BLUE = (255, 0, 0), (0, 0, 255)


def write_image(path, width=40, height=20):
    """A width x height PNG: left half red, right half blue."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = RED
    pixels[:, width // 2 :] = BLUE
    Image.fromarray(pixels).save(path)


def write_coco(tmp_path, annotations, images=None, categories=None):
    """Tiny COCO set: image 1 is a 40x20 PNG (w x h); returns (image_dir, ann_file)."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    images = images or [{"id": 1, "file_name": "one.png", "width": 40, "height": 20}]
    for info in images:
        if not (image_dir / info["file_name"]).exists():
            write_image(image_dir / info["file_name"], info["width"], info["height"])
    categories = categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
    for number, ann in enumerate(annotations, start=1):
        ann.setdefault("id", number)
        ann.setdefault("image_id", 1)
        ann.setdefault("iscrowd", 0)
    ann_file = tmp_path / "instances_tiny.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return image_dir, ann_file


@pytest.fixture
def one_box(tmp_path):
    """Box xywh (4, 2, 10, 6) = xyxy (4, 2, 14, 8) of category 7 (label 1) on the 40x20 image."""
    return write_coco(tmp_path, [{"bbox": [4, 2, 10, 6], "category_id": 7}])


def test_resize_scales_image_and_boxes(one_box):
    dataset = CocoDetection(*one_box, train=False, min_size=40, max_size=1000)
    image, target = dataset[0]
    # Shorter side 20 -> 40: scale 2, so 40x20 becomes 80x40 and the box doubles.
    assert image.shape == (3, 40, 80) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert target["boxes"].dtype == torch.float32
    torch.testing.assert_close(target["boxes"], torch.tensor([[8.0, 4.0, 28.0, 16.0]]))
    assert target["labels"].tolist() == [1] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 1 and target["scale"] == 2.0
    assert target["orig_size"] == (20, 40) and target["size"] == (40, 80)
    assert target["crowd_boxes"].shape == (0, 4)


def test_max_size_caps_the_longer_side(one_box):
    _, target = CocoDetection(*one_box, train=False, min_size=40, max_size=60)[0]
    # min_size asks for scale 2, but the longer side 40 * 2 > 60: scale 60 / 40 = 1.5.
    assert target["size"] == (30, 60) and target["scale"] == 1.5
    torch.testing.assert_close(target["boxes"], torch.tensor([[6.0, 3.0, 21.0, 12.0]]))


def test_pixels_are_rgb_in_unit_range_not_normalised(one_box):
    image, _ = CocoDetection(*one_box, train=False, min_size=20)[0]  # scale 1: no resampling
    torch.testing.assert_close(image[:, 5, 3], torch.tensor([1.0, 0.0, 0.0]))  # left half red
    torch.testing.assert_close(image[:, 5, 30], torch.tensor([0.0, 0.0, 1.0]))  # right half blue


def test_horizontal_flip_mirrors_image_and_boxes(one_box):
    plain, plain_target = CocoDetection(*one_box, train=True, min_size=40, flip_prob=0.0)[0]
    flipped, flipped_target = CocoDetection(*one_box, train=True, min_size=40, flip_prob=1.0)[0]
    torch.testing.assert_close(flipped, plain.flip(-1))
    # Width 80: x -> 80 - x, so (8, 4, 28, 16) -> (52, 4, 72, 16).
    torch.testing.assert_close(plain_target["boxes"], torch.tensor([[8.0, 4.0, 28.0, 16.0]]))
    torch.testing.assert_close(flipped_target["boxes"], torch.tensor([[52.0, 4.0, 72.0, 16.0]]))
    # Evaluation never flips, whatever flip_prob says.
    _, eval_target = CocoDetection(*one_box, train=False, min_size=40, flip_prob=1.0)[0]
    torch.testing.assert_close(eval_target["boxes"], plain_target["boxes"])


def test_multi_scale_training_and_first_scale_for_eval(one_box):
    assert CocoDetection(*one_box, train=False, min_size=[20, 40])[0][1]["size"] == (20, 40)
    training = CocoDetection(*one_box, train=True, min_size=[20, 40], flip_prob=0.0)
    torch.manual_seed(0)
    assert {training[0][1]["size"] for _ in range(30)} == {(20, 40), (40, 80)}


def test_labels_are_contiguous_in_sorted_category_order(tmp_path):
    image_dir, ann_file = write_coco(
        tmp_path,
        [{"bbox": [0, 0, 5, 5], "category_id": 3}, {"bbox": [10, 0, 5, 5], "category_id": 7}],
        categories=[{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}],
    )
    dataset = CocoDetection(image_dir, ann_file, train=False, min_size=20)
    assert dataset.num_classes == 2
    assert dataset.label_to_category_id == [3, 7] and dataset.category_names == ["cat", "dog"]
    assert dataset.ids == [1] and len(dataset) == 1
    assert dataset[0][1]["labels"].tolist() == [0, 1]


def test_crowd_annotations_go_to_crowd_boxes_and_empty_images_are_kept(tmp_path):
    images = [
        {"id": 1, "file_name": "one.png", "width": 40, "height": 20},
        {"id": 2, "file_name": "two.png", "width": 40, "height": 20},
    ]
    image_dir, ann_file = write_coco(
        tmp_path,
        [{"bbox": [4, 2, 10, 6], "category_id": 7}, {"bbox": [20, 10, 8, 4], "category_id": 3, "iscrowd": 1}],
        images=images,
    )
    dataset = CocoDetection(image_dir, ann_file, train=False, min_size=20)
    _, target = dataset[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[4.0, 2.0, 14.0, 8.0]]))
    torch.testing.assert_close(target["crowd_boxes"], torch.tensor([[20.0, 10.0, 28.0, 14.0]]))
    assert target["labels"].tolist() == [1]
    _, empty = dataset[1]
    assert empty["image_id"] == 2
    assert empty["boxes"].shape == (0, 4) and empty["boxes"].dtype == torch.float32
    assert empty["labels"].shape == (0,) and empty["labels"].dtype == torch.int64


def test_collate_pads_bottom_right_to_multiples_of_32():
    small, large = torch.rand(3, 20, 40), torch.rand(3, 33, 50)
    images, targets = collate([(small, {"image_id": 1}), (large, {"image_id": 2})])
    assert images.shape == (2, 3, 64, 64)
    torch.testing.assert_close(images[0, :, :20, :40], small)
    torch.testing.assert_close(images[1, :, :33, :50], large)
    assert images[0, :, 20:].abs().sum() == 0 and images[0, :, :, 40:].abs().sum() == 0
    assert [t["image_id"] for t in targets] == [1, 2]
    assert collate([(large, {})], size_divisibility=1)[0].shape == (1, 3, 33, 50)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="instances_missing.json"):
        CocoDetection(tmp_path, tmp_path / "instances_missing.json", train=True)
    assert issubclass(DatasetError, ValueError)


@pytest.mark.parametrize(
    "content",
    [
        '{"images": [',
        '["not", "a", "dict"]',
        '{"images": [], "annotations": []}',
        '{"images": [{"id": 1}], "annotations": [], "categories": []}',
    ],
)
def test_malformed_annotation_file(tmp_path, content):
    ann_file = tmp_path / "instances_broken.json"
    ann_file.write_text(content)
    with pytest.raises(DatasetError, match="malformed annotation file .*instances_broken.json"):
        CocoDetection(tmp_path, ann_file, train=True)


def test_missing_image_names_file_and_image_id(tmp_path):
    images = [
        {"id": 1, "file_name": "one.png", "width": 40, "height": 20},
        {"id": 5, "file_name": "gone.png", "width": 40, "height": 20},
    ]
    image_dir, ann_file = write_coco(tmp_path, [], images=images)
    (image_dir / "gone.png").unlink()
    dataset = CocoDetection(image_dir, ann_file, train=False, min_size=20)
    with pytest.raises(DatasetError, match=r"gone\.png \(image id 5\)"):
        dataset.validate()
    with pytest.raises(DatasetError, match=r"gone\.png \(image id 5\)"):
        dataset[1]
    dataset.ids = [1]
    dataset.validate()  # the readable image alone passes


def test_unreadable_image_names_file_and_image_id(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [])
    (image_dir / "one.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"one\.png \(image id 1\)"):
        CocoDetection(image_dir, ann_file, train=False)[0]


def test_image_size_disagreeing_with_the_json(tmp_path):
    image_dir, ann_file = write_coco(
        tmp_path, [], images=[{"id": 1, "file_name": "one.png", "width": 40, "height": 20}]
    )
    write_image(image_dir / "one.png", width=30, height=20)
    with pytest.raises(
        DatasetError, match=r"one\.png \(image id 1\) is 30x20 pixels but instances_tiny.json says 40x20"
    ):
        CocoDetection(image_dir, ann_file, train=False)[0]


def test_bad_boxes_are_dropped_or_clipped_with_one_warning(tmp_path):
    image_dir, ann_file = write_coco(
        tmp_path,
        [
            {"bbox": [4, 2, 10, 6], "category_id": 7},  # fine
            {"bbox": [5, 5, 0, 4], "category_id": 7},  # zero width: dropped
            {"bbox": [50, 5, 6, 4], "category_id": 3},  # right of the 40 px wide image: nothing left, dropped
            {"bbox": [30, 15, 20, 10], "category_id": 3},  # partly outside: clipped to (30, 15, 40, 20)
            {"bbox": [1, 1, 3, 3], "category_id": 99},  # unknown category: dropped
        ],
    )
    with pytest.warns(UserWarning) as record:
        dataset = CocoDetection(image_dir, ann_file, train=False, min_size=20)
    assert len(record) == 1
    assert str(record[0].message) == (
        "instances_tiny.json: dropped 2 boxes with non-positive size, clipped 1 box to the image, "
        "dropped 1 annotation with unknown category_id 99"
    )
    assert dataset.sanitize_report == {
        "dropped_nonpositive": 2,
        "clipped": 1,
        "dropped_unknown_category": 1,
        "unknown_category_ids": [99],
    }
    _, target = dataset[0]
    torch.testing.assert_close(target["boxes"], torch.tensor([[4.0, 2.0, 14.0, 8.0], [30.0, 15.0, 40.0, 20.0]]))
    assert target["labels"].tolist() == [1, 0]


def test_clean_data_raises_no_warning(one_box):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset = CocoDetection(*one_box, train=False)
    assert dataset.sanitize_report["clipped"] == dataset.sanitize_report["dropped_nonpositive"] == 0


def test_build_dataset_digits(tmp_path):
    params = {"num_train": 4, "num_val": 2, "image_size": 64}
    dataset = build_dataset(
        "digits", "val", root=tmp_path, train=False, min_size=64, max_size=64, flip_prob=0.0, digits_params=params
    )
    assert len(dataset) == 2 and dataset.num_classes == 10
    assert dataset.category_names == [str(digit) for digit in range(10)]
    assert dataset.label_to_category_id == list(range(1, 11))
    dataset.validate()
    image, target = dataset[0]
    assert image.shape == (3, 64, 64) and len(target["boxes"]) == len(target["labels"]) >= 1


def test_build_dataset_coco_layout_and_errors(tmp_path):
    with pytest.raises(DatasetError, match="val2017"):
        build_dataset("coco", "val", root=tmp_path, train=False)
    (tmp_path / "val2017").mkdir()
    with pytest.raises(DatasetError, match="instances_val2017.json"):
        build_dataset("coco", "val", root=tmp_path, train=False)
    (tmp_path / "annotations").mkdir()
    write_image(tmp_path / "val2017" / "one.png")
    images = [{"id": 1, "file_name": "one.png", "width": 40, "height": 20}]
    coco = {"images": images, "annotations": [], "categories": [{"id": 1, "name": "person"}]}
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    dataset = build_dataset("coco", "val", root=tmp_path, train=False, min_size=20)
    assert len(dataset) == 1 and dataset.category_names == ["person"]
    with pytest.raises(ValueError, match="unknown dataset"):
        build_dataset("voc", "val", root=tmp_path, train=False)
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset("coco", "test", root=tmp_path, train=False)


def test_filter_empty_keeps_images_with_an_annotation_above_one_pixel(tmp_path):
    # Image 1: a 10 x 6 box; 2: none; 3: only a 1-px-wide box (official: empty); 4: a crowd box only (kept,
    # the official rule counts crowd annotations).
    images = [{"id": i, "file_name": f"{i}.png", "width": 40, "height": 20} for i in (1, 2, 3, 4)]
    annotations = [{"bbox": [4, 2, 10, 6], "category_id": 7, "image_id": 1},
                   {"bbox": [4, 2, 1, 6], "category_id": 7, "image_id": 3},
                   {"bbox": [0, 0, 20, 10], "category_id": 3, "image_id": 4, "iscrowd": 1}]
    image_dir, ann_file = write_coco(tmp_path, annotations, images=images)
    assert CocoDetection(image_dir, ann_file, train=True, filter_empty=True).ids == [1, 4]
    assert CocoDetection(image_dir, ann_file, train=True).ids == [1, 2, 3, 4]
