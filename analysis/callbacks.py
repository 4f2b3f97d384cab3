"""Hydra callback of a grid: record its variants and baseline before it runs, write its report after.

It lives in ``analysis`` so that ``experiments`` never imports ``analysis`` (the report side reads
the results contract, ``experiments.runfiles``, and nothing else of the training side).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from experiments.runfiles import write_grid_file


def grid_dir_of(config: DictConfig) -> Path:
    return Path(str(config.results_root)) / str(config.grid.name)


def variant_labels(variant_ids: list[str]) -> list[str]:
    """The table labels (``variant:``) of the given variant configs (``experiments/conf/variants``), in order."""
    variants_dir = resources.files("experiments.conf") / "variants"
    labels = []
    for vid in variant_ids:
        node = OmegaConf.create((variants_dir / f"{vid}.yaml").read_text(encoding="utf-8"))
        labels.append(str(node.get("variant", vid)))
    return labels


class GridReport(Callback):
    """Before a grid: ``grid.json`` (variant labels in order, baseline). After: the report."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        variants = list(config.grid.get("variants") or [])
        if not variants:
            return
        baseline_id = str(config.grid.get("baseline") or variants[0])
        if baseline_id not in variants:
            raise ValueError(f"grid {config.grid.name}: grid.baseline={baseline_id} is not one of {variants}")
        labels = variant_labels(variants)
        grid_dir = grid_dir_of(config)
        grid_dir.mkdir(parents=True, exist_ok=True)
        write_grid_file(grid_dir, str(config.grid.name), labels, labels[variants.index(baseline_id)])

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from analysis.report import write_report

        grid_dir = grid_dir_of(config)
        try:
            written = write_report(grid_dir)
        except Exception as exc:  # a report problem must not hide that the runs finished
            print(f"[assignbench] report for {grid_dir} failed: {type(exc).__name__}: {exc}")
            return
        print(f"[assignbench] grid {config.grid.name} finished; report in {grid_dir}:")
        for name in sorted(written):
            print(f"  {written[name]}")
