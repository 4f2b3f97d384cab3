"""A grid's progress line (experiments.progress): counts from the run files, time left from this sweep's pace."""

import json

from omegaconf import OmegaConf

from experiments import progress
from experiments.progress import GridProgress, format_seconds, progress_line


def _config(tmp_path):
    return OmegaConf.create({"results_root": str(tmp_path), "grid": {"name": "g", "variants": ["a", "b", "c"]},
                             "seeds": [0, 1]})


def _finish(tmp_path, name, status="done"):
    (tmp_path / "g" / name).mkdir(parents=True, exist_ok=True)
    (tmp_path / "g" / name / "metrics.json").write_text(json.dumps({"status": status}))


def _lines(caplog):
    lines = [record.getMessage() for record in caplog.records]
    caplog.clear()
    return lines


def test_progress_counts_runs_and_extrapolates_this_sweeps_pace(tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="experiments.engine")
    config = _config(tmp_path)
    _finish(tmp_path, "a-s0")  # done before the sweep: skipped, not part of its pace
    clock = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: clock[0])
    callback = GridProgress()
    callback.on_multirun_start(config)
    clock[0] += 5.0
    callback.on_job_end(config)  # a-s0 skipped: nothing finished in this sweep yet
    assert _lines(caplog) == ["[assignbench] grid g: 1/6 runs finished (0 failed), elapsed 5s, time left unknown yet"]
    _finish(tmp_path, "a-s1")
    _finish(tmp_path, "b-s0", "failed")
    clock[0] += 295.0
    callback.on_job_end(config)
    # 2 runs in 300 s: 150 s a run, 3 left -> 450 s.
    assert _lines(caplog) == ["[assignbench] grid g: 3/6 runs finished (1 failed), elapsed 5m00s, about 7m30s left"]
    # A stray directory that is not a run of the grid does not count; incomplete runs are not finished.
    _finish(tmp_path, "z-s9")
    (tmp_path / "g" / "c-s0").mkdir()
    callback.on_job_end(config)
    assert "3/6 runs finished" in _lines(caplog)[0]


def test_a_single_run_logs_nothing(tmp_path, caplog):
    caplog.set_level("INFO", logger="experiments.engine")
    GridProgress().on_job_end(_config(tmp_path))  # no sweep started: no progress file
    assert _lines(caplog) == []


def test_formats():
    assert [format_seconds(s) for s in (7, 245, 3723)] == ["7s", "4m05s", "1h02m03s"]
    assert progress_line("g", 6, 0, 6, 60.0, 6).endswith("elapsed 1m00s, none left")
