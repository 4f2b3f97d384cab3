"""The two-stage model (Faster R-CNN with an assigner in its RPN) on small CPU inputs."""

import pytest
import torch

import assigners
from detector import TwoStageDetector, TwoStageLoss, TwoStageOutput, build_scorer, postprocess

TARGETS = [
    {"boxes": torch.tensor([[10.0, 12.0, 40.0, 50.0], [60.0, 60.0, 100.0, 90.0]]), "labels": torch.tensor([0, 2])},
    {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},  # an image without GT
]


def small_model(assigner=None, use_quality=False, **kwargs):
    defaults = dict(num_classes=3, backbone="resnet18", norm="bn", frozen_stages=0, fpn_channels=16,
                    anchor_sizes=(16, 32, 64, 128, 256), representation_size=32, box_batch_size_per_image=32,
                    rpn_post_nms_top_n_train=50, rpn_post_nms_top_n_test=40)
    return TwoStageDetector(**{**defaults, **kwargs}, use_quality=use_quality, rpn_assigner=assigner)


def test_training_output_holds_the_rpn_outputs_and_proposals():
    torch.manual_seed(0)
    model = small_model(assigners.build("max_iou", pos_iou=0.7, neg_iou=0.3))
    out = model(torch.rand(2, 3, 128, 64))
    assert isinstance(out, TwoStageOutput) and out.detections is None
    # P2..P6 of a 128 x 64 image: 32x16, 16x8, 8x4, 4x2, 2x1 locations, 3 anchors each.
    assert out.num_anchors_per_level == [1536, 384, 96, 24, 6] and out.strides == [4, 8, 16, 32, 64]
    assert out.cls_logits.shape == (2, 2046, 1) and out.box_deltas.shape == (2, 2046, 4) and out.quality is None
    assert out.anchors.shape == (2046, 4) and model.decode(out).shape == (2, 2046, 4)
    assert list(out.features) == ["0", "1", "2", "3", "pool"] and out.image_size == (128, 64)
    assert [p.shape[0] for p in out.proposals] == [50, 50] and len(out.proposal_scores) == 2


@pytest.mark.parametrize("name, params, scorer", [
    ("max_iou", dict(pos_iou=0.7, neg_iou=0.3), "none"),
    ("atss", dict(topk=27), "none"),
    ("paa", dict(focal_alpha=1.0, focal_gamma=0.0), "iou"),
])
def test_losses_are_finite_and_train_every_part(name, params, scorer):
    torch.manual_seed(0)
    scorer = build_scorer(scorer)
    model = small_model(assigners.build(name, **params), use_quality=scorer.has_quality_branch)
    losses, info = TwoStageLoss(model, scorer)(model(torch.rand(2, 3, 128, 128)), TARGETS)
    assert set(losses) == {"loss_cls", "loss_box", "loss_quality", "loss_roi_cls", "loss_roi_box"}
    assert all(bool(torch.isfinite(v.detach())) for v in losses.values())
    assert (float(losses["loss_quality"].detach()) > 0) == scorer.has_quality_branch
    assert info["assignment"].positive_mask[0].any() and not info["assignment"].positive_mask[1].any()
    sum(losses.values()).backward()
    for part in (model.rpn.head.cls_logits, model.roi_heads.box_predictor.cls_score, model.backbone.body.layer1):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters()), part


def test_eval_output_holds_detections_that_postprocess_clips_to_each_image():
    torch.manual_seed(0)
    model = small_model(box_score_thresh=0.0).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 128, 128))
    assert [p.shape[0] for p in out.proposals] == [40, 40]
    detections = postprocess(out, [(128, 128), (64, 96)], build_scorer("none"))
    assert detections[0]["boxes"].shape[0] > 0 and detections[0]["quality"] is None
    for det, (height, width) in zip(detections, [(128, 128), (64, 96)]):
        assert bool((det["labels"] >= 0).all() and (det["labels"] < 3).all())
        assert bool((det["boxes"][:, 2] <= width).all() and (det["boxes"][:, 3] <= height).all())
        assert bool((det["boxes"][:, 2] > det["boxes"][:, 0]).all())
    with pytest.raises(ValueError, match="score voting"):
        postprocess(out, [(128, 128)] * 2, build_scorer("none"), score_voting=True)
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        postprocess(model(torch.rand(2, 3, 128, 128)), [(128, 128)] * 2, build_scorer("none"))


def test_loss_checks_the_scorer_and_the_assigner():
    model = small_model(assigners.build("max_iou"))
    for name in ("qfl", "centerness"):
        with pytest.raises(ValueError, match="not available to the two-stage model"):
            TwoStageLoss(model, build_scorer(name))
    with pytest.raises(ValueError, match="use_quality=True"):
        TwoStageLoss(model, build_scorer("iou"))
    with pytest.raises(ValueError, match="no RPN assigner"):
        TwoStageLoss(small_model(None), build_scorer("none"))
    with pytest.raises(ValueError, match="anchor_sizes"):
        small_model(anchor_sizes=(32, 64))


def test_imagenet_weights_resolve_through_the_backbones_enum_path(monkeypatch):
    """The COCO preset's ImageNet weights go through ResNetBackbone (torchvision's weights enum); the download
    itself is not made here."""
    import detector.backbone as backbone

    asked = []
    monkeypatch.setattr(backbone, "resolve_weights", lambda weights: asked.append(weights))
    TwoStageDetector(num_classes=2, backbone="resnet18", weights="ResNet18_Weights.IMAGENET1K_V1",
                     fpn_channels=16, representation_size=32)
    assert asked == ["ResNet18_Weights.IMAGENET1K_V1"]
