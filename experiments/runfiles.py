"""Files of one run: atomic writes, the per-run lock, ``stats.csv`` and ``metrics.json``.

Everything here survives a ``kill -9`` at any instant: a file is written to a temp file
in the same directory, fsynced, then renamed over the old one, so readers see either the
previous complete file or the new complete one.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

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

METRIC_FIELDS = [
    "status",
    "error",
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
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
]


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
    """The run's metrics, or None when the file is absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
