"""The TensorBoard logger: what a run writes, read back with TensorBoard's own reader, equals stats.csv."""

import csv
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.errors import ConfigError
from experiments.loggers import TENSORBOARD_DIR, build_logger
from experiments.runfiles import STATS_FIELDS
from experiments.train import execute, run_dir_of

from .test_engine import tiny_cfg


@pytest.mark.slow
def test_tensorboard_scalars_and_snapshots_equal_the_run_files(tmp_path):
    cfg, ov = tiny_cfg(tmp_path, "assigner=paa", "scorer=iou", "logger=tensorboard", "schedule.iters=4",
                       "eval.curve_fractions=[0.5,1.0]", "model.num_convs=1")
    metrics = execute(cfg, ov, raise_on_failure=True)
    run_dir = run_dir_of(cfg)
    events = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0}).Reload()
    with open(run_dir / "stats.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4  # log_every 1
    for field in STATS_FIELDS[1:]:
        logged = [(e.step, e.value) for e in events.Scalars(f"train/{field}")]
        assert [step for step, _ in logged] == [int(r["iter"]) for r in rows], field
        assert [value for _, value in logged] == pytest.approx([float(r[field]) for r in rows], rel=2e-5, abs=1e-6), field
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3, 4]
    assert all(e.value > 0 for e in events.Scalars("train/images_per_second"))
    ap = events.Scalars("eval/AP")
    assert [e.step for e in ap] == [int(step) for step, _ in metrics["ap_curve"]]
    assert [e.value for e in ap] == pytest.approx([value for _, value in metrics["ap_curve"]], rel=1e-6, abs=1e-6)
    assert [e.step for e in events.Images("assignment")] == [2, 4]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "done"


def test_unknown_logger_names_the_choices(tmp_path):
    assert build_logger("none", tmp_path) is None
    with pytest.raises(ConfigError, match="unknown logger 'mlflow'; valid choices: none, tensorboard"):
        build_logger("mlflow", tmp_path)
