"""benchmarks/peer.py: FCOS's detections become COCO results correctly, and a tiny side-by-side run reports both."""

import json

import pytest
import torch

from benchmarks.peer import _results, main


def test_fcos_outputs_become_coco_results_in_original_pixels():
    # Boxes come back in the resized image (scale 2 here); COCO wants xywh in original pixels and the
    # category id of each contiguous label.
    outputs = [{"boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]), "scores": torch.tensor([0.75]),
                "labels": torch.tensor([1])}]
    rows = _results(outputs, [{"image_id": 7, "scale": 2.0}], label_to_category_id=[3, 9])
    assert rows == [{"image_id": 7, "category_id": 9, "bbox": [5.0, 10.0, 10.0, 20.0], "score": 0.75}]


@pytest.mark.slow
def test_a_tiny_side_by_side_run_writes_both_results(tmp_path, capsys):
    overrides = [f"data.root={tmp_path / 'data'}", "schedule=debug", "model.fpn_channels=32",
                 "data.digits.image_size=96", "data.digits.num_train=24", "data.digits.num_val=6",
                 "data.num_workers=0", "eval.batch_size=6", "inference.score_thresh=0.001",
                 "eval.curve_fractions=[1.0]"]
    assert main(["--out-dir", str(tmp_path / "peer"), *overrides]) == 0
    record = json.loads((tmp_path / "peer" / "peer-none-s0.json").read_text())
    fcos = record["torchvision FCOS"]
    ours = next(v for k, v in record.items() if k.startswith("ours "))
    for model in (ours, fcos):
        assert 0.0 <= model["AP"] <= 100.0 and model["images_per_second"] > 0
    assert record["ours_minus_fcos_AP"] == pytest.approx(ours["AP"] - fcos["AP"])
    assert "ours - FCOS" in capsys.readouterr().out
