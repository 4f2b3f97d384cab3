"""Paired bootstrap CIs of a whole grid (1000 resamples), beside one COCOeval for scale.

    python -m benchmarks.bootstrap [--reps N] [--resamples N] [--grid results/<grid> --baseline VARIANT]

Grid (default, synthetic, seeded): 7 variants x 3 seeds on one GT set shaped like the digits val
set (500 images of 128 px, 1-5 objects each of 12-64 px, 10 classes). A run's detections: per GT,
with a probability that grows with the variant's index, a jittered box (less jitter for a better
variant) scored in [0.3, 1] and up to two looser duplicates scored lower; then random false
positives scored in [0, 0.6] until the image has 100 detections: 50,000 per run. Each run's
matches come from ``experiments.matches.compute_matches`` (one COCOeval each; not timed).
With ``--grid``, the done runs' ``eval_matches.npz`` of a real grid are read instead (timed: the
bootstrap includes reading them), versus ``--baseline`` (default: grid.json's, else the first variant).

Timed, interleaved: ``bootstrap``, the paired bootstrap of every variant versus the first
(``analysis.bootstrap.paired_bootstrap``: the weighted AP of all 21 runs under ``--resamples``
image multisets, the seed resampling and the percentiles), and ``cocoeval``, one bbox COCOeval
``evaluate()`` + ``accumulate()`` of one synthetic run. Printed: seconds of each (target: bootstrap
<= 60 s), their ratio, and the largest |full-data AP from the matches - COCOeval's AP| over the
runs whose COCOeval is run here (should be ~1e-14).
"""

from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from analysis.bootstrap import N_RESAMPLES, WeightedAP, grid_deltas, paired_bootstrap
from analysis.runs import load_runs, variant_order
from benchmarks.common import Report, describe_machine, median_ratio, parse_args, setup_device, time_interleaved
from experiments.matches import compute_matches
from experiments.runfiles import read_grid_file

NUM_VARIANTS, NUM_SEEDS = 7, 3
IMAGE_SIZE, NUM_CATEGORIES, DETECTIONS_PER_IMAGE = 128, 10, 100


def digits_like_gt(num_images: int, seed: int = 0) -> COCO:
    """A GT set shaped like the digits val set (module docstring)."""
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "width": IMAGE_SIZE, "height": IMAGE_SIZE} for i in range(num_images)]
    annotations = []
    for image in images:
        for _ in range(int(rng.integers(1, 6))):
            side = float(np.exp(rng.uniform(np.log(12), np.log(64))))
            aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
            w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
            x, y = rng.uniform(0, IMAGE_SIZE - w), rng.uniform(0, IMAGE_SIZE - h)
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"], "bbox": [x, y, w, h],
                                "category_id": int(rng.integers(1, NUM_CATEGORIES + 1)), "area": w * h, "iscrowd": 0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": c, "name": str(c - 1)} for c in range(1, NUM_CATEGORIES + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def run_detections(coco_gt: COCO, variant: int, seed: int) -> list[dict]:
    """One run's COCO results: ``DETECTIONS_PER_IMAGE`` per image (module docstring)."""
    rng = np.random.default_rng([variant, seed])
    recall, spread = 0.6 + 0.05 * variant, 0.15 - 0.012 * variant
    results = []

    def add(image_id: int, category_id: int, box, score: float) -> None:
        results.append({"image_id": image_id, "category_id": category_id,
                        "bbox": [round(float(v), 2) for v in box], "score": round(float(score), 4)})

    for image_id in sorted(coco_gt.imgs):
        start = len(results)
        for annotation in coco_gt.imgToAnns[image_id]:
            if rng.random() > recall:
                continue
            x, y, w, h = annotation["bbox"]
            score = rng.uniform(0.3, 1.0)
            for copy_index in range(1 + int(rng.integers(0, 3))):
                jitter = rng.normal(0.0, spread * (1 + copy_index), 4)
                box = [x + jitter[0] * w, y + jitter[1] * h, w * np.exp(jitter[2]), h * np.exp(jitter[3])]
                add(image_id, annotation["category_id"], box, score * (1.0 if copy_index == 0 else rng.uniform(0.3, 0.9)))
        while len(results) - start < DETECTIONS_PER_IMAGE:
            w, h = rng.uniform(4, IMAGE_SIZE / 2, 2)
            box = [rng.uniform(0, IMAGE_SIZE - w), rng.uniform(0, IMAGE_SIZE - h), w, h]
            add(image_id, int(rng.integers(1, NUM_CATEGORIES + 1)), box, rng.uniform(0.0, 0.6))
        del results[start + DETECTIONS_PER_IMAGE:]
    return results


def cocoeval_ap(coco_gt: COCO, coco_dt: COCO) -> float:
    """bbox COCOeval evaluate() + accumulate(); returns AP (percent) as summarize() would."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # area "all", maxDets 100: stats[0]
    return float(np.mean(precision[precision > -1])) * 100.0


def main() -> None:
    def add_arguments(parser) -> None:
        parser.add_argument("--resamples", type=int, default=N_RESAMPLES, help="bootstrap resamples")
        parser.add_argument("--grid", type=Path, default=None, help="a real grid's results directory instead")
        parser.add_argument("--baseline", default=None, help="with --grid: the baseline variant (default: first)")

    args = parse_args(__doc__.splitlines()[0], default_reps=1, default_warmup=0, add_arguments=add_arguments)
    device = setup_device(args)
    print(describe_machine(device, args.threads), f"numpy {np.__version__} (the bootstrap runs on the CPU)", flush=True)
    num_images = 40 if args.tiny else 500
    coco_gt = digits_like_gt(num_images)
    variants = [f"v{v}" for v in range(NUM_VARIANTS)]
    start = time.perf_counter()
    grid_runs = [(v, s) for v in range(NUM_VARIANTS) for s in range(NUM_SEEDS)] if args.grid is None else [(0, 0)]
    detections = {run: run_detections(coco_gt, *run) for run in grid_runs}
    with contextlib.redirect_stdout(io.StringIO()):
        timed_dt = coco_gt.loadRes(copy.deepcopy(detections[0, 0]))
    if args.grid is None:
        grid = {variants[v]: {s: compute_matches(coco_gt, detections[v, s]) for s in range(NUM_SEEDS)}
                for v in range(NUM_VARIANTS)}
        num_dets = statistics.mean(len(r) for r in detections.values())
        section = f"{num_images}img"
        print(f"  boot {section}: {NUM_VARIANTS} variants x {NUM_SEEDS} seeds, {len(coco_gt.anns)} GT, "
              f"{num_dets:.0f} detections per run; matches built in {time.perf_counter() - start:.1f} s", flush=True)

        def bootstrap():
            return paired_bootstrap(grid, variants[0], n_resamples=args.resamples)
    else:
        runs = load_runs(args.grid)
        order = variant_order(args.grid, {r.variant for r in runs})
        baseline = args.baseline or read_grid_file(args.grid)["baseline"] or order[0]
        section = args.grid.name
        print(f"  boot {section}: {len(runs)} runs of {len(order)} variants, baseline {baseline}", flush=True)

        def bootstrap():
            return grid_deltas(runs, baseline, n_resamples=args.resamples)

    last: dict[str, dict] = {}  # the deltas of the latest timed call, printed below

    def timed_bootstrap() -> None:
        last["deltas"] = bootstrap()

    cases = {"bootstrap": timed_bootstrap, "cocoeval": lambda: cocoeval_ap(coco_gt, timed_dt)}
    seconds = time_interleaved(cases, reps=args.reps, warmup=args.warmup, device=device)
    report = Report("boot", device, args.threads)
    deltas = last["deltas"]
    report.ratio(section, f"paired bootstrap s ({args.resamples} resamples)", statistics.median(seconds["bootstrap"]),
                 "" if args.tiny else "<= 60", unit="s")
    report.figure(section, "COCOeval evaluate+accumulate s (1 run)", statistics.median(seconds["cocoeval"]), "s")
    report.ratio(section, "bootstrap / one COCOeval", median_ratio(seconds["bootstrap"], seconds["cocoeval"]))
    for variant, delta in deltas.items():
        print(f"  boot {section}: {variant} - {delta.baseline}: {delta.delta_AP:+.2f} AP "
              f"[{delta.ci_low:+.2f}, {delta.ci_high:+.2f}] over {delta.n_seeds} seeds x {delta.n_images} images",
              flush=True)
    if args.grid is None:
        checked = [(0, 0), (NUM_VARIANTS - 1, NUM_SEEDS - 1)]
        largest = 0.0
        for v, s in checked:
            ones = np.ones((1, num_images), dtype=np.int64)
            with contextlib.redirect_stdout(io.StringIO()):
                coco_dt = coco_gt.loadRes(copy.deepcopy(detections[v, s]))
            largest = max(largest, abs(WeightedAP(grid[variants[v]][s])(ones)[0] - cocoeval_ap(coco_gt, coco_dt)))
        report.ratio(section, "largest |AP(matches) - COCOeval AP|", largest, "<= 1e-9", unit="AP")
    report.write_csv(args.out_dir)


if __name__ == "__main__":
    main()
