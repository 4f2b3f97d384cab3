"""The showcase images (experiments.showcase) and assignbench-show (analysis.show) on a hand-made set."""

import json

import numpy as np
from PIL import Image
from pycocotools.coco import COCO

from analysis.show import image_dir_of, main
from experiments.showcase import showcase_image_ids


def make_set(root, boxes_per_image):
    """<root>/annotations/instances_val.json and <root>/val/<id>.png (64 x 64), as the digits layout."""
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    images, annotations = [], []
    for image_id, boxes in boxes_per_image.items():
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 64})
        Image.fromarray(np.full((64, 64, 3), 40 * image_id % 255, dtype=np.uint8)).save(root / "val" / f"{image_id}.png")
        for box in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
    ann_file = root / "annotations" / "instances_val.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": annotations,
                                    "categories": [{"id": 1, "name": "one"}]}))
    return ann_file


# Image 1: one box; 2: three boxes of one shape (aspect spread 0); 3: three boxes of aspect 2, 1, 0.5
# (spread ln 4); 4: four boxes of aspect 1 and 2 (spread ln 2).
SET = {
    1: [[0, 0, 10, 10]],
    2: [[0, 0, 10, 10], [20, 20, 10, 10], [40, 40, 10, 10]],
    3: [[0, 0, 20, 10], [20, 20, 10, 10], [40, 40, 10, 20]],
    4: [[0, 0, 10, 10], [20, 20, 20, 10], [40, 40, 10, 10], [5, 40, 10, 10]],
}


def test_showcase_prefers_several_objects_of_varied_shape(tmp_path):
    coco = COCO(str(make_set(tmp_path, SET)))
    assert showcase_image_ids(coco, 4) == [3, 4, 2, 1]
    assert showcase_image_ids(coco, 1) == [3]


def test_show_draws_each_runs_detections(tmp_path, capsys):
    ann_file = make_set(tmp_path / "data", SET)
    assert image_dir_of(ann_file) == tmp_path / "data" / "val"
    runs = []
    for variant in ("A", "B"):
        run = tmp_path / "grid" / f"{variant}-s0"
        run.mkdir(parents=True)
        env = {"annotations": [str(ann_file), str(ann_file)]}
        (run / "metrics.json").write_text(json.dumps({"status": "done", "variant": variant, "environment": env}))
        (run / "detections.json").write_text(json.dumps(
            [{"image_id": 3, "category_id": 1, "bbox": [1, 1, 18, 9], "score": 0.9},
             {"image_id": 4, "category_id": 1, "bbox": [2, 2, 5, 5], "score": 0.1}]))
        runs.append(run)
    assert main([*map(str, runs), "--images", "3"]) == 0
    out = tmp_path / "grid" / "detections.png"
    width, height = Image.open(out).size
    assert height > width > 0  # two columns of runs, three rows of images (square panels)
    # A run without detections.json is named in the error.
    (runs[1] / "detections.json").unlink()
    assert main([*map(str, runs)]) == 1
    assert "B-s0: no detections.json" in capsys.readouterr().err
