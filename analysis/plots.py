"""Seaborn plots of a grid: positives per GT, AP per variant, AP during training, assignments.

Each function takes the long frames of ``analysis.runs`` and a target path, writes one PNG and
returns its path, or returns None (with a log note) when it has no data to draw. Figures are
built as ``matplotlib.figure.Figure`` objects and saved with the Agg renderer, so no pyplot
state or global backend is touched and no figure is left open.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from analysis.runs import DONE, AssignmentSnapshot

log = logging.getLogger(__name__)

DPI = 120
GT_COLOR = "deepskyblue"
POSITIVE_COLOR = "lime"
IGNORED_COLOR = "orange"


def variant_palette(order: list[str]) -> dict[str, tuple[float, float, float]]:
    """One colour per variant, the same in every plot of a report."""
    colors = sns.color_palette("tab10" if len(order) <= 10 else "husl", len(order))
    return dict(zip(order, colors))


def _present(order: list[str], frame: pd.DataFrame) -> list[str]:
    """The variants of ``order`` that have rows in ``frame``, in that order."""
    present = set(frame["variant"])
    return [v for v in order if v in present]


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    return path


def _floor_at_zero(ax) -> None:
    """AP is never negative: keep matplotlib's automatic margin from going below 0."""
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, 0.0), high)


def _skip(path: Path, reason: str) -> None:
    """Note a skipped plot and remove the file a previous report left, which would now be stale."""
    log.info("skipped %s: %s", Path(path).name, reason)
    Path(path).unlink(missing_ok=True)


def plot_positives(stats: pd.DataFrame, order: list[str], path: Path) -> Path | None:
    """Mean positives per GT against iteration, one line per variant with a ±1 sd band over
    seeds (PAA paper Fig. 4b); a second panel shows GTs without any positive when any is > 0.

    ``stats``: ``analysis.runs.stats_frame`` (variant, seed, iter, pos_per_gt_mean, gt_without_pos, ...).
    """
    if stats.empty or "pos_per_gt_mean" not in stats or stats["pos_per_gt_mean"].notna().sum() == 0:
        _skip(path, "no stats.csv rows of done runs")
        return None
    stats = stats.dropna(subset=["pos_per_gt_mean"])
    hue_order = _present(order, stats)
    palette = variant_palette(order)
    show_missing = "gt_without_pos" in stats and stats["gt_without_pos"].fillna(0).gt(0).any()
    panels = [("pos_per_gt_mean", "positives per GT (mean)", "Positive anchors per GT")]
    if show_missing:
        panels.append(("gt_without_pos", "GTs without a positive", "GTs left without positives"))
    fig = Figure(figsize=(6.0 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (column, ylabel, title) in zip(axes, panels):
        sns.lineplot(
            data=stats,
            x="iter",
            y=column,
            hue="variant",
            hue_order=hue_order,
            palette=palette,
            errorbar="sd",
            ax=ax,
        )
        ax.set(xlabel="iteration", ylabel=ylabel, title=f"{title} (band: ±1 sd over seeds)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
    return _save(fig, path)


def plot_ap(runs: pd.DataFrame, order: list[str], path: Path) -> Path | None:
    """AP per variant: each done run's AP as a dot, and mean ± sample sd over seeds as a black bar.

    ``runs``: ``analysis.runs.runs_frame``. Tick labels carry "mean ± sd (n seeds)". The dots are a
    swarm rather than a jittered strip, so they never overlap and the PNG is the same on every run.
    """
    done = runs[(runs["status"] == DONE) & runs["AP"].notna()]
    if done.empty:
        _skip(path, "no done run with an AP")
        return None
    variants = _present(order, done)
    palette = variant_palette(order)
    fig = Figure(figsize=(max(4.5, 1.3 * len(variants) + 2.0), 4.2), layout="constrained")
    ax = fig.subplots()
    # The mean ± sd bar first, so that the seeds' dots are drawn over it.
    sns.pointplot(
        data=done,
        x="variant",
        y="AP",
        order=variants,
        color="black",
        errorbar="sd",
        capsize=0.15,
        linestyle="none",
        marker="_",
        markersize=18,
        ax=ax,
    )
    sns.swarmplot(
        data=done,
        x="variant",
        y="AP",
        order=variants,
        hue="variant",
        hue_order=variants,
        palette=palette,
        size=7,
        edgecolor="white",
        linewidth=0.6,
        legend=False,
        ax=ax,
    )
    labels = []
    for variant in variants:
        values = done.loc[done["variant"] == variant, "AP"]
        spread = f" ± {values.std(ddof=1):.1f}" if len(values) > 1 else ""
        labels.append(f"{variant}\n{values.mean():.1f}{spread} (n={len(values)})")
    ax.set_xticks(range(len(variants)), labels, rotation=30 if len(variants) > 4 else 0)
    ax.set(xlabel="", ylabel="AP (%)", title="AP per variant (dots: seeds; bar: mean ± sd)")
    _floor_at_zero(ax)
    return _save(fig, path)


def plot_ap_curve(curves: pd.DataFrame, order: list[str], path: Path) -> Path | None:
    """AP against training iteration per variant (metrics.json ``ap_curve``), ±1 sd band over seeds.

    ``curves``: ``analysis.runs.ap_curve_frame`` (variant, seed, iter, AP).
    """
    if curves.empty:
        _skip(path, "no ap_curve points in the done runs' metrics.json")
        return None
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    sns.lineplot(
        data=curves,
        x="iter",
        y="AP",
        hue="variant",
        hue_order=_present(order, curves),
        palette=variant_palette(order),
        errorbar="sd",
        marker="o",
        ax=ax,
    )
    ax.set(xlabel="iteration", ylabel="AP (%)", title="AP during training (band: ±1 sd over seeds)")
    _floor_at_zero(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


# ----------------------------------------------------------------------------- assignments


def pick_iterations(iterations: list[int], limit: int) -> list[int]:
    """At most ``limit`` evenly spaced iterations, always keeping the first and the last."""
    if len(iterations) <= limit:
        return list(iterations)
    # With more iterations than the limit the spacing exceeds 1, so the rounded indices are distinct.
    picks = np.linspace(0, len(iterations) - 1, limit).round().astype(int)
    return [iterations[i] for i in picks]


def _boxes(boxes: np.ndarray, **style) -> PatchCollection:
    """Outlines of (N, 4) xyxy boxes as one collection (one draw call, not N patches)."""
    rects = [Rectangle((x1, y1), x2 - x1, y2 - y1) for x1, y1, x2, y2 in boxes]
    return PatchCollection(rects, facecolor="none", **style)


def draw_assignment(ax, snapshot: AssignmentSnapshot, iteration: int) -> None:
    """One panel in the style of PAA paper Fig. 4a: the image, its GT boxes, the centres of the
    positive anchors (with their anchor boxes) and of the ignored anchors; negatives are not drawn."""
    image = snapshot.image
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
    height, width = image.shape[:2]
    gt_index = snapshot.gt_index[iteration]
    centres = (snapshot.anchors[:, :2] + snapshot.anchors[:, 2:]) / 2
    positive, ignored = gt_index >= 0, gt_index == -2
    ax.add_collection(_boxes(snapshot.anchors[positive], edgecolor=POSITIVE_COLOR, linewidth=0.6, alpha=0.6))
    ax.add_collection(_boxes(snapshot.gt_boxes, edgecolor=GT_COLOR, linewidth=1.6))
    ax.scatter(*centres[ignored].T, s=9, marker="x", color=IGNORED_COLOR, linewidths=0.8)
    ax.scatter(*centres[positive].T, s=14, color=POSITIVE_COLOR, edgecolors="black", linewidths=0.4)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"iter {iteration}: {int(positive.sum())} pos, {int(ignored.sum())} ign", fontsize=9)


def plot_assignments(rows: list[tuple[str, AssignmentSnapshot]], path: Path, max_columns: int = 4) -> Path | None:
    """A grid of ``draw_assignment`` panels: one row per (label, snapshot), one column per recorded
    iteration (at most ``max_columns``, evenly spaced)."""
    if not rows:
        _skip(path, "no run has an assignments.npz")
        return None
    picked = [pick_iterations(snapshot.iterations, max_columns) for _, snapshot in rows]
    num_columns = max(len(iterations) for iterations in picked)
    height, width = rows[0][1].image.shape[:2]
    panel = 3.0
    fig = Figure(figsize=(panel * num_columns + 0.4, panel * height / width * len(rows) + 0.9), layout="constrained")
    axes = fig.subplots(len(rows), num_columns, squeeze=False)
    for axes_row, (label, snapshot), iterations in zip(axes, rows, picked):
        for ax, iteration in zip(axes_row, iterations):
            draw_assignment(ax, snapshot, iteration)
        for ax in axes_row[len(iterations) :]:
            ax.set_axis_off()
        axes_row[0].set_ylabel(label, fontsize=10)
    legend = [
        Line2D([], [], color=GT_COLOR, linewidth=1.6, label="GT box"),
        Line2D(
            [],
            [],
            color=POSITIVE_COLOR,
            marker="o",
            markeredgecolor="black",
            linestyle="-",
            linewidth=0.6,
            label="positive anchor (centre, box)",
        ),
        Line2D([], [], color=IGNORED_COLOR, marker="x", linestyle="none", label="ignored anchor"),
    ]
    fig.legend(handles=legend, loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    fig.suptitle("Anchor assignment of one val image during training (negatives not drawn)", fontsize=11)
    return _save(fig, path)
