"""analysis.runs: statuses, variant and seed fallbacks, variant order, frames, snapshots."""

import json

import numpy as np
import pytest

from analysis.runs import (
    ResultsError,
    ap_curve_frame,
    grid_baseline,
    load_runs,
    load_snapshot,
    runs_frame,
    stats_frame,
    variant_order,
)
from experiments.runfiles import write_grid_file

STATS_HEADER = "iter,loss_cls,loss_box,loss_quality,num_gt,num_pos,pos_per_gt_mean,pos_per_gt_std,pos_iou_mean,gt_without_pos,assign_ms\n"


def _metrics(**fields):
    metrics = {"status": "done", "error": None, "AP": 30.0, "seed": 0, "assigner": "paa", "scorer": "iou"}
    metrics.update(fields)
    return json.dumps(metrics)


def test_status_variant_and_seed_fallbacks(tmp_path):
    # metrics.json written before it carried ``variant``: config.yaml gives it; the seed is metrics.json's.
    (tmp_path / "a-s0").mkdir()
    (tmp_path / "a-s0" / "config.yaml").write_text("variant: paa-c\nseed: 7\nassigner:\n  name: paa\n")
    (tmp_path / "a-s0" / "metrics.json").write_text(_metrics(seed=0))
    # metrics.json names the variant.
    (tmp_path / "b-s1").mkdir()
    (tmp_path / "b-s1" / "metrics.json").write_text(
        _metrics(status="failed", error="boom", AP=None, seed=4, variant="paa+iou"))
    # Nothing but stats: variant and seed from the dir name; no metrics.json -> incomplete.
    (tmp_path / "atss+none-s3").mkdir()
    (tmp_path / "atss+none-s3" / "stats.csv").write_text(STATS_HEADER + "10,1,1,0,4,36,9,1,0.5,0,2\n")
    # Hidden folders are not runs.
    (tmp_path / ".hydra").mkdir()

    runs = {run.name: run for run in load_runs(tmp_path)}
    assert set(runs) == {"a-s0", "b-s1", "atss+none-s3"}
    assert (runs["a-s0"].variant, runs["a-s0"].seed, runs["a-s0"].status) == ("paa-c", 0, "done")
    assert (runs["b-s1"].variant, runs["b-s1"].seed, runs["b-s1"].status) == ("paa+iou", 4, "failed")
    assert runs["b-s1"].error == "boom"
    assert (runs["atss+none-s3"].variant, runs["atss+none-s3"].seed) == ("atss+none", 3)
    assert runs["atss+none-s3"].status == "incomplete"
    assert runs["atss+none-s3"].metrics == {}


def test_unreadable_metrics_make_the_run_incomplete(tmp_path):
    (tmp_path / "x-s0").mkdir()
    (tmp_path / "x-s0" / "metrics.json").write_text('{"status": "do')  # torn file
    (tmp_path / "y-s0").mkdir()
    (tmp_path / "y-s0" / "metrics.json").write_text(_metrics(status=None))
    runs = {run.name: run for run in load_runs(tmp_path)}
    assert runs["x-s0"].status == "incomplete" and runs["x-s0"].error is None
    assert runs["y-s0"].status == "incomplete" and "status None" in runs["y-s0"].error


def test_missing_or_empty_grid_raises_a_clear_error(tmp_path):
    with pytest.raises(ResultsError, match="not a directory"):
        load_runs(tmp_path / "nope")
    with pytest.raises(ResultsError, match="no run directories"):
        load_runs(tmp_path)


def test_variant_order_follows_the_grid_file_then_names(tmp_path):
    assert variant_order(tmp_path, {"b", "a", "c"}) == ["a", "b", "c"]
    assert grid_baseline(tmp_path, ["a", "b", "c"]) == "a"  # no grid.json: the first variant
    write_grid_file(tmp_path, "g", ["c", "zzz-not-run", "b"], baseline="b")
    assert variant_order(tmp_path, {"b", "a", "c"}) == ["c", "b", "a"]
    assert grid_baseline(tmp_path, ["c", "b", "a"]) == "b"
    with pytest.raises(ValueError, match="baseline"):
        write_grid_file(tmp_path, "g", ["c", "b"], baseline="a")


def test_metrics_name_the_variant_and_old_assigner_names_read_as_today(tmp_path):
    run = tmp_path / "whatever-s7"
    run.mkdir()
    (run / "config.yaml").write_text("variant: from-config\nseed: 1\n")
    (run / "metrics.json").write_text(_metrics(variant="IoU+none", seed=3, assigner="iou"))
    (read,) = load_runs(tmp_path)
    assert (read.variant, read.seed, read.assigner) == ("IoU+none", 3, "max_iou")
    (run / "metrics.json").unlink()  # still running: config.yaml names it
    (read,) = load_runs(tmp_path)
    assert (read.variant, read.seed, read.status) == ("from-config", 1, "incomplete")


def test_frames(tmp_path):
    (tmp_path / "v-s0").mkdir()
    (tmp_path / "v-s0" / "config.yaml").write_text("variant: v\nseed: 0\n")
    (tmp_path / "v-s0" / "metrics.json").write_text(
        _metrics(AP=31.5, images_per_second=12.0, ap_curve=[[5, 10.0], [10, None], [20, 31.5]])
    )
    # pos_per_gt_mean 6, 8, 13 -> mean 9.
    (tmp_path / "v-s0" / "stats.csv").write_text(
        STATS_HEADER + "5,1,1,0,4,24,6,1,0.5,1,2\n10,1,1,0,4,32,8,1,0.5,0,2\n20,1,1,0,4,52,13,1,0.5,0,2\n"
    )
    (tmp_path / "v-s1").mkdir()  # incomplete: not in the stats or curve frames
    (tmp_path / "v-s1" / "stats.csv").write_text(STATS_HEADER + "5,1,1,0,4,400,100,1,0.5,0,2\n")

    runs = load_runs(tmp_path)
    frame = runs_frame(runs).set_index("run")
    assert frame.loc["v-s0", "AP"] == 31.5
    assert frame.loc["v-s0", "positives_per_gt"] == pytest.approx(9.0)
    assert frame.loc["v-s0", "images_per_second"] == 12.0
    assert np.isnan(frame.loc["v-s1", "AP"])
    assert frame.loc["v-s1", "status"] == "incomplete"

    stats = stats_frame(runs)
    assert stats["run"].unique().tolist() == ["v-s0"]
    assert stats["iter"].tolist() == [5, 10, 20]
    curve = ap_curve_frame(runs)
    assert curve[["iter", "AP"]].values.tolist() == [[5, 10.0], [20, 31.5]]  # the null point is dropped


def test_load_snapshot(tmp_path):
    anchors = np.array([[0, 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16]], dtype=np.float32)
    np.savez(
        tmp_path / "assignments.npz",
        image=np.zeros((16, 16, 3), np.uint8),
        anchors=anchors,
        num_anchors_per_level=np.array([3]),
        gt_boxes=np.array([[1, 1, 9, 9]], dtype=np.float32),
        gt_index_100=np.array([0, -1, -2]),
        gt_index_20=np.array([-1, -1, 0]),
        gt_index_30=np.array([0, 0]),  # wrong length: dropped
    )
    snapshot = load_snapshot(tmp_path / "assignments.npz")
    assert snapshot.iterations == [20, 100]
    assert snapshot.gt_index[100].tolist() == [0, -1, -2]
    assert load_snapshot(tmp_path / "absent.npz") is None
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert load_snapshot(tmp_path / "bad.npz") is None
