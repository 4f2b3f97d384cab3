"""assignbench-eval: re-scoring a finished run's weights equals training with those inference settings."""

import json

import pytest

from experiments.rescore import config_for, main, rescore_run
from experiments.runfiles import read_metrics
from experiments.train import execute, run_dir_of

from .test_engine import tiny_cfg

VOTING = ["inference.score_voting=true", "inference.score_thresh=0.0"]


@pytest.mark.slow
def test_rescoring_with_voting_equals_a_run_trained_with_voting(tmp_path):
    base = ["assigner=atss", "scorer=iou", "schedule.iters=3", "eval.curve_fractions=[1.0]", "eval.snapshots=false",
            "inference.score_thresh=0.0"]
    cfg, ov = tiny_cfg(tmp_path / "a", *base)
    source = execute(cfg, ov, raise_on_failure=True)
    source_dir = run_dir_of(cfg)

    rescored_cfg = config_for(source_dir, VOTING, "atss_iou_voting", "ATSS+IoU+voting")
    rescored = rescore_run(source_dir, rescored_cfg, VOTING)
    rescored_dir = source_dir.parent / "atss_iou_voting-s0"
    assert read_metrics(rescored_dir / "metrics.json") == json.loads(json.dumps(rescored))
    assert rescored["rescored_from"] == source_dir.name and rescored["variant"] == "ATSS+IoU+voting"
    assert rescored["iters"] == source["iters"] and rescored["ap_curve"] == [[3, rescored["AP"]]]
    # the training is the same: stats.csv is the source's
    assert (rescored_dir / "stats.csv").read_bytes() == (source_dir / "stats.csv").read_bytes()

    # Oracle: the same training with voting switched on from the start (runs are deterministic here).
    trained_cfg, trained_ov = tiny_cfg(tmp_path / "b", *base, *VOTING)
    trained = execute(trained_cfg, trained_ov, raise_on_failure=True)
    for key in ("AP", "AP50", "AP75", "iou_pred_error"):
        assert rescored[key] == trained[key], key
    assert (rescored_dir / "detections.json").read_text() == (run_dir_of(trained_cfg) / "detections.json").read_text()
    assert (rescored_dir / "eval_matches.npz").is_file()


@pytest.mark.slow
def test_rescoring_refuses_training_overrides_and_unfinished_runs(tmp_path, capsys):
    cfg, ov = tiny_cfg(tmp_path, "schedule.iters=1", "eval.curve_fractions=[1.0]", "eval.snapshots=false")
    execute(cfg, ov, raise_on_failure=True)
    run_dir = run_dir_of(cfg)
    assert main([str(run_dir), "schedule.iters=9", "--variant-id", "x"]) == 1
    assert "only inference.* and eval.*" in capsys.readouterr().err
    (run_dir / "checkpoints" / "last.pt").unlink()
    assert main([str(run_dir), "inference.score_voting=true", "--variant-id", "x"]) == 1
    assert "no last.pt" in capsys.readouterr().err
