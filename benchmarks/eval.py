"""COCO evaluation time: pycocotools against faster-coco-eval on the same detections, side by side.

    python -m benchmarks.eval [--reps N] [--threads N]

The detections are the digits val set's GT jittered, seeded: per GT, a detection of its class
with a box moved and rescaled by a few percent of its size (a few by much more) and a score in
[0.3, 1]; per image, a few false positives (random boxes, random classes, scores in [0, 0.6])
and duplicates of some true ones with lower scores. Both backends run
``experiments.evaluation.coco_evaluate`` on them; printed are the median time of each, the
speed-up and the largest difference between their six AP numbers (which should be 0; an AP that
is undefined, for an area range without GT, must be undefined for both).
COCOeval runs on the CPU, so ``--device`` only names where the figures were taken.
"""

from __future__ import annotations

import numpy as np

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
from experiments.evaluation import AP_NAMES, coco_evaluate

BACKENDS = ("pycocotools", "faster")


def jittered_detections(coco_gt, seed: int = 0) -> list[dict]:
    """COCO results-format detections near the GT of ``coco_gt`` (module docstring)."""
    rng = np.random.default_rng(seed)
    category_ids = sorted(coco_gt.cats)
    results = []
    for image_id in sorted(coco_gt.imgs):
        image = coco_gt.imgs[image_id]
        width, height = image["width"], image["height"]
        annotations = coco_gt.imgToAnns.get(image_id, [])
        for annotation in annotations:
            x, y, w, h = annotation["bbox"]
            spread = 0.05 if rng.random() < 0.85 else 0.4
            cx, cy = x + w / 2 + rng.normal(0, spread) * w, y + h / 2 + rng.normal(0, spread) * h
            w, h = w * np.exp(rng.normal(0, spread)), h * np.exp(rng.normal(0, spread))
            box = [cx - w / 2, cy - h / 2, w, h]
            score = rng.uniform(0.3, 1.0)
            results.append(_result(image_id, annotation["category_id"], box, score))
            if rng.random() < 0.3:  # a duplicate, as NMS sometimes leaves
                results.append(_result(image_id, annotation["category_id"], box, score * rng.uniform(0.2, 0.9)))
        for _ in range(int(rng.integers(2, 8))):  # false positives
            w, h = rng.uniform(4, width / 2), rng.uniform(4, height / 2)
            box = [rng.uniform(0, width - w), rng.uniform(0, height - h), w, h]
            results.append(_result(image_id, int(rng.choice(category_ids)), box, rng.uniform(0.0, 0.6)))
    return results


def _result(image_id: int, category_id: int, box: list[float], score: float) -> dict:
    return {
        "image_id": int(image_id),
        "category_id": int(category_id),
        "bbox": [round(float(v), 3) for v in box],
        "score": round(float(score), 5),
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_reps=5, default_warmup=1)
    device = setup_device(args)
    print(describe_machine(device, args.threads), "(COCOeval itself runs on the CPU)", flush=True)
    from experiments.data import build_dataset

    params = {"num_train": 16, "num_val": 4} if args.tiny else None
    dataset = build_dataset("digits", "val", train=False, min_size=128, max_size=128, digits_params=params)
    coco_gt = dataset.coco
    results = jittered_detections(coco_gt)
    section = f"{len(coco_gt.imgs)}img"
    print(f"  eval {section}: {len(coco_gt.anns)} GT, {len(results)} detections", flush=True)

    cases = {backend: (lambda b=backend: coco_evaluate(coco_gt, results, backend=b)) for backend in BACKENDS}
    seconds = time_interleaved(cases, reps=args.reps, warmup=args.warmup, device=device)
    report = Report("eval", device, args.threads)
    for backend in BACKENDS:
        report.figure(section, f"{backend} ms", median_ms(seconds[backend]), "ms")
    for backend, call in cases.items():
        report.figure(section, f"{backend} peak memory", peak_memory_mb(call, device), "MiB")
    report.ratio(section, "pycocotools/faster time", median_ratio(seconds["pycocotools"], seconds["faster"]))
    ap = {backend: call() for backend, call in cases.items()}
    # An AP is None for an area range without GT (APl at 128 px); both backends must agree on that too.
    defined = [name for name in AP_NAMES if ap["pycocotools"][name] is not None]
    for name in defined:
        for backend in BACKENDS:
            report.figure(section, f"{name} {backend}", ap[backend][name], "AP")
    undefined = [name for name in AP_NAMES if name not in defined]
    same_undefined = all(ap["faster"][name] is None for name in undefined)
    if undefined:
        both = "both backends" if same_undefined else "pycocotools only"
        print(f"  eval {section}: {', '.join(undefined)} undefined (no GT in the area range) for {both}", flush=True)
    largest = max((abs(ap["pycocotools"][name] - ap["faster"][name]) for name in defined), default=0.0)
    report.ratio(section, "largest |AP difference|", largest if same_undefined else float("inf"), "<= 1e-9", unit="AP")
    report.write_csv(args.out_dir)


if __name__ == "__main__":
    main()
