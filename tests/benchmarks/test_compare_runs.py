"""benchmarks.compare_runs: timing columns may differ, nothing else may."""

import json
import shutil

import numpy as np

from benchmarks.compare_runs import main
from experiments.runfiles import STATS_FIELDS


def _run(root, name="r-s0", loss="1.5", assign_ms="3.0"):
    run = root / "g" / name
    run.mkdir(parents=True)
    row = {k: "1" for k in STATS_FIELDS} | {"loss_cls": loss, "assign_ms": assign_ms}
    (run / "stats.csv").write_text(",".join(STATS_FIELDS) + "\n" + ",".join(row[k] for k in STATS_FIELDS) + "\n")
    (run / "detections.json").write_text(json.dumps([{"image_id": 1, "score": 0.5}]))
    (run / "metrics.json").write_text(json.dumps({"status": "done", "AP": 10.0, "ap_curve": [[4, 10.0]]}))
    np.savez(run / "assignments.npz", gt_index_4=np.array([0, -1]))
    return run


def test_only_timing_may_differ(tmp_path, capsys):
    _run(tmp_path / "a")
    _run(tmp_path / "b", assign_ms="9.0")
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    shutil.rmtree(tmp_path / "b")
    _run(tmp_path / "b", loss="1.50001")
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "DIFFERS in stats" in capsys.readouterr().out


def test_renamed_runs_are_paired_and_missing_ones_reported(tmp_path, capsys):
    _run(tmp_path / "a", name="iou_iou-s0")
    _run(tmp_path / "b", name="max_iou_iou-s0")
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "missing" in capsys.readouterr().out
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--rename", "iou_iou-s0=max_iou_iou-s0"]) == 0
