"""Building a run from its resolved config: components, datasets, loaders, optimiser, LR schedule.

The one place where config nodes become plain objects; nothing below ``experiments/`` sees a
config. Every check of a config value happens here, before any data is generated or any step runs.
"""

from __future__ import annotations

import bisect
import dataclasses
import multiprocessing
import random
import signal
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .distributed import DistInfo
from .errors import ConfigError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def instantiate(node: DictConfig, key: str, **kwargs: Any) -> Any:
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


@dataclasses.dataclass(frozen=True)
class Budget:
    """The schedule's sizes: total and per-process batch, iterations, and the evaluation iterations."""

    total_batch: int
    local_batch: int
    iters: int
    eval_iters: frozenset[int]


def check_budget(cfg: DictConfig, dist_info: DistInfo) -> Budget:
    """Validate batch size and iterations against the process count; ConfigError names the key."""
    sched = cfg.schedule
    total_batch = int(sched.batch_size)
    if total_batch % dist_info.world_size:
        raise ConfigError(
            f"schedule.batch_size={total_batch} is not divisible by the {dist_info.world_size} processes"
        )
    iters = int(sched.iters)
    if iters <= 0:
        raise ConfigError(f"schedule.iters must be > 0, got {iters}")
    eval_iters = frozenset({max(1, int(round(f * iters))) for f in cfg.eval.curve_fractions} | {iters})
    return Budget(total_batch, total_batch // dist_info.world_size, iters, eval_iters)


def build_datasets(cfg: DictConfig):
    """(train set, val set, val base): the val set cut to ``eval.max_images``; the base holds its COCO GT."""
    from experiments.data import build_dataset

    data, sched = cfg.data, cfg.schedule
    digits_params = OmegaConf.to_container(data.digits, resolve=True) if "digits" in data else None
    common = dict(root=data.root, digits_params=digits_params)
    min_size = OmegaConf.to_object(sched.min_size) if OmegaConf.is_list(sched.min_size) else sched.min_size
    train_set = build_dataset(
        data.name, data.train_split, train=True, min_size=min_size, max_size=sched.max_size,
        flip_prob=data.flip_prob, filter_empty=bool(data.get("filter_empty", False)), **common,
    )
    val_base = build_dataset(
        data.name, data.val_split, train=False, min_size=sched.test_min_size, max_size=sched.max_size,
        flip_prob=0.0, **common,
    )
    for ds in (train_set, val_base):
        ds.validate()
    val_set = val_base
    if cfg.eval.max_images:
        val_set = torch.utils.data.Subset(val_base, range(min(int(cfg.eval.max_images), len(val_base))))
    return train_set, val_set, val_base


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


def build_optimization(model: torch.nn.Module, sched: DictConfig, budget: Budget):
    """(optimizer, scheduler): LR scaled linearly from 16 images; ``steps`` <= 1.0 are fractions of iters."""
    lr = float(sched.base_lr) * budget.total_batch / 16.0
    optimizer = build_optimizer(model, lr, float(sched.momentum), float(sched.weight_decay), float(sched.bias_lr_factor))
    steps = [int(round(s * budget.iters)) if isinstance(s, float) and s <= 1.0 else int(s) for s in sched.steps]
    warmup_iters, warmup_factor, gamma = int(sched.warmup_iters), float(sched.warmup_factor), float(sched.gamma)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, warmup_iters, warmup_factor, steps, gamma)
    )
    return optimizer, scheduler


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave SIGINT/SIGTERM to the main process.

    A Ctrl-C, or a SIGTERM sent to the whole process group (``kill -- -PGID``, SLURM's
    ``scancel``, ``docker stop``), reaches the data workers too. Left at their defaults, the
    workers die and the main process fails with "DataLoader worker ... killed by signal" before
    it can write its checkpoint. Ignoring the signals here lets the main process finish the
    iteration, checkpoint and exit (``hooks.StopSignalHook``); it shuts the workers down as it
    exits, and a worker whose parent died exits by itself (torch's worker watchdog).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def worker_context(num_workers: int):
    """Data workers fork on Linux, also inside a launcher's worker (joblib/loky replaces the
    default start method there, and its processes cannot start DataLoader workers)."""
    if num_workers > 0 and sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return None


def build_train_loader(train_set, cfg: DictConfig, budget: Budget, dist_info: DistInfo, start_iter: int,
                       size_divisibility: int, device: torch.device | None = None):
    """The training batches, images padded to the model's ``size_divisibility`` (the evaluation loader of
    a rank's val shard is ``build_val_loader``, made by ``engine.make_evaluator``).

    One process: a seeded RandomSampler whose generator also restarts from ``start_iter`` on
    resume. torchrun: a DistributedSampler. With ``data.resident`` the training batches are
    ``ResidentBatches`` on ``device`` (images decoded once into device memory) in the same order.
    """
    from functools import partial

    from experiments.data import collate

    num_workers = int(cfg.data.num_workers)
    pad = partial(collate, size_divisibility=size_divisibility)
    per_process = len(train_set) // max(1, dist_info.world_size)
    if per_process < budget.local_batch:  # drop_last would leave every epoch empty: an endless loop
        raise ConfigError(
            f"schedule.batch_size={budget.total_batch} needs at least {budget.local_batch} training images per "
            f"process; {cfg.data.train_split} has {len(train_set)} for {dist_info.world_size} process(es)"
        )
    if dist_info.world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(train_set, shuffle=True, seed=int(cfg.seed))
        generator = None
    else:
        generator = torch.Generator().manual_seed(int(cfg.seed) + start_iter)
        sampler = torch.utils.data.RandomSampler(train_set, generator=generator)
    if cfg.data.get("resident", False):
        from experiments.data.resident import ResidentBatches, index_loader

        indices = index_loader(len(train_set), budget.local_batch, sampler, generator)
        flip_seed = (int(cfg.seed) * 1000003 + start_iter) * max(1, dist_info.world_size) + dist_info.rank
        loader = ResidentBatches(train_set, indices, device or torch.device("cpu"), size_divisibility, flip_seed,
                                 num_workers, worker_context(num_workers))
    else:
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=budget.local_batch, sampler=sampler, num_workers=num_workers, collate_fn=pad,
            drop_last=True, persistent_workers=num_workers > 0, generator=generator,
            worker_init_fn=ignore_stop_signals, multiprocessing_context=worker_context(num_workers),
        )
    return loader


def build_val_loader(val_set, cfg: DictConfig, size_divisibility: int):
    """The evaluation DataLoader: in order, ``eval.batch_size`` images, padded to ``size_divisibility``."""
    from functools import partial

    from experiments.data import collate

    num_workers = int(cfg.data.num_workers)
    return torch.utils.data.DataLoader(
        val_set, batch_size=int(cfg.eval.batch_size), shuffle=False, num_workers=num_workers,
        collate_fn=partial(collate, size_divisibility=size_divisibility),
        worker_init_fn=ignore_stop_signals, multiprocessing_context=worker_context(num_workers),
    )


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


__all__ = [
    "Budget",
    "build_datasets",
    "build_optimization",
    "build_optimizer",
    "build_train_loader",
    "build_val_loader",
    "check_budget",
    "ignore_stop_signals",
    "infinite_batches",
    "instantiate",
    "lr_factor",
    "seed_everything",
    "worker_context",
]
