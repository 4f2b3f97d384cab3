"""Assignment cost of every assigner on two fixed, seeded batches, measured side by side.

    python -m benchmarks.assign [--device cpu|cuda] [--reps N] [--threads N] [--cases atss,paa-torch]

Batches (built once, seeded, never changed by the assigners):
- ``digits``: the GT of the first 8 images of the digits val set at 128 px, anchors of the digits
  preset (P2-P6, anchor side 4 x stride), 10 classes;
- ``coco``: 16 images of 800 x 1216 with about 7 GT each (log-uniform sizes from 12 to 600 px),
  P3-P7 anchors of side 8 x stride (``detector.anchors.make_anchors``), 80 classes.
Predictions for both come from ``noisy_predictions``: near an object (IoU > 0.1 with it) an anchor's
box is the GT jittered in proportion to how poorly the anchor overlaps it and its GT class logit is
raised; elsewhere the box is the anchor jittered at random, and every logit is the focal prior
(p = 0.01) plus noise.

A third batch, ``dense``, is the COCO-like one with 200 GT per image (``coco_like_batch(gt_per_image=200)``):
there each assigner is timed once and its peak memory growth is checked against 2 GiB (the dense-cost
assigners, TAL, SimOTA, OTA and DSL, hold (B, G, A) costs; the first three and DSL assign in groups of
images bounded by ``assigners.base.DENSE_MAX_PAIRS``).

Timed: ``max_iou``, ``atss``, ``fnp``, ``fsr``, ``paa`` (PAA scheme c), ``tal``, ``simota``, ``ota`` and
``dsl`` with their defaults, PAA three ways: ``paa-torch`` (the batched GMM), ``paa-sklearn`` (the assigner's ``gmm_backend="sklearn"``: one
sklearn GaussianMixture per GT, everything else batched as in ``paa-torch``) and ``paa-official``
(``official_paa``: the official code's per-image, per-GT loops, with its per-level top-k, its
GaussianMixture and its labelling per GT, on our anchor loss). Printed: ms per batch of each,
PAA(torch)/ATSS, the EM's share of PAA(torch)'s time (``em_share``), each new assigner / ATSS,
PAA(sklearn)/PAA(torch), PAA(official)/PAA(torch), the share of GTs whose positive anchors are the same
for paa-torch and each of the other two, each case's peak memory growth, and its positives per GT on
the batch (predictions of a half-trained detector, so a hint of each rule's selectivity, not its count
over training: that is in each run's stats.csv).

``--cases`` times only the named cases (comma-separated names of ``CASES`` and ``paa-official``), with
the ratios and agreements among them, and skips the ``dense`` batch: ``--cases atss,paa-torch`` gives
PAA(torch)/ATSS and the EM's share in seconds instead of the full run's many minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time

import torch

import assigners
from assigners import NEGATIVE, AssignInputs, Assignment, anchor_loss, fit_gmm_sklearn, gt_anchor_iou
from benchmarks.common import (
    Report,
    describe_machine,
    median_ms,
    median_ratio,
    parse_args,
    peak_memory_mb,
    setup_device,
    synchronize,
    time_interleaved,
)
from detector import make_anchors
from detector.losses import pad_targets

CASES = {
    "max_iou": dict(name="max_iou"),
    "atss": dict(name="atss"),
    "fnp": dict(name="fnp"),
    "fsr": dict(name="fsr"),
    "paa-torch": dict(name="paa", gmm_backend="torch"),
    "paa-sklearn": dict(name="paa", gmm_backend="sklearn"),
    "tal": dict(name="tal"),
    "simota": dict(name="simota"),
    "ota": dict(name="ota"),
    "dsl": dict(name="dsl"),
}
DENSE_GT = 200  # GT per image of the ``dense`` batch
DENSE_MEMORY_MIB = 2048.0  # the most extra memory an assigner may take on it (CPU)
# Too slow to time on the dense batch (one sklearn fit per GT, 3200 GTs); they are timed on the others.
NOT_ON_DENSE = ("paa-sklearn", "paa-official")
PRIOR_LOGIT = -math.log((1 - 0.01) / 0.01)
DIGITS_STRIDES = (4, 8, 16, 32, 64)
COCO_STRIDES = (8, 16, 32, 64, 128)


def level_anchors(image_size: tuple[int, int], strides: tuple[int, ...], anchor_scale: float, device):
    """(A, 4) anchors and their per-level counts for an image of ``image_size`` (H, W) pixels."""
    height, width = image_size
    sizes = [(-(-height // stride), -(-width // stride)) for stride in strides]
    return make_anchors(sizes, list(strides), anchor_scale, device=device)


def noisy_predictions(
    anchors: torch.Tensor,
    counts: list[int],
    targets: list[dict[str, torch.Tensor]],
    num_classes: int,
    generator: torch.Generator,
    strides: tuple[int, ...],
) -> AssignInputs:
    """AssignInputs for ``targets`` on CPU with predictions of a half-trained detector (module docstring)."""
    gt_boxes, gt_labels, gt_mask = pad_targets(targets)
    static = AssignInputs(anchors, counts, gt_boxes, gt_labels, gt_mask)
    best_iou, best_gt = gt_anchor_iou(static).max(dim=1)  # needs G >= 1
    b, a = len(targets), anchors.shape[0]
    near = best_iou > 0.1  # (B, A)

    cls_logits = PRIOR_LOGIT + 0.8 * torch.randn(b, a, num_classes, generator=generator)
    label = gt_labels.gather(1, best_gt)
    signal = 6.0 * best_iou.clamp(min=0) * torch.rand(b, a, generator=generator)
    cls_logits.scatter_add_(2, label.unsqueeze(-1), torch.where(near, signal, 0.0).unsqueeze(-1))

    target = gt_boxes.gather(1, best_gt.unsqueeze(-1).expand(b, a, 4))
    target_side = (target[..., 2:] - target[..., :2]).repeat(1, 1, 2)
    anchor_side = (anchors[:, 2:] - anchors[:, :2]).repeat(1, 2)
    jitter = (0.05 + 0.3 * (1 - best_iou.clamp(min=0, max=1))).unsqueeze(-1)
    near_box = target + jitter * target_side * torch.randn(b, a, 4, generator=generator)
    far_box = anchors + 0.3 * anchor_side * torch.randn(b, a, 4, generator=generator)
    pred_boxes = torch.where(near.unsqueeze(-1), near_box, far_box)
    return AssignInputs(anchors, counts, gt_boxes, gt_labels, gt_mask, cls_logits, pred_boxes, list(strides))


def coco_like_batch(num_images: int = 16, image_size: tuple[int, int] = (800, 1216), mean_gt: float = 7.0,
                    gt_per_image: int | None = None) -> AssignInputs:
    """The seeded COCO-like batch (module docstring), on CPU; ``gt_per_image`` fixes every image's GT
    count (the ``dense`` batch) instead of drawing it around ``mean_gt``."""
    generator = torch.Generator().manual_seed(0)
    height, width = image_size
    targets = []
    for _ in range(num_images):
        count = int(torch.poisson(torch.tensor(mean_gt), generator=generator).clamp(1, 30))
        count = count if gt_per_image is None else gt_per_image
        side = torch.exp(torch.empty(count).uniform_(math.log(12.0), math.log(600.0), generator=generator))
        aspect = torch.exp(torch.empty(count).uniform_(math.log(0.5), math.log(2.0), generator=generator))
        w = (side * aspect.sqrt()).clamp(max=width)
        h = (side / aspect.sqrt()).clamp(max=height)
        x1 = torch.rand(count, generator=generator) * (width - w)
        y1 = torch.rand(count, generator=generator) * (height - h)
        labels = torch.randint(0, 80, (count,), generator=generator)
        targets.append({"boxes": torch.stack([x1, y1, x1 + w, y1 + h], dim=1), "labels": labels})
    anchors, counts = level_anchors(image_size, COCO_STRIDES, 8.0, "cpu")
    return noisy_predictions(anchors, counts, targets, 80, generator, COCO_STRIDES)


def digits_batch(num_images: int = 8) -> AssignInputs:
    """The seeded digits batch (module docstring), on CPU; builds the digits set if missing."""
    from experiments.data import build_dataset

    dataset = build_dataset("digits", "val", train=False, min_size=128, max_size=128, flip_prob=0.0)
    targets = [dataset[index][1] for index in range(num_images)]
    anchors, counts = level_anchors((128, 128), DIGITS_STRIDES, 4.0, "cpu")
    return noisy_predictions(anchors, counts, targets, 10, torch.Generator().manual_seed(1), DIGITS_STRIDES)


def tiny_batch() -> AssignInputs:
    """Two 128 x 192 images with COCO-like structure: exercises every step in a second."""
    generator = torch.Generator().manual_seed(2)
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 70.0, 90.0], [100.0, 30.0, 180.0, 60.0]]), "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[40.0, 40.0, 56.0, 60.0]]), "labels": torch.tensor([2])},
    ]
    anchors, counts = level_anchors((128, 192), COCO_STRIDES, 8.0, "cpu")
    return noisy_predictions(anchors, counts, targets, 5, generator, COCO_STRIDES)


def to_device(inputs: AssignInputs, device: torch.device) -> AssignInputs:
    tensors = ("anchors", "gt_boxes", "gt_labels", "gt_mask", "cls_logits", "pred_boxes")
    return dataclasses.replace(inputs, **{name: getattr(inputs, name).to(device) for name in tensors})


def official_paa(inputs: AssignInputs, topk: int = 9) -> Assignment:
    """PAA scheme c as the official code runs it (kkhoot/PAA, ``PAALossComputation.compute_paa``), on
    our anchor loss: for each image and each GT, per level the ``topk`` lowest-loss anchors pre-matched
    to it, then one sklearn GaussianMixture (``fit_gmm_sklearn`` on that GT alone) and its labels.

    A restatement for timing the official method and checking agreement with ``paa``, not a second
    assigner. Departures, to compare like with like: top-k and sorting are stable (ties to the lower
    anchor index, as ``paa``), and anchors with a non-finite loss are not candidates.
    """
    losses = anchor_loss(inputs)
    gt_index = torch.full_like(losses.prematch, NEGATIVE)
    level_bounds, start = [], 0
    for count in inputs.num_anchors_per_level:
        level_bounds.append((start, start + count))
        start += count
    for image in range(inputs.batch_size):
        loss, prematch = losses.loss[image], losses.prematch[image]
        for gt in inputs.gt_mask[image].nonzero().flatten().tolist():
            per_level = []
            for start, end in level_bounds:
                matched = ((prematch[start:end] == gt) & torch.isfinite(loss[start:end])).nonzero()[:, 0]
                if matched.numel() > 0:
                    order = torch.argsort(loss[start:end][matched], stable=True)[:topk]
                    per_level.append(matched[order] + start)
            if not per_level:
                continue
            candidates = torch.cat(per_level)
            if candidates.numel() == 1:
                gt_index[image, candidates] = gt
                continue
            candidate_loss, order = torch.sort(loss[candidates], stable=True)
            # float32, as the official code hands sklearn the network's float32 losses (paa's default gmm_dtype).
            fit = fit_gmm_sklearn(candidate_loss.view(1, -1), torch.ones_like(candidate_loss, dtype=torch.bool).view(1, -1),
                                  dtype=torch.float32)
            foreground, score = fit.labels[0] == 0, fit.log_density[0]
            if bool(foreground.any()):  # positives up to the fg peak (Fig. 3 c)
                peak = int((foreground & (score == score[foreground].max())).nonzero().min())
                gt_index[image, candidates[order[: peak + 1]]] = gt
            else:  # no foreground component: all positive, for recall
                gt_index[image, candidates] = gt
    return Assignment(gt_index=gt_index)


def positives_per_gt(inputs: AssignInputs, assignment: Assignment) -> float:
    """Mean number of positive anchors per real GT."""
    counts = assignment.positives_per_gt(inputs.num_gt_slots)[inputs.gt_mask]
    return float(counts.double().mean()) if counts.numel() else 0.0


def positive_set_agreement(inputs: AssignInputs, first: Assignment, second: Assignment) -> float:
    """Share of real GTs whose set of positive anchors is the same in both assignments."""
    num_gt_slots = inputs.num_gt_slots
    slots = torch.arange(num_gt_slots, device=inputs.anchors.device).view(1, -1, 1)
    same = ((first.gt_index.unsqueeze(1) == slots) == (second.gt_index.unsqueeze(1) == slots)).all(dim=2)
    return float(same[inputs.gt_mask].float().mean()) if bool(inputs.gt_mask.any()) else 1.0


def em_share(assigner: assigners.Assigner, inputs: AssignInputs, device: torch.device, reps: int) -> float:
    """Median over ``reps`` PAA calls of the share of the call's time spent in its GMM fit, timed
    inside the call (``assigners.paa.fit_gmm`` wrapped, with a device sync on each side)."""
    paa_module = assigners.paa
    fit_gmm, em_seconds, shares = paa_module.fit_gmm, [], []

    def timed_fit_gmm(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        fit = fit_gmm(*args, **kwargs)
        synchronize(device)
        em_seconds.append(time.perf_counter() - start)
        return fit

    paa_module.fit_gmm = timed_fit_gmm
    try:
        for _ in range(reps):
            em_seconds.clear()
            synchronize(device)
            start = time.perf_counter()
            assigner(inputs)
            synchronize(device)
            shares.append(sum(em_seconds) / (time.perf_counter() - start))
    finally:
        paa_module.fit_gmm = fit_gmm
    return statistics.median(shares)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = [*CASES, "paa-official"]
    parser.add_argument(
        "--cases",
        type=lambda text: text.split(","),
        default=names,
        help=f"comma-separated cases to time (default all: {','.join(names)}); a subset skips the dense batch",
    )


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_reps=10, add_arguments=add_arguments)
    names = [*CASES, "paa-official"]
    unknown = [case for case in args.cases if case not in names]
    if unknown:
        raise SystemExit(f"unknown cases {', '.join(unknown)}; valid: {', '.join(names)}")
    selected = [case for case in names if case in args.cases]
    device = setup_device(args)
    print(describe_machine(device, args.threads), flush=True)
    batches = {"tiny": tiny_batch()} if args.tiny else {"digits": digits_batch(), "coco": coco_like_batch()}
    report = Report("assign", device, args.threads)
    built = {case: assigners.build(**params) for case, params in CASES.items() if case in selected}
    for section, cpu_inputs in batches.items():
        inputs = to_device(cpu_inputs, device)
        describe_batch(section, inputs)
        cases = {case: (lambda a=assigner, x=inputs: a(x)) for case, assigner in built.items()}
        if "paa-official" in selected:
            cases["paa-official"] = lambda x=inputs: official_paa(x)
        seconds = time_interleaved(cases, reps=args.reps, warmup=args.warmup, device=device)
        ms = {case: median_ms(values) for case, values in seconds.items()}
        for case in cases:
            report.figure(section, f"{case} ms/batch", ms[case], "ms")
        for case, call in cases.items():
            report.figure(section, f"{case} peak memory", peak_memory_mb(call, device), "MiB")
        for case in built:
            report.figure(section, f"{case} positives/GT", positives_per_gt(inputs, built[case](inputs)), "")
        coco = section == "coco"
        if {"paa-torch", "atss"} <= cases.keys():
            report.ratio(section, "PAA(torch)/ATSS", median_ratio(seconds["paa-torch"], seconds["atss"]), "<= 2.0")
        if "paa-torch" in cases:
            share = em_share(built["paa-torch"], inputs, device, reps=args.reps)
            report.ratio(section, "EM share of PAA(torch)", share, unit="share")
        for case in ("tal", "simota", "ota", "dsl"):
            if {case, "atss"} <= cases.keys():
                report.ratio(section, f"{case}/ATSS", median_ratio(seconds[case], seconds["atss"]))
        others = [other for other in ("sklearn", "official") if {f"paa-{other}", "paa-torch"} <= cases.keys()]
        for other in others:
            ratio = median_ratio(seconds[f"paa-{other}"], seconds["paa-torch"])
            report.ratio(section, f"PAA({other})/PAA(torch)", ratio, ">= 20" if coco else "")
        for other in others:
            agreement = positive_set_agreement(inputs, built["paa-torch"](inputs), cases[f"paa-{other}"]())
            report.ratio(section, f"GTs with equal positives, {other}", agreement, ">= 0.99", unit="share")
    if not args.tiny and len(selected) == len(names):
        dense_section(report, built, device)
    report.write_csv(args.out_dir)


def describe_batch(section: str, inputs: AssignInputs) -> None:
    print(
        f"assign {section}: {inputs.batch_size} images, {int(inputs.gt_mask.sum())} GT, {inputs.anchors.shape[0]} "
        f"anchors, {inputs.cls_logits.shape[-1]} classes",
        flush=True,
    )


def dense_section(report: Report, built: dict[str, assigners.Assigner], device: torch.device) -> None:
    """Every assigner once on the ``dense`` batch: its time and its peak memory growth against 2 GiB."""
    inputs = to_device(coco_like_batch(gt_per_image=DENSE_GT), device)
    describe_batch("dense", inputs)
    for case, assigner in built.items():
        if case in NOT_ON_DENSE:
            continue
        seconds = time_interleaved({case: lambda a=assigner: a(inputs)}, reps=1, warmup=0, device=device)[case]
        report.figure("dense", f"{case} ms/batch", median_ms(seconds), "ms")
        memory = peak_memory_mb(lambda a=assigner: a(inputs), device)
        report.ratio("dense", f"{case} peak memory", memory, f"<= {DENSE_MEMORY_MIB:.0f}", unit="MiB")


if __name__ == "__main__":
    main()
