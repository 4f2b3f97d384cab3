"""Multi-scale and flip testing (experiments.tta): the transforms, the mirror, and exactness of the identity."""

import pytest
import torch

import experiments.engine as engine
from experiments.errors import ConfigError
from experiments.tta import Transform, mirror_valid_areas, tta_transforms

from .test_engine import tiny_cfg

# kkhoot/PAA configs/paa/paa_dcnv2_X_101_64x4d_FPN_2x.yaml, TEST.BBOX_AUG (MIN/MAX_SIZE_TEST 800/1333).
OFFICIAL_SCALES = [400, 500, 600, 640, 700, 900, 1000, 1100, 1200, 1300, 1400, 1800]
OFFICIAL_RANGES = [[96, 10000], [96, 10000], [64, 10000], [64, 10000], [64, 10000], [0, 10000], [0, 10000],
                   [0, 256], [0, 256], [0, 192], [0, 192], [0, 96]]


def test_official_transforms():
    tta = dict(flip=True, scales=OFFICIAL_SCALES, scale_ranges=OFFICIAL_RANGES, scale_flip=True, max_size=3000)
    transforms = tta_transforms(tta, 800, 1333)
    assert len(transforms) == 2 + 2 * 12
    # The test size and its mirror, with no size filter.
    assert transforms[:2] == [Transform(800, 1333, False), Transform(800, 1333, True)]
    # Scales below the test size keep its 1333 cap (official: "if scale < 800"), the others get MAX_SIZE.
    assert transforms[2:4] == [Transform(400, 1333, False, (96.0, 10000.0)), Transform(400, 1333, True, (96.0, 10000.0))]
    assert transforms[12] == Transform(900, 3000, False, (0.0, 10000.0))
    assert transforms[-1] == Transform(1800, 3000, True, (0.0, 96.0))


def test_transforms_reject_inconsistent_settings():
    with pytest.raises(ConfigError, match="scale_ranges has 1 entries for 2 scales"):
        tta_transforms(dict(scales=[96, 160], scale_ranges=[[0, 10]]), 128, 128)
    with pytest.raises(ConfigError, match="merge"):
        tta_transforms(dict(merge="wbf"), 128, 128)
    assert tta_transforms(dict(flip=False), 128, 128) == [Transform(128, 128, False)]


def test_mirror_keeps_the_padding_bottom_right():
    # Image 0 is 1 x 3 valid pixels in a 2 x 4 padded slot: [1, 2, 3] -> [3, 2, 1], padding stays 0.
    images = torch.tensor([[[[1.0, 2.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]]],
                           [[[5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0]]]]).expand(2, 3, 2, 4)
    mirrored = mirror_valid_areas(images, [(1, 3), (2, 4)])
    assert mirrored[0, 0].tolist() == [[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert mirrored[1, 0].tolist() == [[8.0, 7.0, 6.0, 5.0], [4.0, 3.0, 2.0, 1.0]]


def _evaluate(tmp_path, *overrides):
    cfg, _ = tiny_cfg(tmp_path, "assigner=atss", "scorer=iou", "inference.score_thresh=0.0", "inference.max_det=30",
                      "model.num_convs=1", *overrides)
    run = engine.build_run(cfg, tmp_path / "run")
    _, iou_err, results = engine.make_evaluator(run)()
    return sorted((r["image_id"], r["category_id"], r["score"], tuple(r["bbox"])) for r in results), iou_err


@pytest.mark.slow
@pytest.mark.parametrize("merge", ["soft-vote", "vote", "nms"])
def test_identity_alone_is_exactly_the_plain_inference(tmp_path, merge):
    # A random model (seeded) with score_thresh 0 gives many detections; with no extra transform the
    # merge sees one NMS'd set, in which no two boxes of a class overlap by more than 0.6 < 0.66.
    plain, plain_err = _evaluate(tmp_path / "plain")
    tta, tta_err = _evaluate(tmp_path / "tta", "inference.tta.enabled=true", "inference.tta.flip=false",
                             f"inference.tta.merge={merge}")
    assert len(plain) > 50
    assert tta == plain and tta_err == plain_err


@pytest.mark.slow
def test_flip_and_scales_pool_more_detections(tmp_path):
    plain, _ = _evaluate(tmp_path / "plain")
    tta, err = _evaluate(tmp_path / "tta", "inference.tta.enabled=true", "inference.tta.scales=[64,128]",
                         "inference.tta.max_size=128", "inference.tta.merge=nms")
    assert len(tta) > len(plain) and err is not None
    # Every box lies in the original 96 x 96 image (the 64 and 128 px passes are mapped back).
    assert all(0 <= x and 0 <= y and x + w <= 96.01 and y + h <= 96.01 for *_, (x, y, w, h) in tta)
