"""COCO evaluation time: pycocotools against faster-coco-eval on the same detections, side by side; and
the evaluation of a run sharded over 2 processes against one process.

    python -m benchmarks.eval [--reps N] [--threads N] [--eval-images N]

The detections are the digits val set's GT jittered, seeded: per GT, a detection of its class
with a box moved and rescaled by a few percent of its size (a few by much more) and a score in
[0.3, 1]; per image, a few false positives (random boxes, random classes, scores in [0, 0.6])
and duplicates of some true ones with lower scores. Both backends run
``experiments.evaluation.coco_evaluate`` on them; printed are the median time of each, the
speed-up and the largest difference between their six AP numbers (which should be 0; an AP that
is undefined, for an area range without GT, must be undefined for both).
COCOeval runs on the CPU, so ``--device`` only names where the figures were taken.

Sharded evaluation (``shards``): a run's whole evaluation (``experiments.engine.make_evaluator``:
inference over the first ``--eval-images`` digits val images in batches of 8, then COCOeval) with one
process, and with 2 processes on the CPU over gloo (torch.multiprocessing, ``--threads`` each), each
inferring its shard, rank 0 gathering and scoring. Both run in the same 2 processes, in turns: rank 0
alone evaluates the whole set while rank 1 waits at a barrier, then both evaluate it sharded. The
model is the cpu_r18 preset, random-init (seeded) with score threshold 0, so every image keeps its
``max_det`` (100) detections, as a trained model's do at the default threshold. Printed: the median
time of each, the median of the per-round 2-process/1-process ratio (ideal 0.5; it also pays for the
unsharded COCOeval and the gather), and whether the two wrote the same detections. CPU only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

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


SHARD_OVERRIDES = ["data=digits", "model=cpu_r18", "schedule=quick", "eval.batch_size=8", "eval.snapshots=false",
                   "inference.score_thresh=0.0", "data.num_workers=0", "progress=false"]


def _shard_worker(rank: int, world: int, workdir: Path, overrides: list[str], reps: int, warmup: int,
                  threads: int) -> None:
    """One of the ``world`` processes of the sharded-evaluation timing (module docstring); rank 0 writes
    ``workdir/seconds.json``: the seconds of each round, one process and sharded, and whether the
    detections were the same."""
    import torch.distributed as dist
    from hydra import compose, initialize_config_module

    from experiments import engine
    from experiments.distributed import DistInfo

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{workdir / 'init'}", rank=rank, world_size=world)
    try:
        with initialize_config_module("experiments.conf", version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"results_root={workdir / 'results'}",
                                               f"num_threads={threads}"])
        run = engine.build_run(cfg, workdir / "run")
        weights = workdir / "weights.pt"
        if rank == 0:  # seed + rank seeds each process: every rank takes rank 0's weights
            torch.save(run.model.state_dict(), weights)
        dist.barrier()
        run.model.load_state_dict(torch.load(weights, weights_only=True))
        sharded = engine.make_evaluator(run)
        alone = engine.make_evaluator(dataclasses.replace(run, dist_info=DistInfo())) if rank == 0 else None
        seconds: dict[str, list[float]] = {"one": [], "sharded": []}
        same = True
        for round_index in range(warmup + reps):
            dist.barrier()
            if rank == 0:
                start = time.perf_counter()
                _, _, one_results = alone()
                one = time.perf_counter() - start
            dist.barrier()
            start = time.perf_counter()
            _, _, sharded_results = sharded()
            if rank == 0 and round_index >= warmup:
                seconds["one"].append(one)
                seconds["sharded"].append(time.perf_counter() - start)
                same = same and json.dumps(one_results) == json.dumps(sharded_results)
        if rank == 0:
            (workdir / "seconds.json").write_text(json.dumps({**seconds, "same": same,
                                                              "images": len(run.val_set)}))
    finally:
        dist.destroy_process_group()


def sharded_evaluation(report: Report, eval_images: int, reps: int, warmup: int, threads: int, tiny: bool) -> None:
    """The ``shards`` figures (module docstring)."""
    import torch.multiprocessing as mp

    digits = ["data.digits.num_train=16", "data.digits.num_val=4"] if tiny else []
    overrides = [*SHARD_OVERRIDES, f"eval.max_images={eval_images}", *digits]
    with tempfile.TemporaryDirectory(prefix="assignbench-eval-shards-") as tmp:
        workdir = Path(tmp)
        mp.spawn(_shard_worker, args=(2, workdir, overrides, reps, warmup, threads), nprocs=2, join=True)
        measured = json.loads((workdir / "seconds.json").read_text())
    section = "shards"
    print(f"  shards: {measured['images']} val images, 2 processes (gloo, CPU, {threads} thread(s) each) against 1",
          flush=True)
    report.figure(section, "1-process evaluation ms", statistics.median(measured["one"]) * 1e3, "ms")
    report.figure(section, "2-process evaluation ms", statistics.median(measured["sharded"]) * 1e3, "ms")
    report.ratio(section, "2-process/1-process evaluation time", median_ratio(measured["sharded"], measured["one"]))
    report.ratio(section, "same detections (1 = yes)", float(measured["same"]), ">= 1")

def main() -> None:
    args = parse_args(__doc__.splitlines()[0], default_reps=5, default_warmup=1, add_arguments=lambda parser: (
        parser.add_argument("--eval-images", type=int, default=96,
                            help="digits val images of the sharded-evaluation timing")))
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
    if device.type == "cpu":
        sharded_evaluation(report, args.eval_images, args.reps, args.warmup, args.threads, args.tiny)
    else:
        print("  shards: the sharded evaluation is timed on the CPU only (run without --device cuda)", flush=True)
    report.write_csv(args.out_dir)


if __name__ == "__main__":
    main()
