"""Reading one grid's runs into plain records and pandas frames.

A grid directory ``results/<grid>/`` holds one sub-directory per run, each with the files of
the results contract (ARCHITECTURE.md): ``config.yaml``, ``metrics.json``, ``stats.csv`` and
optionally ``assignments.npz``. Nothing here writes a file, and nothing here imports torch.

A run's status is ``"done"`` or ``"failed"`` as its ``metrics.json`` says, or ``"incomplete"``
when that file is absent or unreadable (the run is still going, or was killed). Failed and
incomplete runs are kept, never dropped: the tables count and list them.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

# The results contract, defined once (torch-free) where the engine writes it.
from experiments.runfiles import (
    AP_NAMES,
    CONFIG_FILE,
    DONE,
    FAILED,
    MATCHES_FILE,
    METRICS_FILE,
    SNAPSHOT_FILE,
    STATS_FIELDS,
    STATS_FILE,
    canonical_assigner,
    parse_run_name,
    read_grid_file,
    read_metrics,
)

log = logging.getLogger(__name__)

INCOMPLETE = "incomplete"
AP_METRICS = AP_NAMES
# Per-run scalars taken from metrics.json into the runs frame, next to the AP metrics.
RUN_SCALARS = ("iou_pred_error", "images_per_second", "iters", "train_seconds", "peak_memory_mb")
STATS_COLUMNS = tuple(STATS_FIELDS)

_SNAPSHOT_KEY = re.compile(r"^gt_index_(?P<iter>\d+)$")


class ResultsError(Exception):
    """The grid directory is missing or holds no runs; the message says which, for the user."""


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One run directory ``results/<grid>/<run>/``.

    ``metrics`` is the parsed ``metrics.json`` ({} when absent); ``stats`` the parsed
    ``stats.csv`` with numeric columns (None when absent or empty).
    """

    name: str
    path: Path
    variant: str
    seed: int | None
    status: str
    error: str | None
    metrics: dict[str, Any]
    stats: pd.DataFrame | None

    @property
    def snapshot_path(self) -> Path:
        return self.path / SNAPSHOT_FILE

    @property
    def matches_path(self) -> Path:
        return self.path / MATCHES_FILE

    @property
    def assigner(self) -> str | None:
        """The assigner's registry name (older runs' ``iou`` reads as ``max_iou``)."""
        return canonical_assigner(self.metrics.get("assigner"))

    @property
    def environment(self) -> dict[str, Any] | None:
        env = self.metrics.get("environment")
        return env if isinstance(env, dict) else None


@dataclasses.dataclass(frozen=True, eq=False)
class AssignmentSnapshot:
    """The assignment of one fixed val image at several training iterations (``assignments.npz``).

    image: (H, W, 3) uint8. anchors: (A, 4) float xyxy pixels. num_anchors_per_level: (L,) int.
    gt_boxes: (G, 4) float xyxy pixels. gt_index: iteration -> (A,) int64, >= 0 the GT index the
    anchor is positive for, -1 negative, -2 ignored (the assigner contract's ``gt_index``).
    """

    image: np.ndarray
    anchors: np.ndarray
    num_anchors_per_level: np.ndarray
    gt_boxes: np.ndarray
    gt_index: dict[int, np.ndarray]

    @property
    def iterations(self) -> list[int]:
        return sorted(self.gt_index)


# ----------------------------------------------------------------------------- one run


def read_config(path: Path) -> dict[str, Any]:
    """The run's resolved config as a dict; {} when the file is absent or not a YAML mapping."""
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:  # ValueError: not UTF-8
        log.warning("ignoring unreadable %s: %s", path, exc)
        return {}
    return config if isinstance(config, dict) else {}


def _read_stats(path: Path) -> pd.DataFrame | None:
    """``stats.csv`` with every column numeric (unparsable cells NaN), or None when absent or empty."""
    if not path.is_file():
        return None
    try:
        stats = pd.read_csv(path)
    except (OSError, ValueError) as exc:  # pandas' EmptyDataError and ParserError are ValueErrors
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None
    if stats.empty or "iter" not in stats.columns:
        return None
    stats = stats.apply(pd.to_numeric, errors="coerce")
    return stats.dropna(subset=["iter"]).reset_index(drop=True)


def _variant(dir_name: str, config: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The run's variant label: metrics.json's ``variant``, else config.yaml's (a run that has not
    finished yet, or one written before metrics carried it), else the variant id of the run name."""
    for source in (metrics, config):
        if source.get("variant") not in (None, ""):
            return str(source["variant"])
    parsed = parse_run_name(dir_name)
    return parsed[0] if parsed else dir_name


def _seed(dir_name: str, config: dict[str, Any], metrics: dict[str, Any]) -> int | None:
    """metrics.json's ``seed``, else config.yaml's, else the ``-s<seed>`` of the run name (runfiles.run_name)."""
    for source in (metrics, config):
        try:
            return int(source["seed"])
        except (KeyError, TypeError, ValueError):
            continue
    parsed = parse_run_name(dir_name)
    return parsed[1] if parsed else None


def read_run(run_dir: Path) -> Run:
    """Read one run directory; absent or unreadable files never raise, they make the run incomplete."""
    run_dir = Path(run_dir)
    config = read_config(run_dir / CONFIG_FILE)
    metrics = read_metrics(run_dir / METRICS_FILE)
    if metrics is None and (run_dir / METRICS_FILE).is_file():
        log.warning("ignoring unreadable %s", run_dir / METRICS_FILE)
    if metrics is None:
        status, error = INCOMPLETE, None
    elif metrics.get("status") in (DONE, FAILED):
        status, error = metrics["status"], metrics.get("error")
    else:
        status, error = INCOMPLETE, f"metrics.json has status {metrics.get('status')!r}"
    metrics = metrics or {}
    return Run(
        name=run_dir.name,
        path=run_dir,
        variant=_variant(run_dir.name, config, metrics),
        seed=_seed(run_dir.name, config, metrics),
        status=status,
        error=None if error is None else str(error),
        metrics=metrics,
        stats=_read_stats(run_dir / STATS_FILE),
    )


def load_runs(grid_dir: Path) -> list[Run]:
    """Every run of a grid, sorted by (variant, seed, name).

    Each non-hidden sub-directory of ``grid_dir`` is a run, whatever files it holds yet.
    Raises ResultsError when ``grid_dir`` is not a directory or has no run directories.
    """
    grid_dir = Path(grid_dir)
    if not grid_dir.is_dir():
        raise ResultsError(f"{grid_dir} is not a directory (expected results/<grid>/ with one folder per run)")
    run_dirs = [p for p in grid_dir.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]
    if not run_dirs:
        raise ResultsError(f"{grid_dir} holds no run directories (expected results/<grid>/<run>/metrics.json, ...)")
    runs = [read_run(p) for p in run_dirs]
    return sorted(runs, key=lambda r: (r.variant, r.seed if r.seed is not None else -1, r.name))


def variant_order(grid_dir: Path, variants: list[str] | set[str]) -> list[str]:
    """The variants in the grid's order: as listed in ``grid.json``, else sorted by name.

    Variants that the file does not list follow, sorted by name; listed variants without a run
    are left out.
    """
    present = set(variants)
    listed: list[str] = []
    for name in read_grid_file(grid_dir)["variants"]:
        if name in present and name not in listed:
            listed.append(name)
    return listed + sorted(present - set(listed))


def grid_baseline(grid_dir: Path, order: list[str]) -> str | None:
    """The grid's baseline variant (``grid.json``), else the first variant in ``order``; None without variants."""
    baseline = read_grid_file(grid_dir)["baseline"]
    if baseline in order:
        return baseline
    return order[0] if order else None


# ----------------------------------------------------------------------------- frames


def _number(value: Any) -> float:
    """A metrics.json value as float; None, text and non-numbers become NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def runs_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per run: variant, seed, run, status, error, the AP metrics, RUN_SCALARS and
    ``positives_per_gt`` (the mean of stats.csv's ``pos_per_gt_mean`` over all logged rows)."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "variant": run.variant,
            "seed": run.seed,
            "run": run.name,
            "status": run.status,
            "error": run.error,
        }
        row.update({key: _number(run.metrics.get(key)) for key in (*AP_METRICS, *RUN_SCALARS)})
        has_positives = run.stats is not None and "pos_per_gt_mean" in run.stats.columns
        row["positives_per_gt"] = float(run.stats["pos_per_gt_mean"].mean()) if has_positives else float("nan")
        rows.append(row)
    columns = ["variant", "seed", "run", "status", "error", *AP_METRICS, *RUN_SCALARS, "positives_per_gt"]
    frame = pd.DataFrame(rows, columns=columns)
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


def stats_frame(runs: list[Run], statuses: tuple[str, ...] = (DONE,)) -> pd.DataFrame:
    """stats.csv of the runs with one of ``statuses``, stacked long: variant, seed, run, then its columns."""
    parts = [
        run.stats.assign(variant=run.variant, seed=run.seed, run=run.name)
        for run in runs
        if run.status in statuses and run.stats is not None
    ]
    if not parts:
        return pd.DataFrame(columns=["variant", "seed", "run", *STATS_COLUMNS])
    frame = pd.concat(parts, ignore_index=True)
    leading = ["variant", "seed", "run"]
    return frame[leading + [c for c in frame.columns if c not in leading]]


def ap_curve_frame(runs: list[Run], statuses: tuple[str, ...] = (DONE,)) -> pd.DataFrame:
    """metrics.json ``ap_curve`` of the runs with one of ``statuses``, long: variant, seed, run, iter, AP.

    Points with a null or non-numeric AP are dropped.
    """
    rows = []
    for run in runs:
        if run.status not in statuses:
            continue
        for point in run.metrics.get("ap_curve") or []:
            if isinstance(point, list | tuple) and len(point) == 2:
                rows.append((run.variant, run.seed, run.name, _number(point[0]), _number(point[1])))
    frame = pd.DataFrame(rows, columns=["variant", "seed", "run", "iter", "AP"])
    return frame.dropna(subset=["iter", "AP"]).reset_index(drop=True)


# ----------------------------------------------------------------------------- assignment snapshots


def load_snapshot(path: Path) -> AssignmentSnapshot | None:
    """Read ``assignments.npz``; None (with a log note) when absent, unreadable or incomplete.

    Iterations whose ``gt_index`` length differs from the number of anchors are dropped.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path) as arrays:
            files = {key: arrays[key] for key in arrays.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc)
        return None
    required = ("image", "anchors", "num_anchors_per_level", "gt_boxes")
    if any(key not in files for key in required):
        log.warning("ignoring %s: it lacks one of %s", path, required)
        return None
    anchors = np.asarray(files["anchors"], dtype=np.float64).reshape(-1, 4)
    gt_index = {}
    for key, value in files.items():
        match = _SNAPSHOT_KEY.match(key)
        if match and value.shape == (len(anchors),):
            gt_index[int(match["iter"])] = value.astype(np.int64)
    if not gt_index:
        log.warning("ignoring %s: no gt_index_<iter> array matches its %d anchors", path, len(anchors))
        return None
    return AssignmentSnapshot(
        image=np.asarray(files["image"]),
        anchors=anchors,
        num_anchors_per_level=np.asarray(files["num_anchors_per_level"]),
        gt_boxes=np.asarray(files["gt_boxes"], dtype=np.float64).reshape(-1, 4),
        gt_index=gt_index,
    )
