"""The two-stage model through the app: its configs resolve to the official values, and a PAA-RPN and an
ATSS-RPN Faster R-CNN train on digits with finite losses, recording the proposal recall beside AP."""

import csv
import json
import math

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf

import experiments  # noqa: F401  (registers resolvers)
from assigners.anchor_score import PREMATCH_IOU
from experiments.runfiles import PROPOSAL_AR_NAMES
from experiments.train import execute, run_dir_of


def _compose(overrides):
    with initialize_config_module("experiments.conf", version_base="1.3"):
        return compose("config", overrides=overrides)


def test_paa_rpn_composes_for_coco_with_the_official_values():
    """kkhoot/PAA_Faster-RCNN faster_rcnn_R_50_FPN_iou_paa_1x.yaml over detectron2's Base-RCNN-FPN and defaults."""
    cfg = OmegaConf.to_container(_compose(["data=coco", "model=faster_rcnn_r50", "rpn_assigner=paa",
                                           "schedule=coco_1x"]), resolve=True)
    assigner, model = cfg["assigner"], cfg["model"]
    # RPN.USE_PAA, RPN.IOU_THRESHOLDS [0.1, 0.1] (the pre-match), PAA.TOPK 9, scheme (c) as compute_paa.
    assert (assigner["name"], assigner["topk"], assigner["scheme"], PREMATCH_IOU) == ("paa", 9, "c", 0.1)
    # The official anchor score's classification term: the objectness BCE (focal alpha 1, gamma 0).
    assert (assigner["focal_alpha"], assigner["focal_gamma"]) == (1.0, 0.0)
    assert model["rpn_assigner"] == assigner  # the RPN is labelled by the run's assigner
    # RPN.USE_IOU_PRED (the scorer gives the RPN its IoU branch), POST_NMS_TOPK_TEST 2000.
    assert cfg["scorer"]["name"] == "iou" and model["rpn_post_nms_top_n_test"] == 2000
    # Base-RCNN-FPN: P2-P6 anchors 32-512 x (0.5, 1, 2); 2000 per level before NMS in training, 1000 at test,
    # 1000 per image after in training; NMS 0.7; 256 anchors per image, half positive at most.
    assert model["anchor_sizes"] == [32, 64, 128, 256, 512] and model["aspect_ratios"] == [0.5, 1.0, 2.0]
    assert (model["rpn_pre_nms_top_n_train"], model["rpn_pre_nms_top_n_test"], model["rpn_post_nms_top_n_train"],
            model["rpn_nms_thresh"]) == (2000, 1000, 1000, 0.7)
    assert (model["rpn_batch_size_per_image"], model["rpn_positive_fraction"], model["num_convs"]) == (256, 0.5, 1)
    # ROI heads: 512 RoIs a quarter positive, 2 x 1024 fc, test score 0.05, NMS 0.5, 100 detections.
    assert (model["box_batch_size_per_image"], model["box_positive_fraction"], model["representation_size"]) == (
        512, 0.25, 1024)
    assert (model["box_score_thresh"], model["box_nms_thresh"], model["box_detections_per_img"]) == (0.05, 0.5, 100)
    # ImageNet R-50 (torchvision's: the MSRA caffe weights cannot be loaded), FREEZE_AT 2, 256-channel FPN.
    assert (model["backbone"], model["weights"], model["norm"], model["frozen_stages"], model["fpn_channels"]) == (
        "resnet50", "ResNet50_Weights.IMAGENET1K_V1", "frozen_bn", 1, 256)
    assert (cfg["schedule"]["iters"], cfg["schedule"]["batch_size"]) == (90000, 16)


def test_the_rpn_presets_keep_the_baseline_rpn_otherwise():
    baseline = OmegaConf.to_container(_compose(["data=coco", "model=faster_rcnn_r50"]), resolve=True)
    assert baseline["assigner"] == {"_target_": "assigners.build", "name": "max_iou", "pos_iou": 0.7, "neg_iou": 0.3,
                                    "allow_low_quality": True}  # torchvision's and detectron2's RPN matcher
    assert baseline["scorer"]["name"] == "none" and baseline["model"]["rpn_post_nms_top_n_test"] == 1000
    atss = OmegaConf.to_container(_compose(["model=faster_rcnn_r50", "rpn_assigner=atss"]), resolve=True)
    assert atss["assigner"]["topk"] == 27  # ATSS's TOPK x 3 anchors per location
    without_iou = _compose(["model=faster_rcnn_r50", "rpn_assigner=paa", "scorer=none"])
    assert (without_iou.assigner.name, without_iou.scorer.name) == ("paa", "none")
    single_stage = _compose([])
    assert single_stage.assigner.pos_iou == 0.5 and single_stage.model._target_ == "detector.Detector"


@pytest.mark.parametrize("model", ["faster_rcnn_r50", "faster_rcnn_cpu_r18"])
def test_model_configs_instantiate_as_the_engine_builds_them(model):
    cfg = _compose([f"model={model}", "rpn_assigner=paa", "model.weights=null"])
    assigner = instantiate(cfg.assigner)
    net = instantiate(cfg.model, num_classes=3, use_quality=True, rpn_assigner=assigner)
    assert net.rpn.assigner is assigner and net.use_quality and net.size_divisibility == 64
    assert net.rpn.post_nms_top_n() == 1000 and net.eval().rpn.post_nms_top_n() == 2000


TINY = ["model=faster_rcnn_cpu_r18", "schedule=debug", "schedule.iters=2", "eval.curve_fractions=[1.0]",
        "model.fpn_channels=32", "data.digits.image_size=96", "data.digits.num_train=8", "data.digits.num_val=4",
        "data.num_workers=0", "eval.batch_size=4", "progress=false"]


@pytest.mark.slow
@pytest.mark.parametrize("rpn_assigner, scorer, snapshots", [("paa", "iou", True), ("atss", "none", False)])
def test_two_stage_trains_on_digits_through_the_app(tmp_path, caplog, rpn_assigner, scorer, snapshots):
    caplog.set_level("INFO", logger="experiments.engine")  # the logger experiments.hooks writes to
    overrides = [f"data.root={tmp_path / 'data'}", f"results_root={tmp_path / 'results'}", *TINY,
                 f"rpn_assigner={rpn_assigner}", f"eval.snapshots={str(snapshots).lower()}"]
    cfg = _compose(overrides)
    metrics = execute(cfg, overrides, raise_on_failure=True)
    run_dir = run_dir_of(cfg)
    assert metrics["status"] == "done" and metrics["iters"] == 2
    assert (metrics["assigner"], metrics["scorer"]) == (rpn_assigner, scorer)
    assert all(0.0 <= metrics[name] <= 100.0 for name in ("AP", *PROPOSAL_AR_NAMES))
    assert json.loads((run_dir / "metrics.json").read_text())["AR1000"] == metrics["AR1000"]
    with open(run_dir / "stats.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["iter"]) for r in rows] == [1, 2] and all(float(r["num_gt"]) >= 1 for r in rows)
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("loss_cls", "loss_box", "loss_quality"))
    assert (float(rows[0]["loss_quality"]) > 0) == (scorer == "iou")
    assert (run_dir / "assignments.npz").is_file() == snapshots
    # stats.csv keeps the contract's columns (the RPN's losses); the log line adds the box head's and sums all five
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iter 2/2  loss")]
    assert len(logged) == 1 and "roi_cls" in logged[0] and "roi_box" in logged[0], logged


def test_an_rpn_preset_on_a_single_stage_model_is_a_config_error(tmp_path):
    # rpn_assigner=paa sets RPN-only model keys; on model=cpu_r18 the run must fail on the config, by name,
    # and be recorded failed, not die in the model's constructor with a TypeError.
    overrides = [f"data.root={tmp_path / 'data'}", f"results_root={tmp_path / 'results'}", "rpn_assigner=paa",
                 "progress=false"]
    cfg = _compose(overrides)
    execute(cfg, overrides, raise_on_failure=False)
    metrics = json.loads((run_dir_of(cfg) / "metrics.json").read_text())
    assert metrics["status"] == "failed"
    assert metrics["error"].startswith("ConfigError: rpn_assigner is an RPN preset of a two-stage model")
    assert not (tmp_path / "data").exists()  # failed before any data was generated
