"""AP of our detector against an off-the-shelf peer, torchvision's FCOS, trained alike side by side.

    python -m benchmarks.peer [--weights none|digits] [--seed 0] [--variant atss_centerness] [overrides ...]

Both train on the same digits train split, in the same batch order (one sampler, one seed), for the
same iterations, batch, image size, LR schedule and SGD settings (the config's schedule, ``quick`` by
default: 600 iterations of 8 images at 128 px), from the same backbone: a ResNet-18 with trainable
BatchNorm, random (``--weights none``) or the digits-pretrained one (``--weights digits``,
``experiments.pretrain``). Both are scored by the same COCO evaluation on digits val with the same
inference settings (score threshold, NMS IoU, pre-NMS top-k, detections per image).

- ours: the run ``assignbench-train +variants=VARIANT`` makes (``experiments.train.execute``), as
  configured for the digits preset (P2-P6, anchors 4 x stride, 2-conv GroupNorm towers, 64 channels);
- FCOS: ``torchvision.models.detection.FCOS`` on the same ResNet with a 64-channel FPN on P3-P7 (its
  LastLevelP6P7) and its own 4-conv GroupNorm head, focal + GIoU + centerness losses and centre sampling.

Printed and written to ``OUT_DIR/peer.json``: AP, AP50, AP75, training seconds and images/s of each
(the two ran one after the other on this machine, so their images/s compare), and ours - FCOS in AP.
Trailing ``key=value`` arguments are config overrides applied to both (e.g. ``schedule.iters=1200``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

__all__ = ["build_fcos", "main", "train_fcos"]

PIXEL_MEAN = [0.485, 0.456, 0.406]  # detector.Detector's normalisation
PIXEL_STD = [0.229, 0.224, 0.225]
C3_C5_CHANNELS = {"resnet18": [128, 256, 512], "resnet34": [128, 256, 512]}


def build_fcos(cfg, num_classes: int, weights: str | None) -> FCOS:
    """torchvision's FCOS on the config's ResNet and FPN width, at the config's image size, with its inference."""
    from detector.backbone import load_weights_file

    resnet = getattr(torchvision.models, str(cfg.model.backbone))(weights=None, norm_layer=nn.BatchNorm2d)
    if weights:
        load_weights_file(resnet, weights)
    channels = int(cfg.model.fpn_channels)
    # What torchvision's _resnet_fpn_extractor(trainable_layers=5, returned_layers=[2, 3, 4],
    # extra_blocks=LastLevelP6P7) builds, with the config's FPN width (the helper fixes 256).
    widths = C3_C5_CHANNELS.get(str(cfg.model.backbone), [512, 1024, 2048])  # bottleneck ResNets
    backbone = BackboneWithFPN(resnet, return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
                               in_channels_list=widths, out_channels=channels,
                               extra_blocks=LastLevelP6P7(channels, channels))
    inference = cfg.inference
    size = int(cfg.schedule.test_min_size)
    return FCOS(backbone, num_classes, min_size=size, max_size=int(cfg.schedule.max_size), image_mean=PIXEL_MEAN,
                image_std=PIXEL_STD, score_thresh=float(inference.score_thresh), nms_thresh=float(inference.nms_thresh),
                detections_per_img=int(inference.max_det), topk_candidates=int(inference.pre_nms_top_n))


def _results(outputs, targets, label_to_category_id) -> list[dict]:
    """FCOS's detections (resized-image xyxy) as COCO results, by the conversion our evaluation uses."""
    from experiments.evaluation import detections_to_coco

    rows = []
    for out, target in zip(outputs, targets):
        rows += detections_to_coco(out, target["image_id"], float(target["scale"]), label_to_category_id)
    return rows


def train_fcos(cfg) -> dict:
    """Train and evaluate FCOS on the config's data, schedule and batch order; returns its AP and timing."""
    from experiments.build import (
        build_datasets,
        build_optimization,
        build_train_loader,
        build_val_loader,
        check_budget,
        infinite_batches,
        seed_everything,
    )
    from experiments.distributed import DistInfo
    from experiments.engine import pretrained_weights
    from experiments.evaluation import coco_evaluate

    seed_everything(int(cfg.seed))
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    dist_info = DistInfo()
    budget = check_budget(cfg, dist_info)
    train_set, val_set, val_base = build_datasets(cfg)
    model = build_fcos(cfg, train_set.num_classes, pretrained_weights(cfg, train_set).get("weights"))
    optimizer, scheduler = build_optimization(model, cfg.schedule, budget)
    # FCOS's own transform pads to 32 again; at digits' square sizes both models get the same pixels.
    loader = build_train_loader(train_set, cfg, budget, dist_info, 0, size_divisibility=32)
    val_loader = build_val_loader(val_set, cfg, size_divisibility=32)
    batches = infinite_batches(loader, int(cfg.seed) * 100003)
    model.train()
    seconds = 0.0
    try:
        for _ in range(budget.iters):
            start = time.perf_counter()
            images, targets = next(batches)
            losses = model(list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
            total = sum(losses.values())
            if not torch.isfinite(total):
                raise FloatingPointError(f"FCOS: non-finite loss {[(k, float(v)) for k, v in losses.items()]}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            scheduler.step()
            seconds += time.perf_counter() - start
    finally:
        batches.close()
    model.eval()
    results = []
    with torch.no_grad():
        for images, targets in val_loader:
            results += _results(model(list(images)), targets, val_base.label_to_category_id)
    ap = coco_evaluate(val_base.coco, results, str(cfg.eval.backend))
    return {**ap, "train_seconds": round(seconds, 1),
            "images_per_second": round(budget.iters * budget.total_batch / seconds, 2)}


def main(argv: list[str] | None = None) -> int:
    from hydra import compose, initialize_config_module

    from experiments.train import execute

    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", choices=("none", "digits"), default="none")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", default="atss_centerness", help="our variant (conf/variants)")
    parser.add_argument("--out-dir", type=Path, default=Path("results/runs/peer"))
    parser.add_argument("overrides", nargs="*", help="config overrides for both models")
    args = parser.parse_args(argv)
    common = [f"seed={args.seed}", "progress=false", *args.overrides]
    if args.weights == "digits":
        common.append("model.weights=digits")
    tag = f"{args.weights}-s{args.seed}"
    ours_overrides = [f"+variants={args.variant}", f"results_root={args.out_dir / tag}", *common]
    with initialize_config_module("experiments.conf", version_base="1.3"):
        ours_cfg = compose("config", overrides=ours_overrides)
        fcos_cfg = compose("config", overrides=common)
    ours = execute(ours_cfg, ours_overrides, raise_on_failure=True)
    fcos = train_fcos(fcos_cfg)
    rows = {f"ours {ours_cfg.variant}": ours, "torchvision FCOS": fcos}
    print(f"\nweights {args.weights}, seed {args.seed}, {ours_cfg.schedule.iters} iterations x "
          f"{ours_cfg.schedule.batch_size} images at {ours_cfg.schedule.min_size} px")
    print(f"{'model':<32} {'AP':>6} {'AP50':>6} {'AP75':>6} {'train s':>8} {'img/s':>7}")
    for name, m in rows.items():
        print(f"{name:<32} {m['AP']:6.2f} {m['AP50']:6.2f} {m['AP75']:6.2f} {m['train_seconds']:8.0f} "
              f"{m['images_per_second']:7.2f}")
    gap = ours["AP"] - fcos["AP"]
    print(f"ours - FCOS: {gap:+.2f} AP")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    keep = ("AP", "AP50", "AP75", "APs", "APm", "train_seconds", "images_per_second")
    record = {"weights": args.weights, "seed": args.seed, "overrides": args.overrides, "ours_minus_fcos_AP": gap,
              **{name: {k: m.get(k) for k in keep} for name, m in rows.items()}}
    (args.out_dir / f"peer-{tag}.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
