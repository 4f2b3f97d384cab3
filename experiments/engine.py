"""One run of one variant: build it, train it with hooks, write its results (resumable, crash-safe).

``train_run`` turns a resolved config into ``<results_root>/<grid>/<run>/{config.yaml, metrics.json,
stats.csv, ...}`` (``experiments.runfiles``, the results contract). The pieces live one concern a
module: ``build`` (config -> components, data, optimiser), ``trainer`` (the step), ``hooks`` (every
periodic job), ``checkpoint``, ``distributed``, ``snapshots``, ``environment`` and ``errors``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import resource
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from . import hooks
from .build import (
    Budget,
    build_datasets,
    build_optimization,
    build_train_loader,
    check_budget,
    infinite_batches,
    instantiate,
    seed_everything,
)
from .checkpoint import load_checkpoint
from .distributed import (
    DistInfo,
    as_on_rank_zero,
    barrier,
    gather_in_order,
    select_device,
    setup_distributed,
    shard_batches,
)
from .environment import describe_environment
from .errors import ConfigError, NonFiniteLossError, NonFiniteWeightsError, RunInterrupted
from .loggers import LoggerHook, build_logger
from .matches import compute_matches, save_matches
from .runfiles import FAILED, RunPaths, StatsWriter, atomic_write_text, new_metrics, write_metrics
from .tide import tide_errors
from .trainer import Trainer, TrainState

__all__ = [
    "ConfigError",
    "NonFiniteLossError",
    "NonFiniteWeightsError",
    "RunInterrupted",
    "record_failure",
    "run_metrics",
    "train_run",
    "write_resolved_config",
]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def run_metrics(cfg: DictConfig, overrides: list[str], environment: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run's ``metrics.json`` before results: variant, seed, components, overrides, environment."""
    return new_metrics(
        variant=str(cfg.variant), variant_id=str(cfg.variant_id), seed=int(cfg.seed),
        assigner=str(cfg.assigner.name), scorer=str(cfg.scorer.name), overrides=overrides, environment=environment,
    )


def record_failure(paths: RunPaths, cfg: DictConfig, overrides: list[str], error: str) -> None:
    """Mark the run failed in ``metrics.json`` without touching its checkpoint or stats."""
    metrics = run_metrics(cfg, overrides)
    metrics.update(status=FAILED, error=error)
    write_metrics(paths.metrics, metrics)


def write_resolved_config(paths: RunPaths, cfg: DictConfig) -> None:
    atomic_write_text(paths.config, OmegaConf.to_yaml(cfg, resolve=True))


@dataclasses.dataclass
class Run:
    """Everything built for one run before its first step."""

    cfg: DictConfig
    paths: RunPaths
    dist_info: DistInfo
    device: torch.device
    budget: Budget
    assigner: Any
    scorer: Any
    model: torch.nn.Module
    criterion: Any
    train_set: Any
    val_set: Any
    val_base: Any
    autocast_dtype: torch.dtype | None


def pretrained_weights(cfg: DictConfig, train_set) -> dict[str, str]:
    """``{"weights": <path>}`` for ``model.weights=digits`` (built on first use, ``experiments.pretrain``), else {}."""
    if str(cfg.model.get("weights")) != "digits":
        return {}
    if str(cfg.data.name) != "digits":
        raise ConfigError(f"model.weights=digits needs data=digits (got data={cfg.data.name})")
    from .pretrain import RECIPE, digits_backbone

    recipe = {**RECIPE, "arch": str(cfg.model.backbone)}
    return {"weights": str(digits_backbone(Path(train_set.ann_file).parent.parent, recipe))}


def build_run(cfg: DictConfig, run_dir: Path) -> Run:
    """Seed, validate and build components, data, model and loss; config and data errors fail here."""
    import assigners  # noqa: F401  (the registry behind cfg.assigner._target_)
    from detector import DetectionLoss, TwoStageDetector, TwoStageLoss

    dist_info = setup_distributed()
    device = select_device(str(cfg.device), dist_info)
    seed_everything(int(cfg.seed) + dist_info.rank)
    torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
    budget = check_budget(cfg, dist_info)
    if cfg.get("variant_prefix") == "rpn_" and "rpn_assigner" not in cfg.model:  # set by conf/rpn_assigner/*
        raise ConfigError(f"rpn_assigner is an RPN preset of a two-stage model; model={cfg.model._target_} has no RPN "
                          "(use model=faster_rcnn_r50 or model=faster_rcnn_cpu_r18)")
    assigner = instantiate(cfg.assigner, "assigner")
    scorer = instantiate(cfg.scorer, "scorer")
    train_set, val_set, val_base = build_datasets(cfg)
    model = instantiate(
        cfg.model, "model", num_classes=train_set.num_classes, use_quality=scorer.has_quality_branch,
        **pretrained_weights(cfg, train_set),
        **({"rpn_assigner": assigner} if "rpn_assigner" in cfg.model else {}),  # two-stage: the run's assigner itself
    ).to(device)
    if isinstance(model, TwoStageDetector):
        try:
            criterion = TwoStageLoss(model, scorer)
        except ValueError as exc:
            raise ConfigError(f"scorer: {exc}") from exc
    else:
        criterion = DetectionLoss(assigner, scorer, train_set.num_classes)
    autocast_dtype = torch.bfloat16 if (device.type == "cuda" and cfg.get("amp", True)) else None
    return Run(cfg, RunPaths(run_dir), dist_info, device, budget, assigner, scorer, model, criterion,
               train_set, val_set, val_base, autocast_dtype)


def make_evaluator(run: Run):
    """() -> (AP dict, IoU-prediction error or None, COCO results): the run's model on its val set now. For a
    two-stage model the AP dict also holds the recall of its proposals (AR100, AR1000; ``experiments.proposals``).

    Under torchrun the val set is sharded: each rank infers the batches ``shard_batches`` deals it (whole
    batches of ``eval.batch_size``, as one process cuts them), rank 0 gathers the per-image detections,
    puts them back in val-set order and scores them once, so the results equal one process's to the
    byte. Every rank gets the AP and the error (its AP curve stays the same); the results are rank 0's
    alone ([] on the other ranks, which write no files).
    """
    from detector import TwoStageDetector

    from .build import build_val_loader
    from .evaluation import coco_evaluate, combine_images, run_inference
    from .proposals import ProposalRecorder, proposal_recall

    inference_cfg = dict(OmegaConf.to_container(run.cfg.inference, resolve=True))
    backend = str(run.cfg.eval.backend)
    tta = inference_cfg.get("tta") or {}
    dist_info, size_divisibility = run.dist_info, run.model.size_divisibility
    positions = shard_batches(len(run.val_set), int(run.cfg.eval.batch_size), dist_info)
    shard = run.val_set if dist_info.world_size == 1 else torch.utils.data.Subset(run.val_set, positions)
    shard_loader = build_val_loader(shard, run.cfg, size_divisibility)
    # A two-stage model's proposals, kept during the inference pass for their recall (experiments.proposals).
    recorder = ProposalRecorder(run.model, run.val_base.label_to_category_id[0]) if (
        isinstance(run.model, TwoStageDetector) and not tta.get("enabled", False)) else None

    def infer():
        if not tta.get("enabled", False):
            model, loader = (recorder, recorder.watch(shard_loader)) if recorder else (run.model, shard_loader)
            return run_inference(model, loader, run.device, run.scorer, inference_cfg,
                                 run.val_base.label_to_category_id, run.autocast_dtype)
        from .tta import run_tta_inference

        sched = run.cfg.schedule
        return run_tta_inference(
            run.model, shard, lambda dataset: build_val_loader(dataset, run.cfg, size_divisibility),
            run.device, run.scorer, inference_cfg, (int(sched.test_min_size), int(sched.max_size)),
            run.val_base.label_to_category_id, run.autocast_dtype)

    def evaluate():
        images = gather_in_order(positions, infer(), dist_info)  # None on ranks other than 0
        proposals = gather_in_order(positions, recorder.take(), dist_info) if recorder else None
        results, ap, iou_err = [], None, None
        if dist_info.is_main:
            results, iou_err = combine_images(images, run.scorer.predicts_iou)
            ap = coco_evaluate(run.val_base.coco, results, backend)
            if proposals is not None:  # AR100, AR1000 beside the AP (runfiles.PROPOSAL_AR_NAMES)
                ap.update(proposal_recall(run.val_base.coco, [p for image in proposals for p in image], backend))
        ap, iou_err = as_on_rank_zero((ap, iou_err), dist_info)
        return ap, iou_err, results

    return evaluate


def make_hooks(run: Run, trainer_state: TrainState) -> tuple[list, hooks.EvalHook]:
    """The hooks of a run in their order (``experiments.hooks``), and its evaluation hook."""
    from .snapshots import record_snapshot

    cfg, paths, dist_info, budget = run.cfg, run.paths, run.dist_info, run.budget

    def snapshot(it: int) -> None:
        record_snapshot(paths.snapshots, run.model, run.assigner, run.val_base, run.device, it,
                        run.autocast_dtype, run.model.size_divisibility)

    sched, show_bar = cfg.schedule, dist_info.is_main and cfg.get("progress", True)
    writer = StatsWriter(paths.stats, resume_iter=trainer_state.iter) if dist_info.is_main else None
    checkpoint = hooks.CheckpointHook(paths.checkpoint, budget.eval_iters, int(sched.checkpoint_every),
                                      dist_info.is_main, lambda: barrier(dist_info))
    stop = hooks.StopSignalHook(checkpoint.save, deadline=float(cfg.deadline) if cfg.get("deadline") else None)
    evaluation = hooks.EvalHook(make_evaluator(run), budget.eval_iters, paths.run_dir.name,
                                dist_info.is_main)
    stats = hooks.StatsHook(writer, int(sched.log_every), budget.total_batch, quiet=show_bar)
    snapshots = paths.snapshots if cfg.eval.snapshots and dist_info.is_main else None  # rank 0 writes files
    logger = build_logger(str(cfg.get("logger", "none")), paths.run_dir) if dist_info.is_main else None
    chain = [hooks.AssignerIterationHook(run.assigner)]
    chain += [hooks.ProgressHook(paths.run_dir.name, budget.total_batch)] if show_bar else []
    chain += [
        stats,
        hooks.FiniteWeightsHook(budget.eval_iters, int(sched.checkpoint_every), stop),
        evaluation,
        *([hooks.SnapshotHook(snapshot, budget.eval_iters)] if snapshots is not None else []),
        *([LoggerHook(logger, stats, evaluation, snapshots)] if logger is not None else []),
        checkpoint,
        stop,
    ]
    return chain, evaluation


def resume_state(run: Run, optimizer, scheduler) -> TrainState:
    """Load ``checkpoints/last.pt`` into model, optimiser and schedule when there is one."""
    state = TrainState(iter=0, max_iter=run.budget.iters)
    ckpt = load_checkpoint(run.paths.checkpoint)
    if ckpt is not None:
        run.model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        state.iter, state.train_seconds = int(ckpt["iter"]), float(ckpt["train_seconds"])
        state.ap_curve = [list(p) for p in ckpt["ap_curve"]]
        if run.dist_info.is_main:
            print(f"[assignbench] resuming {run.paths.run_dir} from iteration {state.iter}")
    return state


def train_run(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train and evaluate one run; returns its metrics (also written to ``metrics.json``).

    Raises NonFiniteLossError / RunInterrupted / any build error to the caller, which records
    the failure; a checkpoint written before the fault stays in place. Config values out of range
    raise ConfigError before any data is generated or loaded.
    """
    run = build_run(cfg, Path(run_dir))
    optimizer, scheduler = build_optimization(run.model, cfg.schedule, run.budget)
    state = resume_state(run, optimizer, scheduler)
    train_model = run.model
    if run.dist_info.world_size > 1:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(run.model, device_ids=device_ids)
    loader = build_train_loader(run.train_set, cfg, run.budget, run.dist_info, state.iter,
                                size_divisibility=run.model.size_divisibility, device=run.device)
    batches = infinite_batches(loader, int(cfg.seed) * 100003 + state.iter)
    chain, evaluation = make_hooks(run, state)
    # On a GPU the host waits for the device only on logged iterations (Trainer.sync_every).
    sync_every = int(cfg.schedule.log_every) if run.device.type == "cuda" else 1
    trainer = Trainer(run.model, train_model, run.criterion, optimizer, scheduler, batches, run.device, state,
                      run.autocast_dtype, chain, sync_every=sync_every)
    try:
        trainer.train()
        if state.final_ap is None:  # resumed exactly at the end: the last checkpoint was taken after the final eval
            state.final_ap = evaluation.run()
    finally:
        # Stop the data workers now: a suspended loader iterator left to interpreter exit can hang it.
        batches.close()
    return finish_run(run, state, list(overrides or []))


def finish_run(run: Run, state: TrainState, overrides: list[str], **extra: Any) -> dict[str, Any]:
    """The run's ``metrics.json`` (its fields, then ``extra``), ``detections.json`` and
    ``eval_matches.npz`` (rank 0 writes them); returns the metrics."""
    ann_files = [run.train_set.ann_file, run.val_base.ann_file]
    metrics = run_metrics(run.cfg, overrides, describe_environment(run.device, ann_files, run.dist_info.world_size))
    metrics.update(state.final_ap)
    iou_err = state.iou_pred_error
    metrics.update(
        status="done",
        iou_pred_error=iou_err if iou_err is None or math.isfinite(iou_err) else None,
        iters=state.iter,
        train_seconds=round(state.train_seconds, 3),
        images_per_second=round(state.iter * run.budget.total_batch / state.train_seconds, 3)
        if state.train_seconds > 0 else None,
        peak_memory_mb=round(peak_memory_mb(run.device), 1),
        ap_curve=state.ap_curve,
    )
    metrics.update(extra)
    if run.dist_info.is_main:
        # What the AP lost went to, by error type (TIDE), from the same final detections.
        metrics["errors"] = tide_errors(run.val_base.coco, state.last_results)
        # The final detections as COCO results, so any COCO tool can re-score them.
        atomic_write_text(run.paths.detections, json.dumps(state.last_results))
        # Per-image COCOeval matches of the final detections: what the paired bootstrap CIs resample.
        save_matches(run.paths.matches, compute_matches(run.val_base.coco, state.last_results))
        write_metrics(run.paths.metrics, metrics)
    return metrics
