"""End to end: tiny runs through the engine write the results contract, skip, fail and resume."""

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from pycocotools.coco import COCO

import assigners
import experiments  # noqa: F401
import experiments.engine as engine
import experiments.trainer as trainer
from detector import SCORERS, available_scorers
from experiments.runfiles import METRIC_FIELDS, STATS_FIELDS
from experiments.train import execute, run_dir_of

TINY_DATA = [
    "data.digits.image_size=96",
    "data.digits.num_train=24",
    "data.digits.num_val=6",
    "data.num_workers=0",
    "eval.batch_size=6",
    "progress=false",
]


def tiny_cfg(tmp_path, *overrides):
    ov = [f"data.root={tmp_path / 'data'}", f"results_root={tmp_path / 'results'}", "schedule=debug",
          "model.fpn_channels=32", *TINY_DATA, *overrides]
    with initialize_config_module("experiments.conf", version_base="1.3"):
        return compose("config", overrides=ov), ov


def read_stats(run_dir: Path):
    with open(run_dir / "stats.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_tiny_run_writes_the_results_contract(tmp_path):
    cfg, ov = tiny_cfg(tmp_path, "assigner=max_iou", "scorer=iou")
    metrics = execute(cfg, ov, raise_on_failure=True)
    run_dir = run_dir_of(cfg)
    assert run_dir == tmp_path / "results" / "single" / "max_iou_iou-s0"
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert saved["status"] == "done" and saved["error"] is None
    assert set(METRIC_FIELDS) <= set(saved)
    assert saved["iters"] == 4 and saved["assigner"] == "max_iou" and saved["scorer"] == "iou"
    assert (saved["variant"], saved["variant_id"], saved["seed"]) == ("max_iou+iou", "max_iou_iou", 0)
    env = saved["environment"]
    assert set(env["versions"]) >= {"torch", "torchvision", "numpy", "pycocotools"} and env["device"]
    assert env["threads"] == torch.get_num_threads() and env["device_type"] == "cpu"
    # the data hash is the sha256 of the train and val annotation files, in that order
    ann = sorted((tmp_path / "data").glob("*/annotations"))[0]
    digest = __import__("hashlib").sha256(b"".join(
        (ann / f"instances_{split}.json").read_bytes() for split in ("train", "val"))).hexdigest()[:16]
    assert env["data_hash"] == digest
    assert all(0.0 <= saved[k] <= 100.0 for k in ("AP", "AP50", "AP75"))
    assert [p[0] for p in saved["ap_curve"]] == [1, 2, 3, 4]
    assert saved["images_per_second"] > 0 and saved["peak_memory_mb"] > 0
    rows = read_stats(run_dir)
    assert list(rows[0]) == STATS_FIELDS
    assert [int(r["iter"]) for r in rows] == [1, 2, 3, 4]
    assert all(float(r["num_gt"]) >= 1 for r in rows)
    # the detections are COCO results that pycocotools reads back against the val GT
    val_gt = COCO(str(tmp_path / "data" / next(p.name for p in (tmp_path / "data").iterdir())
                      / "annotations" / "instances_val.json"))
    dets = json.loads((run_dir / "detections.json").read_text())
    if dets:
        val_gt.loadRes(dets)
    cfg_text = (run_dir / "config.yaml").read_text()
    assert "${" not in cfg_text and "name: iou" in cfg_text
    snap = torch.from_numpy(__import__("numpy").load(run_dir / "assignments.npz")["gt_index_4"])
    assert snap.dim() == 1 and bool(((snap >= -2)).all())


@pytest.mark.slow
def test_done_run_is_skipped(tmp_path, monkeypatch):
    cfg, ov = tiny_cfg(tmp_path, "schedule.iters=1", "eval.curve_fractions=[1.0]")
    execute(cfg, ov, raise_on_failure=True)
    metrics_file = run_dir_of(cfg) / "metrics.json"
    before = metrics_file.read_bytes()
    monkeypatch.setattr(engine, "train_run", lambda *a, **k: pytest.fail("a done run was trained again"))
    execute(cfg, ov, raise_on_failure=True)
    assert metrics_file.read_bytes() == before


@pytest.mark.slow
def test_failure_is_recorded_then_the_rerun_resumes_without_duplicate_rows(tmp_path, monkeypatch):
    cfg, ov = tiny_cfg(tmp_path, "eval.curve_fractions=[1.0]", "schedule.checkpoint_every=2")
    real = trainer.outputs_to_float
    calls = {"n": 0}

    def crash_on_third(out):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return real(out)

    monkeypatch.setattr(trainer, "outputs_to_float", crash_on_third)
    execute(cfg, ov, raise_on_failure=False)
    run_dir = run_dir_of(cfg)
    failed = json.loads((run_dir / "metrics.json").read_text())
    assert failed["status"] == "failed" and "injected fault" in failed["error"]
    assert (run_dir / "checkpoints" / "last.pt").exists()
    assert [int(r["iter"]) for r in read_stats(run_dir)] == [1, 2]

    monkeypatch.setattr(trainer, "outputs_to_float", real)
    metrics = execute(cfg, ov, raise_on_failure=True)
    assert metrics["status"] == "done" and metrics["iters"] == 4
    assert [int(r["iter"]) for r in read_stats(run_dir)] == [1, 2, 3, 4]
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["iter"] == 4


@pytest.mark.slow
def test_non_finite_loss_fails_the_run_naming_iteration_and_terms(tmp_path, monkeypatch):
    cfg, ov = tiny_cfg(tmp_path, "eval.curve_fractions=[1.0]")
    real = trainer.outputs_to_float

    def poison(out):
        out = real(out)
        return dataclasses.replace(out, cls_logits=out.cls_logits * float("nan"))

    monkeypatch.setattr(trainer, "outputs_to_float", poison)
    with pytest.raises(SystemExit):
        execute(cfg, ov, raise_on_failure=True)
    failed = json.loads((run_dir_of(cfg) / "metrics.json").read_text())
    assert failed["status"] == "failed"
    assert "iteration 1" in failed["error"] and "loss_cls=nan" in failed["error"]


@pytest.mark.slow
def test_the_hydra_app_runs_and_rejects_unknown_choices(tmp_path):
    _, ov = tiny_cfg(tmp_path, "schedule.iters=1", "eval.curve_fractions=[1.0]", "assigner=atss",
                     "scorer=centerness")
    proc = subprocess.run([sys.executable, "-m", "experiments.train", *ov], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "results" / "single" / "atss_centerness-s0"
    assert (run_dir / "metrics.json").exists()
    # without a progress bar the run logs each stats row and each evaluation, to the console and to
    # Hydra's train.log in the run directory; the logged loss is the stats row's sum of loss terms
    (row,) = read_stats(run_dir)
    loss = sum(float(row[k]) for k in ("loss_cls", "loss_box", "loss_quality"))
    log_lines = (run_dir / "train.log").read_text().splitlines()
    (iter_line,) = [line for line in log_lines if "iter 1/1" in line]
    assert f"loss {loss:.4f}" in iter_line and f"pos/GT {float(row['pos_per_gt_mean']):.2f}" in iter_line
    ap = json.loads((run_dir / "metrics.json").read_text())["AP"]
    assert any(f"[atss_centerness-s0] iter 1: AP {ap:.1f}" in line for line in log_lines), log_lines
    assert iter_line.split(" - ", 1)[1] in proc.stdout + proc.stderr
    bad = subprocess.run([sys.executable, "-m", "experiments.train", "assigner=nope"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0
    assert "nope" in bad.stderr and "paa" in bad.stderr and "atss" in bad.stderr


def _finite_stats(run_dir):
    rows = read_stats(run_dir)
    assert rows, "no stats rows"
    for r in rows:
        for k, v in r.items():
            assert v != "" and float(v) == float(v) and abs(float(v)) != float("inf"), (k, v)
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("assigner", assigners.available())  # every registered assigner
def test_every_assigner_trains_with_finite_losses(tmp_path, assigner):
    cfg, ov = tiny_cfg(tmp_path, f"assigner={assigner}", "scorer=iou", "schedule.iters=3",
                       "eval.curve_fractions=[1.0]", "eval.snapshots=false", "model.num_convs=1")
    metrics = execute(cfg, ov, raise_on_failure=True)
    assert metrics["status"] == "done" and metrics["assigner"] == assigner
    rows = _finite_stats(run_dir_of(cfg))
    assert all(float(r["num_gt"]) > 0 for r in rows)


@pytest.mark.slow
def test_dcn_model_trains_with_finite_losses(tmp_path):
    cfg, ov = tiny_cfg(tmp_path, "assigner=paa", "scorer=iou", "schedule.iters=3", "model.dcn_stages=[3,4,5]",
                       "model.dcn_tower=true", "eval.curve_fractions=[1.0]", "eval.snapshots=false", "model.num_convs=1")
    metrics = execute(cfg, ov, raise_on_failure=True)
    assert metrics["status"] == "done"
    assert len(_finite_stats(run_dir_of(cfg))) > 0


@pytest.mark.slow
@pytest.mark.parametrize("scorer", available_scorers())  # every registered scorer
@pytest.mark.parametrize("voting", [False, True])
def test_every_scorer_trains_and_reports_its_fields(tmp_path, scorer, voting):
    cfg, ov = tiny_cfg(tmp_path, "assigner=atss", f"scorer={scorer}", "schedule.iters=3",
                       f"inference.score_voting={str(voting).lower()}", "inference.score_thresh=0.0",
                       "eval.curve_fractions=[1.0]", "eval.snapshots=false", "model.num_convs=1")
    metrics = execute(cfg, ov, raise_on_failure=True)
    assert metrics["status"] == "done" and metrics["scorer"] == scorer
    assert set(METRIC_FIELDS) <= set(metrics)
    rows = _finite_stats(run_dir_of(cfg))
    quality = [float(r["loss_quality"]) for r in rows]
    if not SCORERS[scorer].has_quality_branch:
        assert metrics["iou_pred_error"] is None and all(q == 0.0 for q in quality)
    else:
        assert all(q > 0.0 for q in quality)
    if scorer == "iou":  # score_thresh 0 keeps detections, so some overlap a GT by >= 0.5
        assert metrics["iou_pred_error"] is not None and 0.0 <= metrics["iou_pred_error"] <= 1.0
    else:
        assert metrics["iou_pred_error"] is None


def test_a_run_whose_deadline_has_passed_does_not_start(tmp_path, capsys):
    cfg, ov = tiny_cfg(tmp_path, "deadline=1")  # 1970
    assert execute(cfg, ov, raise_on_failure=True) is None
    assert "stopped: deadline passed before the run started" in capsys.readouterr().err
    run_dir = run_dir_of(cfg)
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoints").exists()
