"""Run files: atomic writes, stats.csv truncation on resume, the per-run lock, metrics fields."""

import json
import math
import multiprocessing as mp

import pytest

from experiments.runfiles import (
    METRIC_FIELDS,
    STATS_FIELDS,
    RunLock,
    StatsWriter,
    atomic_write_text,
    read_metrics,
    write_metrics,
)


def _row(it):
    return {k: float(it) for k in STATS_FIELDS} | {"iter": it}


def test_stats_resume_drops_rows_past_checkpoint_and_torn_line(tmp_path):
    path = tmp_path / "stats.csv"
    w = StatsWriter(path)
    for it in (10, 20, 30, 40):
        w.write(_row(it))
    w.close()
    with open(path, "a") as f:  # a kill in the middle of writing row 50
        f.write("50,1.0,2")
    w = StatsWriter(path, resume_iter=20)  # checkpoint was at 20: rows 30, 40 will be re-logged
    w.write(_row(30))
    w.close()
    lines = path.read_text().splitlines()
    assert lines[0] == ",".join(STATS_FIELDS)
    assert [int(float(line.split(",")[0])) for line in lines[1:]] == [10, 20, 30]


def test_stats_header_written_once(tmp_path):
    path = tmp_path / "stats.csv"
    StatsWriter(path).close()
    StatsWriter(path, resume_iter=0).close()
    assert path.read_text().count("iter,") == 1


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_text(path, "old")

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left


def test_metrics_require_every_field_and_nan_becomes_null(tmp_path):
    path = tmp_path / "metrics.json"
    with pytest.raises(KeyError, match="lack fields"):
        write_metrics(path, {"status": "done"})
    m = {k: None for k in METRIC_FIELDS} | {"status": "done", "AP": math.nan, "ap_curve": [[1, math.inf]]}
    write_metrics(path, m)
    loaded = json.loads(path.read_text())
    assert loaded["AP"] is None and loaded["ap_curve"] == [[1, None]]
    assert read_metrics(tmp_path / "absent.json") is None


def _try_lock(run_dir, q):
    lock = RunLock(run_dir)
    q.put(lock.acquire())
    lock.release()


def test_lock_excludes_a_second_process_and_frees_on_release(tmp_path):
    lock = RunLock(tmp_path)
    assert lock.acquire()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_try_lock, args=(str(tmp_path), q))
    p.start()
    p.join(60)
    assert q.get(timeout=5) is False
    lock.release()
    p = ctx.Process(target=_try_lock, args=(str(tmp_path), q))
    p.start()
    p.join(60)
    assert q.get(timeout=5) is True


def test_run_name_round_trips_and_the_config_spells_it_the_same_way():
    from hydra import compose, initialize_config_module

    import experiments  # noqa: F401  (registers the resolvers)
    from experiments.runfiles import parse_run_name, run_name

    assert run_name("paa_iou", 3) == "paa_iou-s3"
    assert parse_run_name("paa_c-s1-s12") == ("paa_c-s1", 12)
    assert parse_run_name("no-seed") is None
    with initialize_config_module("experiments.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+variants=paa_iou", "seed=5"])
    assert cfg.run_name == run_name(cfg.variant_id, 5) == "paa_iou-s5"


def test_new_metrics_has_every_contract_field_and_legacy_assigner_names_map():
    from experiments.runfiles import canonical_assigner, new_metrics

    metrics = new_metrics(variant="PAA+IoU", variant_id="paa_iou", seed=2, assigner="paa", scorer="iou",
                          overrides=["seed=2"])
    assert list(metrics) == METRIC_FIELDS
    assert (metrics["variant"], metrics["seed"], metrics["AP"], metrics["ap_curve"]) == ("PAA+IoU", 2, None, [])
    assert canonical_assigner("iou") == "max_iou" and canonical_assigner("atss") == "atss"

