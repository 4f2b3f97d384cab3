"""Training-step throughput: our detector against torchvision's FCOS, measured side by side.

    python -m benchmarks.train [--device cpu|cuda] [--reps N] [--threads N] [--batch-size 8]

One step is forward, loss, backward and an SGD step (lr 0.005, momentum 0.9, weight decay 1e-4) in
float32, on fixed digits training batches (128 px, 10 classes), cycled in the same order for every model.
Every model has a random-init ResNet-18 with trainable BatchNorm, a 64-channel FPN and four-conv
GroupNorm towers:
- ``ours P3-P7 atss+centerness``: ``detector.Detector`` with levels P3-P7 and ``DetectionLoss`` with
  ATSS and centerness, the configuration torchvision's FCOS has (P3-P7 from C3-C5 with P6-P7 from
  P5, a centerness branch on the box tower): the apples-to-apples pair. Our models run their backbone
  and FPN channels-last (``Detector(channels_last=True)``), torchvision's FCOS the default layout it is
  built with; ``ours P3-P7 atss+centerness NCHW`` is the same model in the default layout, so the
  share of the layout in the ratio shows;
- ``torchvision FCOS P3-P7``: ``torchvision.models.detection.FCOS`` on the same backbone, built as
  ``_resnet_fpn_extractor`` builds it (``BackboneWithFPN`` with ``LastLevelP6P7``, every layer
  trainable) but with a 64-channel FPN; its transform keeps the 128 px images
  (``min_size = max_size = 128``);
- ``ours P2-P6 atss+centerness`` and ``ours P2-P6 paa+iou``: the same detector on the levels and
  anchors of the digits preset (P2-P6, anchor side 4 x stride, ``experiments/conf/model/cpu_r18.yaml``),
  the pair behind "PAA at the cost of ATSS".
Printed: images/s of each, ours/FCOS (target >= 1.1 on CPU) in either layout, channels-last over
NCHW, PAA+iou over ATSS+centerness, the median assignment time per step of our models, and the peak
memory of one step.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

import assigners
from benchmarks.common import (
    Report,
    describe_machine,
    median_ms,
    median_ratio,
    parse_args,
    peak_memory_mb,
    setup_device,
    time_interleaved,
)
from detector import DetectionLoss, Detector, build_scorer

NUM_CLASSES = 10
IMAGE_SIZE = 128
FPN_CHANNELS = 64
NUM_CONVS = 4
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
# Anchor side in strides: the digits preset's 4 (cpu_r18.yaml) on P2-P6; ATSS/PAA's 8 on P3-P7.
ANCHOR_SCALE = {(2, 3, 4, 5, 6): 4.0, (3, 4, 5, 6, 7): 8.0}

Batch = tuple[torch.Tensor, list[dict[str, torch.Tensor]]]


def digits_batches(num_batches: int, batch_size: int, device: torch.device, tiny: bool) -> list[Batch]:
    """Fixed training batches of the digits set (flips drawn once, seeded), on ``device``."""
    from experiments.data import build_dataset, collate

    torch.manual_seed(0)
    params = {"num_train": 16, "num_val": 4} if tiny else None
    dataset = build_dataset(
        "digits", "train", train=True, min_size=IMAGE_SIZE, max_size=IMAGE_SIZE, flip_prob=0.5, digits_params=params
    )
    batches = []
    for index in range(num_batches):
        items = [dataset[(index * batch_size + k) % len(dataset)] for k in range(batch_size)]
        images, targets = collate(items, size_divisibility=IMAGE_SIZE)
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        batches.append((images.to(device), targets))
    return batches


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=0.005, momentum=0.9, weight_decay=1e-4)


def our_step(levels: tuple[int, ...], assigner: str, scorer: str, device: torch.device, assign_ms: list[float],
             channels_last: bool = True):
    """A training step of ``detector.Detector`` with ``assigner`` and ``scorer``; appends its assignment time."""
    torch.manual_seed(0)
    model = Detector(
        NUM_CLASSES,
        backbone="resnet18",
        weights=None,
        norm="bn",
        frozen_stages=0,
        fpn_channels=FPN_CHANNELS,
        num_convs=NUM_CONVS,
        levels=levels,
        anchor_scale=ANCHOR_SCALE[levels],
        use_quality=True,
        channels_last=channels_last,
    ).to(device)
    model.train()
    criterion = DetectionLoss(assigners.build(assigner), build_scorer(scorer), NUM_CLASSES)  # the scorer's weights
    optimizer = sgd(model)

    def step(batch: Batch) -> None:
        images, targets = batch
        losses, info = criterion(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
        assign_ms.append(info["assign_ms"].ms)

    return step


def fcos_step(device: torch.device):
    """A training step of torchvision's FCOS with the same backbone, FPN, head and levels (P3-P7)."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    # What torchvision's ``_resnet_fpn_extractor(resnet, trainable_layers=5, returned_layers=[2, 3, 4],
    # extra_blocks=LastLevelP6P7(...))`` builds, with a 64-channel FPN (the helper fixes 256).
    backbone = BackboneWithFPN(
        resnet,
        return_layers={"layer2": "0", "layer3": "1", "layer4": "2"},
        in_channels_list=[128, 256, 512],
        out_channels=FPN_CHANNELS,
        extra_blocks=LastLevelP6P7(FPN_CHANNELS, FPN_CHANNELS),
    )
    # Labels 0..9 index the 10 sigmoid logits directly (FCOS has no background logit to skip).
    model = FCOS(
        backbone, NUM_CLASSES, min_size=IMAGE_SIZE, max_size=IMAGE_SIZE, image_mean=list(PIXEL_MEAN), image_std=list(PIXEL_STD)
    ).to(device)
    model.train()
    optimizer = sgd(model)

    def step(batch: Batch) -> None:
        images, targets = batch
        losses = model(list(images), targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()

    return step


def cycling(step: Callable[[Batch], None], batches: list[Batch]) -> Callable[[], None]:
    """A no-argument call that runs ``step`` on the next batch, cycling through ``batches``."""
    order = itertools.cycle(batches)
    return lambda: step(next(order))


def main() -> None:
    def add_arguments(parser):
        parser.add_argument("--batch-size", type=int, default=8)
        parser.add_argument("--num-batches", type=int, default=4, help="distinct batches cycled through")

    args = parse_args(__doc__.splitlines()[0], default_reps=12, add_arguments=add_arguments)
    device = setup_device(args)
    print(describe_machine(device, args.threads), flush=True)
    batch_size = 2 if args.tiny else args.batch_size
    batches = digits_batches(1 if args.tiny else args.num_batches, batch_size, device, args.tiny)
    assign_ms: dict[str, list[float]] = {}
    steps = {
        "ours P3-P7 atss+centerness": our_step((3, 4, 5, 6, 7), "atss", "centerness", device, assign_ms.setdefault("p3 atss", [])),
        "torchvision FCOS P3-P7": fcos_step(device),
        "ours P3-P7 atss+centerness NCHW": our_step(
            (3, 4, 5, 6, 7), "atss", "centerness", device, assign_ms.setdefault("p3 atss nchw", []), channels_last=False
        ),
        "ours P2-P6 atss+centerness": our_step((2, 3, 4, 5, 6), "atss", "centerness", device, assign_ms.setdefault("p2 atss", [])),
        "ours P2-P6 paa+iou": our_step((2, 3, 4, 5, 6), "paa", "iou", device, assign_ms.setdefault("p2 paa", [])),
    }
    cases = {name: cycling(step, batches) for name, step in steps.items()}
    seconds = time_interleaved(cases, reps=args.reps, warmup=args.warmup, device=device)
    images_per_second = {name: batch_size / (median_ms(values) / 1000.0) for name, values in seconds.items()}

    report = Report("train", device, args.threads)
    section = f"batch{batch_size}"
    for name, value in images_per_second.items():
        report.figure(section, f"{name} img/s", value, "img/s")
    for name, values in assign_ms.items():
        report.figure(section, f"{name} assign ms/step", statistics.median(values), "ms")
    for name, call in cases.items():
        report.figure(section, f"{name} peak memory", peak_memory_mb(call, device), "MiB")
    # images/s of a over b = step time of b over a.
    fcos = seconds["torchvision FCOS P3-P7"]
    ours_p3 = seconds["ours P3-P7 atss+centerness"]
    ours_p2, paa_p2 = seconds["ours P2-P6 atss+centerness"], seconds["ours P2-P6 paa+iou"]
    ours_p3_nchw = seconds["ours P3-P7 atss+centerness NCHW"]
    report.ratio(section, "ours/FCOS img/s (P3-P7)", median_ratio(fcos, ours_p3), ">= 1.1" if device.type == "cpu" else ">= 1.0")
    report.ratio(section, "ours NCHW/FCOS img/s (P3-P7)", median_ratio(fcos, ours_p3_nchw))
    report.ratio(section, "channels-last/NCHW img/s (ours P3-P7)", median_ratio(ours_p3_nchw, ours_p3))
    report.ratio(section, "ours P2-P6/FCOS P3-P7 img/s", median_ratio(fcos, ours_p2))
    report.ratio(section, "PAA+iou/ATSS+centerness img/s", median_ratio(ours_p2, paa_p2), ">= 0.9")
    report.write_csv(args.out_dir)


if __name__ == "__main__":
    main()
