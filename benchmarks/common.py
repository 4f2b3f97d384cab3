"""What every benchmark shares: arguments, interleaved timing, peak memory, printed lines and the CSV.

Timing: ``time_interleaved`` runs every compared case once per repetition (a round), rotating their
order from one round to the next, after ``warmup`` untimed rounds. Figures are medians over rounds;
ratios are medians of the per-round ratios (``median_ratio``). Interleaving puts the compared cases
under the same machine load (the CPU may be shared), which matters more for a ratio than for the
absolute figures.

Memory: ``peak_memory_mb`` is the peak growth of one call: on CUDA from
``torch.cuda.max_memory_allocated``, on CPU from the process's resident-set high-water mark
(``VmHWM`` in ``/proc/self/status``, reset through ``/proc/self/clear_refs``; Linux only, NaN elsewhere).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT_DIR = Path("results/runs/bench")
CSV_COLUMNS = ["benchmark", "device", "threads", "section", "name", "value", "unit", "target", "met"]


def parse_args(description: str, *, default_reps: int, default_warmup: int = 2, add_arguments=None) -> argparse.Namespace:
    """The shared command line (``--device``, ``--reps``, ``--warmup``, ``--threads``, ``--out-dir``,
    ``--tiny``) plus whatever ``add_arguments(parser)`` adds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--reps", type=int, default=default_reps, help="timed repetitions of every case")
    parser.add_argument("--warmup", type=int, default=default_warmup, help="untimed repetitions first")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where the CSV goes")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks that it runs, figures mean nothing")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    if args.reps < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--reps and --threads must be >= 1 and --warmup >= 0")
    return args


def setup_device(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and return the ``--device``; exits with a clear message without CUDA."""
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    return torch.device(args.device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    cases: dict[str, Callable[[], Any]], *, reps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of every case, ``reps`` each, measured round-robin after ``warmup`` rounds.

    Round r runs the cases starting from case r mod n, so no case always follows the same other one.
    """
    names = list(cases)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + reps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            cases[name]()
            synchronize(device)
            if round_index >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1000.0


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over repetitions of numerator[r] / denominator[r]: each ratio pairs two calls of the
    same round, measured under the same load, so it is steadier than a ratio of medians."""
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"{field_name} not in /proc/self/status")


def _release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back, so a call's growth starts from the live set."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory growth (MiB) while ``fn()`` runs, over what was held before it; NaN if unmeasurable."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset the resident-set high-water mark to the current RSS
        before = _proc_status_kib("VmRSS")
    except OSError:
        fn()
        return float("nan")
    fn()
    return (_proc_status_kib("VmHWM") - before) / 1024.0


@dataclass
class Report:
    """Printed lines and CSV rows of one benchmark run."""

    benchmark: str
    device: torch.device
    threads: int
    rows: list[dict[str, Any]] = field(default_factory=list)

    def figure(self, section: str, name: str, value: float, unit: str, note: str = "") -> None:
        """One measured figure: one printed line and one CSV row."""
        suffix = f"  ({note})" if note else ""
        print(f"{self.benchmark:>6} {section:<10} {name:<40} {value:>10.2f} {unit}{suffix}", flush=True)
        self._row(section, name, value, unit, "", "")

    def ratio(self, section: str, name: str, value: float, target: str = "", unit: str = "x") -> bool | None:
        """A ratio or share, optionally with its ``target`` ("<= 2.0", ">= 20"); returns whether it is met."""
        met: bool | None = None
        if target:
            op, bound = target.split()
            met = value <= float(bound) if op == "<=" else value >= float(bound)
        verdict = "" if met is None else f"  (target {target}: {'met' if met else 'NOT met'})"
        print(f"{self.benchmark:>6} {section:<10} {name:<40} {value:>10.3f} {unit}{verdict}", flush=True)
        self._row(section, name, value, unit, target, "" if met is None else str(met).lower())
        return met

    def _row(self, section: str, name: str, value: float, unit: str, target: str, met: str) -> None:
        self.rows.append(
            {
                "benchmark": self.benchmark,
                "device": self.device.type,
                "threads": self.threads,
                "section": section,
                "name": name,
                "value": f"{value:.6g}",
                "unit": unit,
                "target": target,
                "met": met,
            }
        )

    def write_csv(self, out_dir: Path) -> Path:
        """Write the rows to ``<out_dir>/<benchmark>_<device>.csv`` and return its path."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.benchmark}_{self.device.type}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        print(f"{self.benchmark:>6} wrote {path}", flush=True)
        return path


def describe_machine(device: torch.device, threads: int) -> str:
    """One line naming what the figures were measured on."""
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU, {threads} torch thread(s) of {os.cpu_count()} cores"
    return f"torch {torch.__version__} on {where}"


__all__ = [
    "Report",
    "describe_machine",
    "median_ms",
    "median_ratio",
    "parse_args",
    "peak_memory_mb",
    "setup_device",
    "synchronize",
    "time_interleaved",
]
