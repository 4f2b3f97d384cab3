"""The results contract, defined once: run paths and file names, the ``metrics.json`` and
``stats.csv`` fields, the AP names, the run-name format and the grid file; plus atomic writes and
the per-run lock. Torch-free: the engine writes with it, ``analysis`` reads with it.

Everything here survives a ``kill -9`` at any instant: a file is written to a temp file
in the same directory, fsynced, then renamed over the old one, so readers see either the
previous complete file or the new complete one.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import fcntl
import io
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------- names

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
STATS_FILE = "stats.csv"
DETECTIONS_FILE = "detections.json"
SNAPSHOT_FILE = "assignments.npz"
MATCHES_FILE = "eval_matches.npz"  # per-image COCOeval matches of the final evaluation (paired CIs)
LOG_FILE = "train.log"
CHECKPOINT_FILE = "checkpoints/last.pt"
GRID_FILE = "grid.json"  # a grid's variant labels in table order and its baseline variant

DONE, FAILED = "done", "failed"
AP_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# A two-stage model's proposal recall (percent): COCOeval on its RPN proposals as class-agnostic boxes, at most
# 100 and 1000 per image (experiments.proposals); null for single-stage models.
PROPOSAL_AR_NAMES = ("AR100", "AR1000")

STATS_FIELDS = [
    "iter",
    "loss_cls",
    "loss_box",
    "loss_quality",
    "num_gt",
    "num_pos",
    "pos_per_gt_mean",
    "pos_per_gt_std",
    "pos_iou_mean",
    "gt_without_pos",
    "assign_ms",
]
LOSS_FIELDS = ("loss_cls", "loss_box", "loss_quality")
# The stats.csv columns that come from the assignment (``assigners.assignment_stats``) and its timing.
ASSIGNMENT_STATS_FIELDS = tuple(f for f in STATS_FIELDS if f != "iter" and f not in LOSS_FIELDS)

# metrics.json "errors": TIDE's dAP per error type (experiments.tide), plus "ap" (TIDE's AP at IoU 0.5) and
# "counts" (errors of each main type).
MAIN_ERRORS = ("cls", "loc", "both", "dupe", "bkg", "miss")
SPECIAL_ERRORS = ("fp", "fn")
ERROR_NAMES = {"cls": "classification", "loc": "localisation", "both": "both cls and loc", "dupe": "duplicate",
               "bkg": "background", "miss": "missed", "fp": "false positives", "fn": "false negatives"}

METRIC_FIELDS = [
    "status",
    "error",
    "variant",
    "variant_id",
    "environment",
    *AP_NAMES,
    *PROPOSAL_AR_NAMES,
    "iou_pred_error",
    "iters",
    "train_seconds",
    "images_per_second",
    "peak_memory_mb",
    "seed",
    "assigner",
    "scorer",
    "overrides",
    "ap_curve",
    "errors",  # TIDE dAP per error type of the final detections (experiments.tide), or null
]

# Component names of older results, read under their current name (the MaxIoU assigner was ``iou``).
LEGACY_ASSIGNER_NAMES = {"iou": "max_iou"}

_RUN_NAME = re.compile(r"^(?P<variant_id>.+)-s(?P<seed>\d+)$")


def run_name(variant_id: str, seed: int) -> str:
    """The directory name of one run: ``<variant_id>-s<seed>``."""
    return f"{variant_id}-s{int(seed)}"


def parse_run_name(name: str) -> tuple[str, int] | None:
    """(variant_id, seed) of a ``run_name``, or None when ``name`` does not have its form."""
    match = _RUN_NAME.match(name)
    return (match["variant_id"], int(match["seed"])) if match else None


def canonical_assigner(name: str | None) -> str | None:
    """An assigner name as the registry spells it today (``iou`` -> ``max_iou``)."""
    return LEGACY_ASSIGNER_NAMES.get(name, name) if name is not None else None


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """The files of one run directory ``<results_root>/<grid>/<run>/``."""

    run_dir: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "run_dir", Path(self.run_dir))

    config = property(lambda self: self.run_dir / CONFIG_FILE)
    metrics = property(lambda self: self.run_dir / METRICS_FILE)
    stats = property(lambda self: self.run_dir / STATS_FILE)
    detections = property(lambda self: self.run_dir / DETECTIONS_FILE)
    snapshots = property(lambda self: self.run_dir / SNAPSHOT_FILE)
    matches = property(lambda self: self.run_dir / MATCHES_FILE)
    log = property(lambda self: self.run_dir / LOG_FILE)
    checkpoint = property(lambda self: self.run_dir / CHECKPOINT_FILE)


def new_metrics(
    *,
    variant: str,
    variant_id: str,
    seed: int,
    assigner: str,
    scorer: str,
    overrides: list[str],
    environment: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``metrics.json`` dict with every field of the contract, before any result is in."""
    metrics: dict[str, Any] = dict.fromkeys(METRIC_FIELDS)
    metrics.update(
        variant=variant,
        variant_id=variant_id,
        environment=environment,
        iters=0,
        train_seconds=0.0,
        seed=int(seed),
        assigner=assigner,
        scorer=scorer,
        overrides=list(overrides),
        ap_curve=[],
    )
    return metrics


def write_grid_file(grid_dir: str | Path, name: str, variants: list[str], baseline: str | None) -> None:
    """Record a grid's variant labels (table order) and its baseline variant in ``grid.json``."""
    if baseline is not None and baseline not in variants:
        raise ValueError(f"grid {name}: baseline {baseline!r} is not one of its variants {variants}")
    payload = {"grid": name, "variants": list(variants), "baseline": baseline}
    atomic_write_text(Path(grid_dir) / GRID_FILE, json.dumps(payload, indent=2) + "\n")


def read_grid_file(grid_dir: str | Path) -> dict[str, Any]:
    """``grid.json`` as {"grid", "variants", "baseline"}; empty variants and no baseline when absent."""
    path = Path(grid_dir) / GRID_FILE
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {"grid": Path(grid_dir).name, "variants": [], "baseline": None}
    return {
        "grid": str(payload.get("grid", Path(grid_dir).name)),
        "variants": [str(v) for v in payload.get("variants") or []],
        "baseline": payload.get("baseline"),
    }


# ----------------------------------------------------------------------------- writing


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via temp file + fsync + rename (+ fsync of the directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete the temp files that ``atomic_write_bytes`` left under ``directory`` when killed mid-write.

    A ``kill -9`` between ``mkstemp`` and ``os.replace`` leaves a ``.<name>.<random>.tmp`` file (as
    large as a checkpoint) next to the intact previous version. Call this only while holding the
    directory's ``RunLock``, when no other writer can have a write in flight. Returns what it removed.
    """
    removed = []
    for tmp in sorted(Path(directory).rglob(".*.tmp")):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_safe(value: Any) -> Any:
    """Non-finite floats become null: JSON has no NaN, and a NaN must never pass as a number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json`` atomically with every field of the results contract present."""
    missing = [k for k in METRIC_FIELDS if k not in metrics]
    if missing:
        raise KeyError(f"metrics for {path} lack fields {missing}")
    atomic_write_text(path, json.dumps(_json_safe(metrics), indent=2, sort_keys=False) + "\n")


def read_metrics(path: str | Path) -> dict[str, Any] | None:
    """The run's metrics, or None when the file is absent, unreadable or not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            metrics = json.load(f)
    except (OSError, ValueError):  # ValueError: JSON or UTF-8 decoding
        return None
    return metrics if isinstance(metrics, dict) else None


def val_annotation_file(run_dir: str | Path) -> Path:
    """The val annotation file a run was evaluated on: the second of ``environment.annotations`` in its
    ``metrics.json`` (``describe_environment`` writes [train, val]). FileNotFoundError naming the run when
    metrics.json does not name it or the file is not on this machine."""
    metrics = read_metrics(RunPaths(Path(run_dir)).metrics) or {}
    files = (metrics.get("environment") or {}).get("annotations") or []
    if len(files) < 2:
        raise FileNotFoundError(f"{run_dir}: metrics.json does not name its annotation files (environment.annotations)")
    path = Path(files[1])
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: its val annotations {path} are not here (generate the data first)")
    return path


def run_is_done(run_dir: str | Path) -> bool:
    """Whether the run's ``metrics.json`` says done."""
    metrics = read_metrics(RunPaths(Path(run_dir)).metrics)
    return bool(metrics and metrics.get("status") == DONE)


class StatsWriter:
    """Appends rows to ``stats.csv``; on resume it first drops rows past the checkpoint.

    Rows are written whole and flushed with fsync, and a torn trailing line (a kill in the
    middle of a write) is removed when the file is reopened, so the file never ends with a
    partial or duplicated row.
    """

    def __init__(self, path: str | Path, resume_iter: int = 0):
        self.path = Path(path)
        self._truncate_to(resume_iter)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        if new:
            self._file.write(",".join(STATS_FIELDS) + "\n")
            self._sync()

    def _truncate_to(self, resume_iter: int) -> None:
        if not self.path.exists():
            return
        text = self.path.read_text(encoding="utf-8")
        lines = text.splitlines(keepends=True)
        kept: list[str] = []
        for i, line in enumerate(lines):
            if not line.endswith("\n"):
                break  # torn last line
            if i == 0:
                kept.append(line)
                continue
            cells = line.rstrip("\n").split(",")
            if len(cells) != len(STATS_FIELDS):
                break
            try:
                it = int(float(cells[0]))
            except ValueError:
                break
            if it > resume_iter:
                break
            kept.append(line)
        if "".join(kept) != text:
            atomic_write_text(self.path, "".join(kept))

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def write(self, row: dict[str, Any]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow([_fmt(row.get(k)) for k in STATS_FIELDS])
        self._file.write(buf.getvalue())
        self._sync()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<run_dir>/.lock``.

    Two processes started on the same grid never train the same run at once: the second
    one sees the lock held and skips the run. The OS drops the lock when a process dies,
    so a killed run never leaves a stale lock behind.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return False
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
