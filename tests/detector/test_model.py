"""Backbone, FPN, head and the assembled detector on small CPU inputs."""

import math

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detector import FPN, DenseHead, Detector, ResNetBackbone, num_groups_for
from detector.backbone import resolve_weights


def small_detector(**kwargs):
    defaults = dict(num_classes=3, backbone="resnet18", fpn_channels=32, norm="bn", frozen_stages=0)
    return Detector(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    ("levels", "counts"),
    [
        # 64x64 images: P2..P6 maps are 16, 8, 4, 2, 1 wide; P3..P7 maps are 8, 4, 2, 1, 1 wide.
        ((2, 3, 4, 5, 6), [256, 64, 16, 4, 1]),
        ((3, 4, 5, 6, 7), [64, 16, 4, 1, 1]),
    ],
)
def test_output_shapes_for_two_images(levels, counts):
    torch.manual_seed(0)
    model = small_detector(levels=levels)
    out = model(torch.rand(2, 3, 64, 64))
    num_anchors = sum(counts)
    assert out.num_anchors_per_level == counts
    assert out.strides == [2**level for level in levels]
    assert out.cls_logits.shape == (2, num_anchors, 3)
    assert out.box_deltas.shape == (2, num_anchors, 4)
    assert out.quality.shape == (2, num_anchors)
    assert out.anchors.shape == (num_anchors, 4)
    assert model.decode(out).shape == (2, num_anchors, 4)


def test_non_square_images_and_anchor_cache():
    model = small_detector()
    # Two images: GroupNorm with one channel per group cannot normalise a single 1x1 value in training.
    out = model(torch.rand(2, 3, 64, 96))
    # P3 8x12, P4 4x6, P5 2x3, P6 1x2, P7 1x1.
    assert out.num_anchors_per_level == [96, 24, 6, 2, 1]
    again = model(torch.rand(2, 3, 64, 96))
    assert again.anchors is out.anchors  # cached by feature sizes


def test_no_quality_branch():
    out = small_detector(use_quality=False)(torch.rand(2, 3, 64, 64))
    assert out.quality is None


def test_head_init_prior_and_scales():
    head = DenseHead(in_channels=32, num_classes=5, num_levels=3, num_convs=2, prior_prob=0.01)
    torch.testing.assert_close(torch.sigmoid(head.cls_logits.bias), torch.full((5,), 0.01))
    assert len(head.scales) == 3 and all(float(s.scale.detach()) == 1.0 for s in head.scales)
    conv = head.cls_tower[0]
    assert float(conv.bias.detach().abs().max()) == 0.0 and abs(float(conv.weight.detach().std()) - 0.01) < 0.002
    # With std-0.01 weights the logits are ~ the bias, so the class probability starts near the prior.
    with torch.no_grad():
        cls_logits, box_deltas, quality = head(
            [torch.randn(2, 32, 4, 4), torch.randn(2, 32, 2, 2), torch.randn(2, 32, 1, 1)]
        )
    assert cls_logits.shape == (2, 21, 5) and box_deltas.shape == (2, 21, 4) and quality.shape == (2, 21)
    assert abs(float(torch.sigmoid(cls_logits).mean()) - 0.01) < 1e-3


def test_group_norm_group_count():
    assert num_groups_for(256) == 32
    assert num_groups_for(32) == 32
    assert num_groups_for(16) == 16
    assert num_groups_for(48) == 24  # largest divisor of 48 not above 32
    head = DenseHead(in_channels=16, num_classes=2, num_levels=1, num_convs=1)
    norm = head.cls_tower[1]
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 16


def test_backbone_channels_norms_and_frozen_stages():
    backbone = ResNetBackbone("resnet18", norm="frozen_bn", frozen_stages=1, return_levels=(2, 3, 4, 5))
    assert backbone.out_channels == {2: 64, 3: 128, 4: 256, 5: 512}
    assert isinstance(backbone.stem[1], FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in backbone.stem.parameters())
    assert not any(p.requires_grad for p in backbone.layer1.parameters())
    assert all(p.requires_grad for p in backbone.layer2.parameters())
    features = backbone(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape) for f in features.values()] == [
        (1, 64, 16, 16),
        (1, 128, 8, 8),
        (1, 256, 4, 4),
        (1, 512, 2, 2),
    ]

    bottleneck = ResNetBackbone("resnet50", norm="gn", frozen_stages=0)
    assert bottleneck.out_channels[5] == 2048
    assert isinstance(bottleneck.stem[1], nn.GroupNorm)
    assert all(p.requires_grad for p in bottleneck.parameters())


def test_trainable_bn_in_frozen_stage_stays_in_eval_mode():
    backbone = ResNetBackbone("resnet18", norm="bn", frozen_stages=2).train()
    assert not backbone.stem[1].training and not backbone.layer2[0].bn1.training
    assert backbone.layer3[0].bn1.training


def test_weights_name_resolves_without_download_and_bad_arguments_raise():
    assert resolve_weights("ResNet50_Weights.IMAGENET1K_V1").url.endswith(".pth")
    with pytest.raises(ValueError, match="gn"):
        ResNetBackbone("resnet18", weights="ResNet18_Weights.IMAGENET1K_V1", norm="gn")
    with pytest.raises(ValueError, match="resnet18"):
        ResNetBackbone("vgg16")
    with pytest.raises(ValueError, match="frozen_bn"):
        ResNetBackbone("resnet18", norm="ln")
    with pytest.raises(ValueError, match="levels"):
        FPN({5: 512}, 32, levels=(6, 7))


def test_fpn_extra_levels_from_p5():
    fpn = FPN({4: 8, 5: 16}, out_channels=8, levels=(4, 5, 6, 7, 8))
    pyramid = fpn([torch.rand(1, 8, 16, 16), torch.rand(1, 16, 8, 8)])
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    # Levels below 5 only: the FPN still reads C5 but returns just what is asked.
    fpn = FPN({3: 8, 4: 8, 5: 16}, out_channels=8, levels=(3, 4))
    assert len(fpn([torch.rand(1, 8, 8, 8), torch.rand(1, 8, 4, 4), torch.rand(1, 16, 2, 2)])) == 2


def test_forward_backward_gives_gradients():
    torch.manual_seed(0)
    model = small_detector(norm="frozen_bn", frozen_stages=1)
    out = model(torch.rand(2, 3, 64, 64))
    loss = out.cls_logits.sigmoid().sum() + model.decode(out).abs().mean() + out.quality.sum()
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert all(p.grad is None for p in model.backbone.layer1.parameters())
    assert model.backbone.layer4[0].conv1.weight.grad.abs().sum() > 0
    assert not math.isnan(loss.item())


def test_training_step_and_inference_with_the_real_loss():
    import assigners
    from detector import DetectionLoss, build_scorer, postprocess

    torch.manual_seed(0)
    model = small_detector(levels=(2, 3, 4, 5, 6))
    scorer = build_scorer("iou")
    loss = DetectionLoss(assigners.build("max_iou"), scorer, num_classes=3)
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([2])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    out = model(torch.rand(2, 3, 64, 64))
    losses, info = loss(out, targets)
    assert set(losses) == {"loss_cls", "loss_box", "loss_quality"}
    stats = assigners.assignment_stats(info["inputs"], info["assignment"])
    assert stats["num_gt"] == 1 and stats["num_pos"] >= 1
    sum(losses.values()).backward()
    assert model.head.quality.weight.grad.abs().sum() > 0
    assert model.head.box_deltas.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        detections = postprocess(model(torch.rand(2, 3, 64, 64)), [(64, 64), (64, 48)], scorer, score_thresh=0.0)
    assert len(detections) == 2
    for result, (height, width) in zip(detections, [(64, 64), (64, 48)]):
        assert 0 < len(result["boxes"]) <= 100
        assert (result["boxes"][:, 2] <= width).all() and (result["boxes"][:, 3] <= height).all()
        assert (result["scores"][:-1] >= result["scores"][1:]).all()


def test_head_box_and_quality_outputs_are_their_own_convs():
    # The head runs the box-delta and quality convs as one conv over the concatenated filters; each
    # output must still be what its own module gives on the box tower's feature.
    torch.manual_seed(0)
    head = DenseHead(in_channels=16, num_classes=3, num_levels=2, num_convs=2).double()
    for scale, value in zip(head.scales, (0.5, 2.0)):
        nn.init.constant_(scale.scale, value)
    features = [torch.randn(2, 16, 4, 4, dtype=torch.float64), torch.randn(2, 16, 2, 2, dtype=torch.float64)]
    cls_logits, box_deltas, quality = head(features)
    with torch.no_grad():
        box_features = [head.box_tower(f) for f in features]
        expected_deltas = [s(head.box_deltas(b)).permute(0, 2, 3, 1).flatten(1, 2) for s, b in zip(head.scales, box_features)]
        expected_quality = [head.quality(b).flatten(1) for b in box_features]
        expected_cls = [head.cls_logits(head.cls_tower(f)).permute(0, 2, 3, 1).flatten(1, 2) for f in features]
    torch.testing.assert_close(box_deltas, torch.cat(expected_deltas, dim=1))
    torch.testing.assert_close(quality, torch.cat(expected_quality, dim=1))
    torch.testing.assert_close(cls_logits, torch.cat(expected_cls, dim=1))
    (box_deltas.sum() + quality.sum()).backward()
    assert head.box_deltas.weight.grad.abs().sum() > 0 and head.quality.weight.grad.abs().sum() > 0


def _loss_and_gradients(model, images, targets):
    import assigners
    from detector import DetectionLoss, build_scorer

    losses, _ = DetectionLoss(assigners.build("atss"), build_scorer("centerness"), 3)(model(images), targets)
    model.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("norm", ["frozen_bn", "bn"])
def test_channels_last_gives_the_losses_and_gradients_of_the_default_layout(norm):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 64, 64)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0], [20.0, 8.0, 60.0, 30.0]]), "labels": torch.tensor([2, 0])},
               {"boxes": torch.tensor([[10.0, 12.0, 50.0, 62.0]]), "labels": torch.tensor([1])}]
    torch.manual_seed(1)
    default = small_detector(norm=norm, frozen_stages=0 if norm == "bn" else 1)
    torch.manual_seed(1)
    nhwc = small_detector(norm=norm, frozen_stages=0 if norm == "bn" else 1, channels_last=True)
    conv = nhwc.backbone.layer2[0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert nhwc.head.cls_tower[0].weight.is_contiguous()  # the head keeps the default layout
    torch.testing.assert_close(dict(nhwc.state_dict()), dict(default.state_dict()))
    losses, grads = _loss_and_gradients(default, images, targets)
    nhwc_losses, nhwc_grads = _loss_and_gradients(nhwc, images, targets)
    # Same sums in another order: float32 rounding, ~1e-7 relative per conv. Trainable BatchNorm's
    # channels-last CPU kernel accumulates its statistics less precisely (~5e-6 relative on a
    # 32k-element channel against ~1e-7 for the default layout, both measured against float64), and
    # backpropagation through a random-init network amplifies such differences in the gradients.
    torch.testing.assert_close(nhwc_losses, losses, rtol=1e-5, atol=1e-6)
    # The absolute floor covers gradients that are zero but for rounding: the bias of a conv whose
    # output GroupNorm normalises one channel per group.
    grad_rtol = 1e-4 if norm == "frozen_bn" else 1e-3
    largest = max(float(g.norm()) for g in grads.values() if g is not None)
    for name, grad in grads.items():
        if grad is None:
            assert nhwc_grads[name] is None
            continue
        difference = float((nhwc_grads[name] - grad).norm())
        assert difference <= grad_rtol * float(grad.norm()) + 1e-6 * largest, f"{name}: gradient differs by {difference:.2e}"
    # A checkpoint of either layout loads into the other one.
    default.load_state_dict(nhwc.state_dict())
    assert default.backbone.layer2[0].conv1.weight.is_contiguous()
