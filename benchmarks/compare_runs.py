"""Are two trees of runs the same result? For refactors that must not change behaviour.

    python -m benchmarks.compare_runs BEFORE_ROOT AFTER_ROOT [--rename OLD=NEW ...]

Every run directory under BEFORE_ROOT (``<grid>/<run>/``) is compared with the one of the same path
(or renamed) under AFTER_ROOT: ``stats.csv`` cell for cell except the timing column ``assign_ms``,
``detections.json`` as parsed JSON, the AP fields and ``ap_curve`` of ``metrics.json``, and every
array of ``assignments.npz``. CPU runs are deterministic on one machine, so a refactor that keeps
behaviour gives ``identical`` on every line. Exit status 0 when all are identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from experiments.runfiles import (
    AP_NAMES,
    DETECTIONS_FILE,
    METRICS_FILE,
    SNAPSHOT_FILE,
    STATS_FILE,
)

TIMING_COLUMNS = ("assign_ms",)
RESULT_FIELDS = (*AP_NAMES, "iou_pred_error", "ap_curve", "iters", "status")


def _stats(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def _snapshot_equal(a: Path, b: Path) -> bool:
    if not a.exists() and not b.exists():
        return True
    if not (a.exists() and b.exists()):
        return False
    with np.load(a) as x, np.load(b) as y:
        return set(x.files) == set(y.files) and all(np.array_equal(x[k], y[k]) for k in x.files)


def compare_run(before: Path, after: Path) -> dict[str, bool]:
    """Which parts of two run directories are equal: stats, detections, metrics, snapshot."""
    metrics = [json.loads((d / METRICS_FILE).read_text()) for d in (before, after)]
    return {
        "stats": _stats(before / STATS_FILE) == _stats(after / STATS_FILE),
        "detections": json.loads((before / DETECTIONS_FILE).read_text()) == json.loads((after / DETECTIONS_FILE).read_text()),
        "metrics": all(metrics[0].get(k) == metrics[1].get(k) for k in RESULT_FIELDS),
        "snapshot": _snapshot_equal(before / SNAPSHOT_FILE, after / SNAPSHOT_FILE),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                        help="a run directory name that changed (e.g. iou_iou-s0=max_iou_iou-s0)")
    args = parser.parse_args(argv)
    renames = dict(item.split("=", 1) for item in args.rename)
    runs = sorted(p.parent for p in args.before.glob(f"*/*/{METRICS_FILE}"))
    if not runs:
        print(f"no runs under {args.before}", file=sys.stderr)
        return 1
    all_equal = True
    for run in runs:
        other = args.after / run.parent.name / renames.get(run.name, run.name)
        if not (other / METRICS_FILE).exists():
            print(f"{run.parent.name}/{run.name}: missing under {args.after}")
            all_equal = False
            continue
        parts = compare_run(run, other)
        all_equal &= all(parts.values())
        verdict = "identical" if all(parts.values()) else "DIFFERS in " + ", ".join(k for k, v in parts.items() if not v)
        ap = json.loads((other / METRICS_FILE).read_text()).get("AP")
        print(f"{run.parent.name}/{run.name}: {verdict} (AP {ap})")
    print("all identical" if all_equal else "differences found")
    return 0 if all_equal else 1


if __name__ == "__main__":
    sys.exit(main())
