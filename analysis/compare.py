"""``assignbench-compare RUNS_GRID REFERENCE_GRID``: a grid's AP against the committed reference.

For each variant: this grid's AP per seed beside the reference's mean ± sample std over its seeds,
and whether each AP lies within the reference's seed spread, defined here as mean ± 2 std (about
95% of seed-to-seed variation if it is roughly normal); with fewer than two reference seeds there
is no spread and the verdict says so. Both sides' environments are named: the same seed gives a
different AP on a different CPU or library build, so a mismatch across machines is expected at the
level of the seed spread, and an exact match only on the same machine.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from analysis.runs import CONFIG_FILE, DONE, ResultsError, Run, load_runs, read_config, variant_order

SPREAD_STDS = 2.0
# Config keys that name or place a run rather than define what it trains and evaluates.
BOOKKEEPING_KEYS = ("grid", "results_root", "run_name", "seed", "seeds", "progress", "num_threads", "hydra", "data.root")


@dataclass(frozen=True)
class VariantComparison:
    variant: str
    ap: list[float]  # this grid's done runs, by seed
    reference_ap: list[float]
    verdict: str
    config_differences: tuple[str, ...] = ()

    @property
    def reference_mean(self) -> float:
        return statistics.mean(self.reference_ap) if self.reference_ap else math.nan

    @property
    def reference_std(self) -> float:
        """Sample std (n - 1) over the reference seeds; NaN for fewer than two."""
        return statistics.stdev(self.reference_ap) if len(self.reference_ap) > 1 else math.nan


def _done_ap(runs: list[Run], variant: str) -> list[float]:
    runs = sorted((r for r in runs if r.variant == variant and r.status == DONE), key=lambda r: r.seed or 0)
    return [float(r.metrics["AP"]) for r in runs if isinstance(r.metrics.get("AP"), int | float)]


def verdict(ap: list[float], reference_ap: list[float]) -> str:
    """``within`` / ``outside`` the reference's mean ± 2 std, or why it cannot be said."""
    if not ap:
        return "no done run here"
    if not reference_ap:
        return "no reference run"
    if len(reference_ap) < 2:
        return "one reference seed: no spread to compare with"
    mean, std = statistics.mean(reference_ap), statistics.stdev(reference_ap)
    low, high = mean - SPREAD_STDS * std, mean + SPREAD_STDS * std
    outside = [v for v in ap if not low <= v <= high]
    return "within" if not outside else f"outside ({', '.join(f'{v:.1f}' for v in outside)} not in [{low:.1f}, {high:.1f}])"


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


def config_differences(run: Run, other: Run) -> tuple[str, ...]:
    """The config keys (dotted) where two runs differ, bookkeeping keys aside; () when either has no config."""
    configs = [read_config(r.path / CONFIG_FILE) for r in (run, other)]
    if not all(configs):
        return ()
    flat = [{k.rstrip("."): v for k, v in _flatten(c).items()} for c in configs]
    keep = [{k: v for k, v in f.items() if not any(k == b or k.startswith(b + ".") for b in BOOKKEEPING_KEYS)}
            for f in flat]
    return tuple(sorted(k for k in set(keep[0]) | set(keep[1]) if keep[0].get(k) != keep[1].get(k)))


def compare(grid_dir: Path, reference_dir: Path, runs: list[Run] | None = None,
            reference: list[Run] | None = None) -> list[VariantComparison]:
    """Per variant of ``grid_dir`` (in its order), its AP against ``reference_dir``'s; ``runs`` and
    ``reference`` are the two grids' runs when already loaded."""
    runs = load_runs(grid_dir) if runs is None else runs
    reference = load_runs(reference_dir) if reference is None else reference
    order = variant_order(grid_dir, {r.variant for r in runs})
    rows = []
    for variant in order:
        ap, ref = _done_ap(runs, variant), _done_ap(reference, variant)
        mine = [r for r in runs if r.variant == variant]
        theirs = [r for r in reference if r.variant == variant]
        differ = config_differences(mine[0], theirs[0]) if mine and theirs else ()
        rows.append(VariantComparison(variant, ap, ref, verdict(ap, ref), differ))
    return rows


def environment_summary(runs: list[Run]) -> str:
    """The environments of a grid's done runs, one phrase each (runs written before it was recorded say so)."""
    seen = []
    for run in runs:
        if run.status != DONE:
            continue
        env = run.environment
        if env is None:
            text = "environment not recorded"
        else:
            versions = env.get("versions") or {}
            cpu = env.get("cpu") or {}
            cpu_text = (f", {cpu.get('capability')} cpu {cpu.get('family_model_stepping')} flags {cpu.get('flags_hash')}"
                        if cpu else ", cpu signature not recorded")
            text = (f"{env.get('device')} ({env.get('device_type')}, {env.get('threads')} threads{cpu_text}), "
                    f"torch {versions.get('torch')}, data {env.get('data_hash')}")
        if text not in seen:
            seen.append(text)
    return "; ".join(seen) or "no done runs"


def render(grid_dir: Path, reference_dir: Path, rows: list[VariantComparison], runs: list[Run],
           reference: list[Run]) -> str:
    lines = [
        f"{grid_dir} against the reference {reference_dir}",
        f"  here:      {environment_summary(runs)}",
        f"  reference: {environment_summary(reference)}",
        "",
        f"| variant | AP here (by seed) | reference AP, mean ± std (seeds) | within mean ± {SPREAD_STDS:g} std? |",
        "|---|---|---|---|",
    ]
    for row in rows:
        here = ", ".join(f"{v:.1f}" for v in row.ap) or "–"
        if row.reference_ap:
            std = f" ± {row.reference_std:.1f}" if len(row.reference_ap) > 1 else ""
            ref = f"{row.reference_mean:.1f}{std} ({len(row.reference_ap)})"
        else:
            ref = "–"
        note = f" (configs differ in {', '.join(row.config_differences)})" if row.config_differences else ""
        lines.append(f"| {row.variant} | {here} | {ref} | {row.verdict}{note} |")
    lines += ["", "Runs are deterministic on one machine only: on another CPU or library build the same seed "
              "gives another AP, so compare against the seed spread, not the digits."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="assignbench-compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("grid_dir", type=Path, help="the grid just run, e.g. results/runs/demo")
    parser.add_argument("reference_dir", type=Path, help="its committed reference, e.g. results/reference/demo")
    parser.add_argument("--out", type=Path, help="also write the comparison (Markdown) to this file")
    args = parser.parse_args(argv)
    try:
        runs, reference = load_runs(args.grid_dir), load_runs(args.reference_dir)
        rows = compare(args.grid_dir, args.reference_dir, runs, reference)
        text = render(args.grid_dir, args.reference_dir, rows, runs, reference)
    except ResultsError as exc:
        print(f"assignbench-compare: error: {exc}", file=sys.stderr)
        return 1
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
