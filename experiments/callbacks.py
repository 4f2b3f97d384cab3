"""Hydra callbacks: write a grid's variant order before it runs, and its report after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .runfiles import atomic_write_text

VARIANTS_DIR = Path(__file__).parent / "conf" / "variants"


def grid_dir_of(config: DictConfig) -> Path:
    return Path(str(config.results_root)) / str(config.grid.name)


def variant_labels(variant_ids: list[str]) -> list[str]:
    """The table labels (``variant:``) of the given variant configs, in order."""
    labels = []
    for vid in variant_ids:
        node = OmegaConf.load(VARIANTS_DIR / f"{vid}.yaml")
        labels.append(str(node.get("variant", vid)))
    return labels


class GridReport(Callback):
    """Before a grid: record its variant order (``grid_variants.txt``). After: write the report."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        variants = list(config.grid.get("variants") or [])
        if variants:
            grid_dir = grid_dir_of(config)
            grid_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(grid_dir / "grid_variants.txt", "\n".join(variant_labels(variants)) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from analysis import write_report

        grid_dir = grid_dir_of(config)
        try:
            written = write_report(grid_dir)
        except Exception as exc:  # a report problem must not hide that the runs finished
            print(f"[assignbench] report for {grid_dir} failed: {type(exc).__name__}: {exc}")
            return
        print(f"[assignbench] grid {config.grid.name} finished; report in {grid_dir}:")
        for name in sorted(written):
            print(f"  {written[name]}")
