"""``assignbench-eval``: re-score a finished run's final weights with other inference settings.

    assignbench-eval results/runs/table1_modules/paa_iou-s0 inference.score_voting=true \\
        --variant-id paa_iou_voting --variant "PAA+IoU+voting"

The result is a new run of the same grid (``<grid>/<variant_id>-s<seed>/``) that shares its weights
with the run it re-scores (``rescored_from`` in its metrics.json): no training, so a paired CI
between the two isolates the inference change (score voting, test-time settings). A grid variant
does the same with ``rescore_from: <variant_id>`` in its config (``experiments.train`` calls
``rescore_run``), e.g. ``table1_modules``' voting row. Only ``inference.*`` and ``eval.*`` keys may
be overridden: anything else would change what the weights are.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError
from .runfiles import DONE, RunPaths, read_metrics, run_name

RESCORABLE_KEYS = ("inference.", "eval.")


def check_overrides(overrides: list[str]) -> None:
    """ConfigError unless every override is ``inference.<key>=value`` or ``eval.<key>=value``."""
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+")
        if "=" not in item or not key.startswith(RESCORABLE_KEYS):
            raise ConfigError(
                f"re-scoring takes only inference.* and eval.* overrides (key=value), got {item!r}: "
                "other keys would change the trained weights; train a new variant instead"
            )


def rescore_run(source_dir: Path, cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Evaluate the final checkpoint of ``source_dir`` under ``cfg`` into the run directory ``cfg`` names.

    cfg: the new run's resolved config (the source's with the inference/eval overrides, its own
    variant and variant_id). Copies the source's stats.csv (the training is the same); writes
    config.yaml, metrics.json (``rescored_from``) and detections.json. Raises ConfigError when the
    source run is not done or has no checkpoint.
    """
    from . import engine
    from .checkpoint import load_checkpoint
    from .train import run_dir_of
    from .trainer import TrainState

    source = RunPaths(source_dir)
    source_metrics = read_metrics(source.metrics)
    if not source_metrics or source_metrics.get("status") != DONE:
        raise ConfigError(f"{source.run_dir}: the run to re-score is not done (train it first)")
    ckpt = load_checkpoint(source.checkpoint)
    if ckpt is None:
        raise ConfigError(f"{source.run_dir}: no {source.checkpoint.name} to re-score (checkpoints are not committed)")
    if int(ckpt["iter"]) != int(source_metrics["iters"]):
        raise ConfigError(f"{source.checkpoint}: holds iteration {ckpt['iter']}, the run ended at {source_metrics['iters']}")
    target = RunPaths(run_dir_of(cfg))
    run = engine.build_run(cfg, target.run_dir)
    run.model.load_state_dict(ckpt["model"])
    state = TrainState(iter=int(ckpt["iter"]), max_iter=run.budget.iters, train_seconds=float(ckpt["train_seconds"]))
    state.final_ap, state.iou_pred_error, state.last_results = engine.make_evaluator(run)()
    state.ap_curve = [[state.iter, state.final_ap["AP"]]]
    engine.write_resolved_config(target, cfg)
    if source.stats.exists():
        shutil.copyfile(source.stats, target.stats)
    return engine.finish_run(run, state, overrides, rescored_from=source.run_dir.name,
                             images_per_second=source_metrics.get("images_per_second"))


# Keys that may differ between a run and its re-scoring: names, inference, evaluation and bookkeeping.
NOT_TRAINING_KEYS = ("variant", "variant_id", "run_name", "rescore_from", "inference", "eval", "progress", "logger",
                     "num_threads", "results_root", "deadline")


def check_same_training(source_dir: Path, cfg: DictConfig) -> None:
    """ConfigError naming the keys where ``cfg`` trains differently from the run in ``source_dir``."""
    source = OmegaConf.to_container(OmegaConf.load(RunPaths(source_dir).config), resolve=True)
    target = OmegaConf.to_container(cfg, resolve=True)
    differ = sorted(
        key for key in set(source) | set(target)
        if key not in NOT_TRAINING_KEYS and key != "hydra" and source.get(key) != target.get(key)
    )
    if differ:
        raise ConfigError(
            f"{cfg.run_name} re-scores {Path(source_dir).name} but trains differently in {', '.join(differ)}; "
            "only inference.* and eval.* may differ"
        )


def config_for(source_dir: Path, overrides: list[str], variant_id: str, variant: str) -> DictConfig:
    """The source run's config.yaml with ``overrides`` applied and the new variant's names."""
    check_overrides(overrides)
    cfg = OmegaConf.load(RunPaths(source_dir).config)
    cfg.merge_with(OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    cfg.variant_id, cfg.variant = variant_id, variant
    cfg.results_root = str(Path(source_dir).parent.parent)
    cfg.run_name = run_name(variant_id, int(cfg.seed))
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="assignbench-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run, e.g. results/runs/demo/paa_iou-s0")
    parser.add_argument("overrides", nargs="*", help="inference.* / eval.* overrides, key=value")
    parser.add_argument("--variant-id", required=True, help="the new run's variant id (its directory name stem)")
    parser.add_argument("--variant", help="the new run's table label (default: the variant id)")
    args = parser.parse_args(argv)
    try:
        cfg = config_for(args.run_dir, args.overrides, args.variant_id, args.variant or args.variant_id)
        torch.set_num_threads(int(cfg.get("num_threads") or torch.get_num_threads()))
        metrics = rescore_run(args.run_dir, cfg, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"assignbench-eval: error: {exc}", file=sys.stderr)
        return 1
    print(f"[assignbench] {cfg.grid.name}/{cfg.run_name}: AP {metrics['AP']:.1f} re-scored from {args.run_dir.name}")
    return 0


__all__ = ["check_overrides", "config_for", "main", "rescore_run"]

if __name__ == "__main__":
    sys.exit(main())
