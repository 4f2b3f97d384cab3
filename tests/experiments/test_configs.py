"""Every config composes; grids expand to their variants; the COCO schedules resolve as the paper."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import experiments  # noqa: F401  (registers resolvers)
from detector import available_scorers

CONF = Path(experiments.__file__).parent / "conf"
GRIDS = sorted(p.stem for p in (CONF / "grid").glob("*.yaml"))
VARIANTS = sorted(p.stem for p in (CONF / "variants").glob("*.yaml"))


def _compose(overrides, hydra_node=False):
    with initialize_config_module("experiments.conf", version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_node)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_composes_and_names_itself(variant):
    cfg = _compose([f"+variants={variant}"])
    assert cfg.variant_id == variant
    assert cfg.run_name == f"{variant}-s0"
    OmegaConf.to_container(cfg, resolve=True)  # no dangling interpolation


@pytest.mark.parametrize("grid", GRIDS)
def test_every_grid_lists_existing_variants(grid):
    cfg = _compose([f"grid={grid}"], hydra_node=True)
    assert cfg.grid.name == grid
    if grid == "single":
        return
    params = cfg.hydra.sweeper.params
    listed = str(params["+variants"]).split(",")
    assert listed == list(cfg.grid.variants)
    assert set(listed) <= set(VARIANTS)
    assert str(params["seed"]) == ",".join(str(s) for s in cfg.seeds)


def test_seeds_override_reaches_the_sweep():
    cfg = _compose(["grid=demo", "seeds=[0,1,2]"], hydra_node=True)
    assert cfg.hydra.sweeper.params["seed"] == "0,1,2"


def test_variant_parameters_land_in_the_assigner_and_model():
    cfg = _compose(["+variants=paa_b_iou"])
    assert (cfg.assigner.name, cfg.assigner.scheme, cfg.scorer.name) == ("paa", "b", "iou")
    cfg = _compose(["+variants=paa_scale075"])
    assert cfg.model.anchor_scale == pytest.approx(3.0)
    cfg = _compose(["+variants=paa_iou_voting"])
    assert cfg.inference.score_voting is True
    cfg = _compose(["+variants=atss_centerness"])
    assert (cfg.scorer.box_weight, cfg.scorer.quality_weight) == (2.0, 1.0)
    cfg = _compose(["+variants=paa_iou"])
    assert (cfg.scorer.cls_weight, cfg.scorer.box_weight, cfg.scorer.quality_weight) == (1.0, 1.3, 0.5)


def test_paa_config_builds_the_official_gmm_precision():
    # Issue #14: the official code fits float32 losses; "auto" is the Triton EM on CUDA, the torch EM on CPU.
    from hydra.utils import instantiate

    cfg = _compose(["+variants=paa_iou"])
    assert (cfg.assigner.gmm_backend, cfg.assigner.gmm_dtype) == ("auto", "float32")
    paa = instantiate(cfg.assigner)
    assert (paa.gmm_backend, paa.gmm_dtype) == ("auto", "float32")
    assert instantiate(_compose(["+variants=paa_iou", "assigner.gmm_dtype=float64"]).assigner).gmm_dtype == "float64"


@pytest.mark.parametrize("name", available_scorers())
def test_scorer_configs_build_the_scorer_with_their_weights(name):
    from hydra.utils import instantiate

    node = _compose([f"scorer={name}"]).scorer
    scorer = instantiate(node)
    assert scorer.name == name
    assert (scorer.cls_weight, scorer.box_weight, scorer.quality_weight) == (
        node.cls_weight, node.box_weight, node.quality_weight)
    # the class defaults are the method's own weights, the same as its config file
    from detector import SCORERS

    default = SCORERS[name]()
    assert (default.cls_weight, default.box_weight, default.quality_weight) == (
        node.cls_weight, node.box_weight, node.quality_weight)


def test_every_grid_names_a_baseline_among_its_variants():
    grid_dir = Path(__file__).parents[2] / "experiments" / "conf" / "grid"
    for path in sorted(grid_dir.glob("*.yaml")):
        grid = OmegaConf.load(path).grid
        if grid.get("variants"):
            assert grid.baseline in grid.variants, path.name


@pytest.mark.parametrize(
    "schedule, iters, steps, min_size",
    [
        ("coco_1x", 90000, [60000, 80000], 800),
        ("coco_1.5x", 135000, [90000, 120000], 800),
        ("coco_2x", 180000, [120000, 160000], [640, 672, 704, 736, 768, 800]),
    ],
)
def test_coco_schedules_resolve_to_the_papers_values(schedule, iters, steps, min_size):
    cfg = _compose(["data=coco", "model=r50", f"schedule={schedule}"])
    s = OmegaConf.to_container(cfg.schedule, resolve=True)
    assert (s["iters"], s["batch_size"], s["base_lr"], s["steps"], s["min_size"]) == (iters, 16, 0.01, steps, min_size)
    assert (s["max_size"], s["test_min_size"], s["gamma"]) == (1333, 800, 0.1)
    assert cfg.model.levels == [3, 4, 5, 6, 7] and cfg.model.anchor_scale == 8.0
    assert cfg.model.weights == "ResNet50_Weights.IMAGENET1K_V1"


def test_gpu_digits_schedule_enlarges_the_images():
    cfg = _compose(["schedule=gpu_digits"])
    assert cfg.data.digits.image_size == 256 and cfg.schedule.min_size == 256


@pytest.mark.parametrize("grid", GRIDS)
def test_each_grid_sweeps_the_seeds_its_file_sets(grid):
    # config.yaml's own values come last (_self_); a `seeds` there silently replaced every grid's.
    written = OmegaConf.load(CONF / "grid" / f"{grid}.yaml").get("seeds")
    assert written is not None, f"conf/grid/{grid}.yaml sets no seeds"
    assert list(_compose([f"grid={grid}"]).seeds) == list(written)


@pytest.mark.parametrize(
    ("model", "backbone", "weights", "dcn_stages"),
    [
        # kkhoot/PAA paa_dcnv2_*: STAGE_WITH_DCN (False, True, True, True) for ResNet (res3-res5),
        # (False, False, True, True) for ResNeXt-101 64x4d; USE_DCN_IN_TOWER True in all.
        ("r50_dcn", "resnet50", "ResNet50_Weights.IMAGENET1K_V1", [3, 4, 5]),
        ("r101_dcn", "resnet101", "ResNet101_Weights.IMAGENET1K_V1", [3, 4, 5]),
        ("x101_dcn", "resnext101_64x4d", "ResNeXt101_64X4D_Weights.IMAGENET1K_V1", [4, 5]),
    ],
)
def test_dcn_models_resolve_to_the_official_placement(model, backbone, weights, dcn_stages):
    node = _compose(["data=coco", f"model={model}", "schedule=coco_1x"]).model
    assert (node.backbone, node.weights, list(node.dcn_stages), node.dcn_tower) == (backbone, weights, dcn_stages, True)
    assert (node.norm, node.frozen_stages, node.num_convs, node.fpn_channels) == ("frozen_bn", 1, 4, 256)
    plain = _compose(["data=coco", "model=r50"]).model
    assert (list(plain.dcn_stages), plain.dcn_tower) == ([], False)
