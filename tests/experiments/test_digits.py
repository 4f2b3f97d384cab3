"""Tests of the embedded digits generator (experiments/data/digits.py) and its CLI."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from sklearn.datasets import load_digits
from torchvision.ops import box_iou

from experiments import data_cli
from experiments.data import digits
from experiments.data.digits import DIGITS_DEFAULTS, build_digits, digits_dir, tight_box

SMALL = {"num_train": 60, "num_val": 20, "image_size": 96}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """The small set built in-process (no worker pool)."""
    return build_digits(tmp_path_factory.mktemp("serial"), num_workers=0, **SMALL)


def load_coco(directory, split):
    return COCO(str(directory / "annotations" / f"instances_{split}.json"))


def xyxy(bbox):
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def test_builds_are_identical_for_any_worker_count(small_set, tmp_path):
    pooled = build_digits(tmp_path, num_workers=2, **SMALL)
    assert pooled.name == small_set.name and pooled != small_set
    for split in ("train", "val"):
        path = f"annotations/instances_{split}.json"
        assert (pooled / path).read_bytes() == (small_set / path).read_bytes()
        names = sorted(p.name for p in (small_set / split).glob("*.png"))
        assert names == sorted(p.name for p in (pooled / split).glob("*.png"))
        assert len(names) == SMALL[f"num_{split}"]
        for name in names:
            first = np.asarray(Image.open(small_set / split / name))
            second = np.asarray(Image.open(pooled / split / name))
            assert first.shape == (96, 96, 3) and first.dtype == np.uint8
            np.testing.assert_array_equal(first, second)


def test_second_build_returns_the_cache_without_regenerating(small_set, monkeypatch):
    png = small_set / "train" / "000000.png"
    stamps = (png.stat().st_mtime_ns, (small_set / "params.json").stat().st_mtime_ns)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated a cached data set")

    monkeypatch.setattr(digits, "_generate", fail)
    assert build_digits(small_set.parent, **SMALL) == small_set
    assert stamps == (png.stat().st_mtime_ns, (small_set / "params.json").stat().st_mtime_ns)


def test_interrupted_build_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    params = {"num_train": 3, "num_val": 2, "image_size": 64}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(digits, "_write_annotations", killed)
    with pytest.raises(KeyboardInterrupt):
        build_digits(tmp_path, **params)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the staging folder survives
    monkeypatch.undo()

    # A leftover folder without the completion marker is regenerated, not trusted.
    target = digits_dir(tmp_path, **params)
    target.mkdir()
    (target / "params.json").write_text(json.dumps(digits._normalised_params(params)))
    assert build_digits(tmp_path, **params) == target
    assert (target / digits.COMPLETE_MARKER).is_file()
    assert len(list((target / "train").glob("*.png"))) == 3
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_directory_names_and_root(tmp_path, monkeypatch):
    assert digits_dir(tmp_path) == tmp_path / "digits-v1"
    assert digits_dir(tmp_path, min_size=12, seed=0) == tmp_path / "digits-v1"  # 12 == 12.0: still the defaults
    small = digits_dir(tmp_path, **SMALL)
    assert re.fullmatch(r"digits-v1-[0-9a-f]{8}", small.name)
    assert digits_dir(tmp_path, **SMALL, seed=1) != small
    monkeypatch.setenv("ASSIGNBENCH_DATA", str(tmp_path / "env"))
    assert digits_dir() == tmp_path / "env" / "digits-v1"
    monkeypatch.delenv("ASSIGNBENCH_DATA")
    monkeypatch.chdir(tmp_path)
    assert digits_dir().resolve() == (tmp_path / "data" / "digits-v1").resolve()
    with pytest.raises(ValueError, match="num_images"):
        digits_dir(tmp_path, num_images=3)
    with pytest.raises(ValueError, match="min_size <= max_size"):
        digits_dir(tmp_path, min_size=80.0, max_size=10.0)


def test_annotations_are_valid_coco(small_set):
    params = json.loads((small_set / "params.json").read_text())
    assert params == {**DIGITS_DEFAULTS, **SMALL}
    for split in ("train", "val"):
        coco = load_coco(small_set, split)
        assert [coco.cats[i]["name"] for i in sorted(coco.cats)] == [str(d) for d in range(10)]
        assert sorted(coco.cats) == list(range(1, 11))
        assert len(coco.imgs) == SMALL[f"num_{split}"]
        for image_id, info in coco.imgs.items():
            assert (small_set / split / info["file_name"]).is_file()
            annotations = coco.imgToAnns[image_id]
            assert params["min_objects"] <= len(annotations) <= params["max_objects"]
            for ann in annotations:
                x, y, w, h = ann["bbox"]
                assert w > 0 and h > 0 and x >= 0 and y >= 0
                assert x + w <= info["width"] and y + h <= info["height"]
                assert ann["area"] == w * h and ann["iscrowd"] == 0
                # The tight box never exceeds the pasted patch, whose side sqrt(w h) is at most max_size.
                assert (w * h) ** 0.5 <= params["max_size"] + 1
            # Overlap is enforced on the tight (annotated) boxes; torchvision's box_iou is the oracle.
            if len(annotations) > 1:
                boxes = torch.tensor([xyxy(ann["bbox"]) for ann in annotations], dtype=torch.float64)
                iou = box_iou(boxes, boxes).fill_diagonal_(0)
                assert iou.max() <= params["max_overlap_iou"] + 1e-9
    train_categories = {ann["category_id"] for ann in load_coco(small_set, "train").anns.values()}
    assert train_categories == set(range(1, 11))


def test_labels_match_their_source_digits_and_val_handwriting_is_unseen(small_set):
    targets = load_digits().target
    used = {}
    for split in ("train", "val"):
        anns = load_coco(small_set, split).anns.values()
        for ann in anns:
            assert ann["category_id"] == targets[ann["source_index"]] + 1
        used[split] = {ann["source_index"] for ann in anns}
    assert used["train"] and used["val"]
    assert used["train"].isdisjoint(used["val"])
    pools = digits._source_split(len(targets), digits._normalised_params(SMALL))
    assert len(pools["train"]) == round(0.85 * 1797) and len(pools["train"]) + len(pools["val"]) == 1797
    assert used["train"] <= set(pools["train"].tolist()) and used["val"] <= set(pools["val"].tolist())


def test_box_aspect_ratios_span_the_configured_range(small_set):
    ratios = np.array([w / h for _, _, w, h in (a["bbox"] for a in load_coco(small_set, "train").anns.values())])
    assert (ratios < 0.8).any() and (ratios > 1.25).any()


def test_tight_box_on_a_hand_made_mask():
    coverage = np.zeros((10, 12))
    coverage[2, 3] = 0.9
    coverage[5, 7] = 0.2
    coverage[8, 1] = 0.1  # below the 0.15 threshold: not ink
    assert tight_box(coverage) == (3, 2, 8, 6)  # x0, y0, x1, y1 with exclusive ends
    assert tight_box(coverage, threshold=0.05) == (1, 2, 8, 9)
    single = np.zeros((4, 4))
    single[1, 2] = 1.0
    assert tight_box(single) == (2, 1, 3, 2)
    assert tight_box(np.full((4, 4), 0.15)) is None  # the threshold is strict


def test_pasted_ink_stays_inside_the_tight_box():
    canvas = np.full((12, 12, 3), 0.5, dtype=np.float32)
    coverage = np.zeros((6, 6))
    coverage[1:4, 2] = 1.0  # a vertical bar
    coverage[3, 1:5] = 0.3
    coverage[0, 0] = 0.14  # faint haze below the threshold paints nothing
    digits._paste_ink(np.random.default_rng(0), canvas, coverage, top=4, left=5)
    changed = np.abs(canvas - 0.5).max(axis=2) > 1e-6
    x0, y0, x1, y1 = tight_box(coverage)
    expected = np.zeros((12, 12), dtype=bool)
    expected[4 + y0 : 4 + y1, 5 + x0 : 5 + x1] = coverage[y0:y1, x0:x1] > digits.INK_THRESHOLD
    np.testing.assert_array_equal(changed, expected)


def test_cli_builds_and_prints_the_path(tmp_path, capsys):
    data_cli.main(["digits", "--root", str(tmp_path), "--num-train", "3", "--num-val", "2", "--image-size", "64"])
    lines = capsys.readouterr().out.splitlines()
    path = digits_dir(tmp_path, num_train=3, num_val=2, image_size=64)
    assert lines[0] == str(path) and lines[1].startswith("generated in ")
    assert len(list((path / "val").glob("*.png"))) == 2
    data_cli.main(["digits", "--root", str(tmp_path), "--num-train", "3", "--num-val", "2", "--image-size", "64"])
    assert capsys.readouterr().out.splitlines()[1].startswith("found cached in ")
