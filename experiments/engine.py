"""Training and evaluation engine: one run of one variant, resumable and crash-safe.

The engine turns a resolved config into ``results/<grid>/<run>/{config.yaml, metrics.json,
stats.csv}`` (ARCHITECTURE.md, results contract). It owns the optimiser, the schedule,
checkpoints, distributed setup and the statistics; the detector, assigner and scorer are
built from plain arguments and know nothing of configs.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
import random
import resource
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from .runfiles import StatsWriter, atomic_write_bytes, atomic_write_text, read_metrics, write_metrics

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training met a NaN/Inf loss; the message names the iteration and the loss terms."""


class NonFiniteWeightsError(NonFiniteLossError):
    """An optimiser step with a finite loss left NaN/Inf in the model; the message names the tensors.

    Checked before every evaluation and checkpoint, so a diverged model is never scored as a result
    nor saved over the last good checkpoint.
    """


class RunInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived; a checkpoint was written and the run can be resumed."""


class ConfigError(ValueError):
    """A config value is out of range; raised before any data is built or any step is trained.

    The message names the config key and what its valid values are.
    """


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def select_device(name: str, dist_info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for, but CUDA is not available")
        return torch.device("cuda", dist_info.local_rank)
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_optimizer(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float, bias_lr_factor: float):
    """SGD as in maskrcnn-benchmark (ATSS/PAA): biases get ``bias_lr_factor`` x LR and no weight decay."""
    weights, biases = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (biases if name.endswith(".bias") else weights).append(p)
    groups = [
        {"params": weights, "lr": lr, "weight_decay": weight_decay},
        {"params": biases, "lr": lr * bias_lr_factor, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def lr_factor(it: int, warmup_iters: int, warmup_factor: float, steps: list[int], gamma: float) -> float:
    """Constant warmup at ``warmup_factor`` for the first iterations, then step decay by ``gamma``."""
    factor = warmup_factor if it < warmup_iters else 1.0
    return factor * gamma ** bisect.bisect_right(sorted(steps), it)


def infinite_batches(loader, sampler_seed: int) -> Iterator:
    """Cycle a DataLoader forever; each pass reshuffles with a distinct seed."""
    epoch = 0
    while True:
        sampler = loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(sampler_seed + epoch)
        elif hasattr(loader, "generator") and loader.generator is not None:
            loader.generator.manual_seed(sampler_seed + epoch)
        yield from loader
        epoch += 1


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ----------------------------------------------------------------------------- run


@dataclasses.dataclass
class RunPaths:
    run_dir: Path

    @property
    def config(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.json"

    @property
    def stats(self) -> Path:
        return self.run_dir / "stats.csv"

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "last.pt"

    @property
    def detections(self) -> Path:
        return self.run_dir / "detections.json"

    @property
    def snapshots(self) -> Path:
        return self.run_dir / "assignments.npz"


def base_metrics(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    return {
        "status": None,
        "error": None,
        "AP": None,
        "AP50": None,
        "AP75": None,
        "APs": None,
        "APm": None,
        "APl": None,
        "iou_pred_error": None,
        "iters": 0,
        "train_seconds": 0.0,
        "images_per_second": None,
        "peak_memory_mb": None,
        "seed": int(cfg.seed),
        "assigner": str(cfg.assigner.name),
        "scorer": str(cfg.scorer.name),
        "overrides": list(overrides),
        "ap_curve": [],
    }


def record_failure(paths: RunPaths, cfg: DictConfig, overrides: list[str], error: str, **extra: Any) -> None:
    """Mark the run failed in ``metrics.json`` without touching its checkpoint or stats."""
    metrics = base_metrics(cfg, overrides)
    metrics.update(extra)
    metrics["status"] = "failed"
    metrics["error"] = error
    write_metrics(paths.metrics, metrics)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between iterations."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not in the main thread (e.g. a launcher's worker thread)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave SIGINT/SIGTERM to the main process.

    A Ctrl-C, or a SIGTERM sent to the whole process group (``kill -- -PGID``, SLURM's
    ``scancel``, ``docker stop``), reaches the data workers too. Left at their defaults, the
    workers die and the main process fails with "DataLoader worker ... killed by signal" before
    it can write its checkpoint. Ignoring the signals here lets the main process finish the
    iteration, checkpoint and exit (``_StopFlag``); it shuts the workers down as it exits, and a
    worker whose parent died exits by itself (torch's worker watchdog).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _worker_context(num_workers: int):
    """Data workers fork on Linux, also inside a launcher's worker (joblib/loky replaces the
    default start method there, and its processes cannot start DataLoader workers)."""
    if num_workers > 0 and sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return None


def _instantiate(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, turning the constructor's ValueError into a ConfigError naming ``key``.

    Hydra wraps every constructor error in an InstantiationException; unwrapping the ValueError
    keeps the recorded message to what the constructor said (e.g. "topk must be a positive int").
    """
    import hydra.utils
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, ValueError):
            raise ConfigError(f"{key}: {exc.__cause__}") from exc.__cause__
        raise


def _check_finite_state(model: torch.nn.Module, it: int) -> None:
    """Raise NonFiniteWeightsError unless every float weight and buffer of ``model`` is finite."""
    tensors = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
    if not tensors:
        return
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()  # one device sync
    bad = [name for name, ok in zip(tensors, finite) if not ok]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteWeightsError(f"non-finite weights after iteration {it}: {', '.join(bad[:5])}{more}")


def _outputs_to_float(out):
    """Autocast leaves head outputs in bf16; losses and assignment run in float32."""
    changes = {}
    for f in ("cls_logits", "box_deltas", "quality"):
        v = getattr(out, f, None)
        if v is not None and v.dtype != torch.float32:
            changes[f] = v.float()
    return dataclasses.replace(out, **changes) if changes else out


def train_run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train and evaluate one run; returns its metrics (also written to ``metrics.json``).

    Raises NonFiniteLossError / RunInterrupted / any build error to the caller, which records
    the failure; a checkpoint written before the fault stays in place. Config values out of range
    (assigner parameters, scorer name, batch size, iterations) raise ConfigError before any data
    is generated or loaded.
    """
    import assigners  # noqa: F401  (imported for the registry behind cfg.assigner._target_)
    from detector import DetectionLoss, build_scorer
    from experiments.data import build_dataset, collate

    from .evaluation import coco_evaluate, run_inference, summarize_ap

    overrides = list(overrides or [])
    paths = RunPaths(Path(run_dir))
    dist_info = setup_distributed()
    device = select_device(str(cfg.device), dist_info)
    seed_everything(int(cfg.seed) + dist_info.rank)
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))

    sched = cfg.schedule
    total_batch = int(sched.batch_size)
    if total_batch % dist_info.world_size:
        raise ConfigError(
            f"schedule.batch_size={total_batch} is not divisible by the {dist_info.world_size} processes"
        )
    local_batch = total_batch // dist_info.world_size
    iters = int(sched.iters)
    if iters <= 0:
        raise ConfigError(f"schedule.iters must be > 0, got {iters}")

    # ---- build everything before training, so config and data errors fail fast
    assigner = _instantiate(cfg.assigner, "assigner")
    try:
        scorer = build_scorer(str(cfg.scorer.name))
    except ValueError as exc:
        raise ConfigError(f"scorer.name: {exc}") from exc
    data = cfg.data
    digits_params = OmegaConf.to_container(data.digits, resolve=True) if "digits" in data else None
    common = dict(root=data.root, digits_params=digits_params)
    train_set = build_dataset(
        data.name, data.train_split, train=True, min_size=OmegaConf.to_object(sched.min_size)
        if OmegaConf.is_list(sched.min_size) else sched.min_size,
        max_size=sched.max_size, flip_prob=data.flip_prob, **common,
    )
    val_set = build_dataset(
        data.name, data.val_split, train=False, min_size=sched.test_min_size, max_size=sched.max_size,
        flip_prob=0.0, **common,
    )
    for ds in (train_set, val_set):
        if hasattr(ds, "validate"):
            ds.validate()
    if cfg.eval.max_images:
        val_set = torch.utils.data.Subset(val_set, range(min(int(cfg.eval.max_images), len(val_set))))
    val_base = val_set.dataset if isinstance(val_set, torch.utils.data.Subset) else val_set

    model = _instantiate(
        cfg.model, "model", num_classes=train_set.num_classes, use_quality=scorer.uses_quality_branch
    ).to(device)
    loss_cfg = cfg.scorer.loss
    criterion = DetectionLoss(
        assigner,
        scorer,
        train_set.num_classes,
        cls_weight=float(loss_cfg.cls_weight),
        box_weight=float(loss_cfg.box_weight),
        quality_weight=float(loss_cfg.quality_weight),
    )
    lr = float(sched.base_lr) * total_batch / 16.0
    optimizer = build_optimizer(model, lr, float(sched.momentum), float(sched.weight_decay), float(sched.bias_lr_factor))
    steps = [int(round(s * iters)) if isinstance(s, float) and s <= 1.0 else int(s) for s in sched.steps]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda it: lr_factor(it, int(sched.warmup_iters), float(sched.warmup_factor), steps, float(sched.gamma)),
    )
    eval_iters = sorted({max(1, int(round(f * iters))) for f in cfg.eval.curve_fractions} | {iters})

    # ---- resume
    start_iter, train_seconds, ap_curve = 0, 0.0, []
    ckpt = load_checkpoint(paths.checkpoint)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_iter = int(ckpt["iter"])
        train_seconds = float(ckpt["train_seconds"])
        ap_curve = [list(p) for p in ckpt["ap_curve"]]
        if dist_info.is_main:
            print(f"[assignbench] resuming {paths.run_dir} from iteration {start_iter}")

    train_model = model
    if dist_info.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    if dist_info.world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(train_set, shuffle=True, seed=int(cfg.seed))
        generator = None
    else:
        generator = torch.Generator().manual_seed(int(cfg.seed) + start_iter)
        sampler = torch.utils.data.RandomSampler(train_set, generator=generator)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=local_batch,
        sampler=sampler,
        num_workers=int(data.num_workers),
        collate_fn=collate,
        drop_last=True,
        persistent_workers=int(data.num_workers) > 0,
        generator=generator,
        worker_init_fn=_ignore_stop_signals,
        multiprocessing_context=_worker_context(int(data.num_workers)),
    )
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=int(cfg.eval.batch_size), shuffle=False, num_workers=int(data.num_workers),
        collate_fn=collate, worker_init_fn=_ignore_stop_signals,
        multiprocessing_context=_worker_context(int(data.num_workers)),
    )
    autocast_dtype = torch.bfloat16 if (device.type == "cuda" and cfg.get("amp", True)) else None
    inference_cfg = dict(OmegaConf.to_container(cfg.inference, resolve=True))

    stats = StatsWriter(paths.stats, resume_iter=start_iter) if dist_info.is_main else None
    log_every = max(1, int(sched.log_every))
    window: dict[str, list[float]] = {}
    window_seconds = 0.0
    batches = infinite_batches(loader, int(cfg.seed) * 100003 + start_iter)

    last_results: list[dict] = []

    def evaluate() -> tuple[dict[str, float], float | None]:
        results, iou_err = run_inference(
            model, val_loader, device, scorer, inference_cfg, val_base.label_to_category_id, autocast_dtype
        )
        if dist_info.world_size > 1:  # every process evaluated the full val set; rank 0 scores it
            dist.barrier()
        last_results[:] = results
        return coco_evaluate(val_base.coco, results, str(cfg.eval.backend)), iou_err

    def checkpoint(it: int) -> None:
        if dist_info.is_main:
            save_checkpoint(
                paths.checkpoint,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "iter": it,
                    "train_seconds": train_seconds,
                    "ap_curve": ap_curve,
                },
            )
        if dist_info.world_size > 1:
            dist.barrier()

    progress = None
    if dist_info.is_main and cfg.get("progress", True):
        from tqdm import tqdm

        progress = tqdm(total=iters, initial=start_iter, desc=paths.run_dir.name, dynamic_ncols=True, leave=False)

    final_ap: dict[str, float] | None = None
    iou_err: float | None = None
    it = start_iter
    # With a progress bar, console log lines are written above it (the log file is unaffected).
    redirect = contextlib.nullcontext()
    if progress is not None:
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm()
    try:
        with _StopFlag() as stop, redirect:
            model.train()
            while it < iters:
                t0 = time.perf_counter()
                images, targets = next(batches)
                images = images.to(device, non_blocking=True)
                targets = [
                    {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets
                ]
                ctx = (
                    torch.autocast(device_type=device.type, dtype=autocast_dtype)
                    if autocast_dtype is not None
                    else contextlib.nullcontext()
                )
                with ctx:
                    out = train_model(images)
                losses, info = criterion(_outputs_to_float(out), targets)
                total = sum(losses.values())
                if not torch.isfinite(total):
                    terms = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items())
                    raise NonFiniteLossError(f"non-finite loss at iteration {it + 1}: {terms}")
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                scheduler.step()
                it += 1
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                step_seconds = time.perf_counter() - t0
                train_seconds += step_seconds

                row = {k: float(v.detach()) for k, v in losses.items()}
                row.update({k: float(info[k]) for k in (
                    "num_gt", "num_pos", "pos_per_gt_mean", "pos_per_gt_std", "pos_iou_mean",
                    "gt_without_pos", "assign_ms")})
                for k, v in row.items():
                    window.setdefault(k, []).append(v)
                window_seconds += step_seconds
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{float(total.detach()):.3f}", ips=f"{total_batch / step_seconds:.1f}")
                if it % log_every == 0 or it == iters:
                    if stats is not None:
                        means = {k: float(np.mean(v)) for k, v in window.items()}
                        stats.write({"iter": it, **means})
                        # the bar shows progress when there is one; the log (train.log) gets a line anyway
                        log.log(logging.DEBUG if progress is not None else logging.INFO,
                                "iter %d/%d  loss %.4f (%s)  pos/GT %.2f  GT without pos %g  %.1f img/s",
                                it, iters, sum(means[k] for k in losses), "  ".join(
                                    f"{k.removeprefix('loss_')} {means[k]:.4f}" for k in losses),
                                means["pos_per_gt_mean"], means["gt_without_pos"],
                                len(window["num_gt"]) * total_batch / window_seconds)
                    window.clear()
                    window_seconds = 0.0

                if it in eval_iters or it % int(sched.checkpoint_every) == 0 or stop.signum is not None:
                    _check_finite_state(model, it)  # never score or checkpoint a diverged model
                if it in eval_iters:
                    ap, iou_err = evaluate()
                    ap_curve.append([it, ap["AP"]])
                    if dist_info.is_main:
                        log.info("[%s] iter %d: %s", paths.run_dir.name, it, summarize_ap(ap))
                    if it == iters:
                        final_ap = ap
                    if cfg.eval.snapshots:
                        _record_snapshot(paths.snapshots, model, assigner, val_base, device, it, autocast_dtype)
                    checkpoint(it)
                elif it % int(sched.checkpoint_every) == 0:
                    checkpoint(it)
                if stop.signum is not None and it < iters:
                    checkpoint(it)
                    raise RunInterrupted(
                        f"signal {signal.Signals(stop.signum).name} at iteration {it}; checkpoint written, rerun to resume"
                    )
    finally:
        if progress is not None:
            progress.close()
        if stats is not None:
            stats.close()

    if final_ap is None:  # resumed exactly at the end: the last checkpoint was taken after the final eval
        final_ap, iou_err = evaluate()
    metrics = base_metrics(cfg, overrides)
    metrics.update(final_ap)
    metrics.update(
        status="done",
        iou_pred_error=iou_err if iou_err is None or math.isfinite(iou_err) else None,
        iters=it,
        train_seconds=round(train_seconds, 3),
        images_per_second=round(it * total_batch / train_seconds, 3) if train_seconds > 0 else None,
        peak_memory_mb=round(peak_memory_mb(device), 1),
        ap_curve=ap_curve,
    )
    if dist_info.is_main:
        # The final detections as COCO results, so any COCO tool can re-score them.
        atomic_write_text(paths.detections, json.dumps(last_results))
        write_metrics(paths.metrics, metrics)
    return metrics


@torch.no_grad()
def _record_snapshot(path: Path, model, assigner, val_set, device, it: int, autocast_dtype) -> None:
    """Store the assignment of a fixed val image (index 0) at this iteration, for Fig. 4a-style plots.

    The file holds, per recorded iteration, ``gt_index_<iter>`` (A,) next to the image's
    ``anchors`` (A, 4), ``gt_boxes`` (G, 4) and ``image`` (H, W, 3) uint8.
    """
    from assigners import AssignInputs
    from detector import pad_targets
    from experiments.data import collate

    image, target = val_set[0]
    was_training = model.training
    model.eval()
    # The loader's own padding, to the model's largest stride so every level's stride is exact.
    batch = collate([(image, target)], size_divisibility=model.size_divisibility)[0].to(device)
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with ctx:
        out = model(batch)
    out = _outputs_to_float(out)
    gt_boxes, gt_labels, gt_mask = pad_targets([{k: v.to(device) if torch.is_tensor(v) else v
                                                 for k, v in target.items()}], device)
    pred = model.decode(out)
    assignment = assigner(
        AssignInputs(
            anchors=out.anchors,
            num_anchors_per_level=out.num_anchors_per_level,
            gt_boxes=gt_boxes,
            gt_labels=gt_labels,
            gt_mask=gt_mask,
            cls_logits=out.cls_logits.detach(),
            pred_boxes=pred.detach(),
        )
    )
    if was_training:
        model.train()
    arrays: dict[str, np.ndarray] = {}
    if path.exists():
        with np.load(path) as old:
            arrays = {k: old[k] for k in old.files}
    arrays["anchors"] = out.anchors.cpu().numpy()
    arrays["num_anchors_per_level"] = np.asarray(out.num_anchors_per_level)
    arrays["gt_boxes"] = target["boxes"].cpu().numpy()
    arrays["image"] = (image.permute(1, 2, 0).clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
    arrays[f"gt_index_{it}"] = assignment.gt_index[0].cpu().numpy()
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def write_resolved_config(paths: RunPaths, cfg: DictConfig) -> None:
    atomic_write_text(paths.config, OmegaConf.to_yaml(cfg, resolve=True))


def run_is_done(paths: RunPaths) -> bool:
    m = read_metrics(paths.metrics)
    return bool(m and m.get("status") == "done")
