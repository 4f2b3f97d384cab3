"""The shared benchmark helpers: interleaved timing, ratios, memory, printed lines and CSV."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from benchmarks.common import Report, median_ratio, peak_memory_mb, time_interleaved

CPU = torch.device("cpu")


def test_time_interleaved_rotates_the_order_and_skips_the_warmup():
    calls: list[str] = []
    cases = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    seconds = time_interleaved(cases, reps=3, warmup=1, device=CPU)
    assert {name: len(values) for name, values in seconds.items()} == {"a": 3, "b": 3, "c": 3}
    # Round r starts at case r mod 3; round 0 is the warm-up.
    assert calls == list("abc" "bca" "cab" "abc")


def test_median_ratio_pairs_rounds():
    # Per-round ratios 2, 2, 6 -> 2; the ratio of the medians would be 8 / 1.5.
    assert median_ratio([2.0, 8.0, 9.0], [1.0, 4.0, 1.5]) == 2.0


def test_peak_memory_counts_a_large_temporary():
    peak = peak_memory_mb(lambda: torch.ones(16 * 2**20 // 4).add_(1), CPU)  # 16 MiB float32
    if math.isnan(peak):
        pytest.skip("no /proc/self/clear_refs here")
    assert 15.0 <= peak <= 40.0


def test_report_prints_checks_targets_and_writes_csv(tmp_path, capsys):
    report = Report("demo", CPU, threads=1)
    report.figure("small", "x ms/batch", 1.5, "ms")
    assert report.ratio("small", "x/y", 1.8, "<= 2.0") is True
    assert report.ratio("small", "y/x", 12.0, ">= 20") is False
    assert report.ratio("small", "info", 3.0) is None
    path = report.write_csv(tmp_path)
    assert path == tmp_path / "demo_cpu.csv"
    rows = list(csv.DictReader(path.open()))
    assert [(r["name"], r["value"], r["unit"], r["target"], r["met"]) for r in rows] == [
        ("x ms/batch", "1.5", "ms", "", ""),
        ("x/y", "1.8", "x", "<= 2.0", "true"),
        ("y/x", "12", "x", ">= 20", "false"),
        ("info", "3", "x", "", ""),
    ]
    printed = capsys.readouterr().out
    assert "target <= 2.0: met" in printed and "target >= 20: NOT met" in printed
