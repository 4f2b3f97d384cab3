"""``assignbench-show RUN_DIR [RUN_DIR ...]``: the same val images with each run's detections, side by side.

    assignbench-show results/runs/demo/iou_none-s0 results/runs/demo/paa_iou-s0 --out detections.png

Rows are the showcase images (``experiments.showcase``: several objects of varied shape, the image the
assignment snapshots show first), columns the runs; each panel has the GT boxes (white, dashed) and the
run's detections scoring at least ``--score`` (coloured by class, with class and score). The detections
come from each run's ``detections.json`` (kept by every run, not committed), the images and GT from the
val annotation file its ``metrics.json`` names. A grid's report draws ``detections.png`` this way from
the lowest seed of each variant.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from analysis.plots import _save
from analysis.runs import ResultsError
from experiments.runfiles import RunPaths, read_metrics, val_annotation_file
from experiments.showcase import showcase_image_ids

DEFAULT_SCORE = 0.3
DEFAULT_IMAGES = 4
PANEL_INCHES = 2.2  # 264 px at the reports' 120 dpi, twice a digits image


def val_annotations(run_dir: Path) -> Path:
    """The val annotation file a run was evaluated on (``metrics.json`` environment); ResultsError if unknown."""
    try:
        return val_annotation_file(run_dir)
    except FileNotFoundError as exc:
        raise ResultsError(str(exc)) from exc


def image_dir_of(ann_file: Path) -> Path:
    """``<root>/annotations/instances_<split>.json`` -> ``<root>/<split>`` (digits ``val``, COCO ``val2017``)."""
    split = ann_file.stem.removeprefix("instances_")
    return ann_file.parent.parent / split


def load_detections(run_dir: Path) -> list[dict]:
    path = RunPaths(run_dir).detections
    if not path.is_file():
        raise ResultsError(f"{run_dir}: no {path.name} (it is written when a run finishes; not committed)")
    return json.loads(path.read_text())


def draw_detections(run_dirs: list[Path], out: Path, score: float = DEFAULT_SCORE, images: int = DEFAULT_IMAGES) -> Path:
    """The figure of the module docstring for ``run_dirs`` (all evaluated on the same val set) into ``out``."""
    from pycocotools.coco import COCO

    if not run_dirs:
        raise ResultsError("no run to show")
    ann_file = val_annotations(run_dirs[0])
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_file))
    image_ids = showcase_image_ids(coco, images)
    labels = [(read_metrics(RunPaths(r).metrics) or {}).get("variant") or r.name for r in run_dirs]
    detections = [load_detections(r) for r in run_dirs]
    categories = sorted(coco.cats)
    colours = dict(zip(categories, sns.color_palette("tab10" if len(categories) <= 10 else "husl", len(categories))))
    fig = Figure(figsize=(PANEL_INCHES * len(run_dirs), PANEL_INCHES * len(image_ids)), layout="constrained")
    axes = np.asarray(fig.subplots(len(image_ids), len(run_dirs), squeeze=False))
    for row, image_id in enumerate(image_ids):
        info = coco.imgs[image_id]
        pixels = np.asarray(Image.open(image_dir_of(ann_file) / info["file_name"]).convert("RGB"))
        gts = [a for a in coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        for column, (label, dets) in enumerate(zip(labels, detections)):
            ax = axes[row, column]
            ax.imshow(pixels, interpolation="nearest")  # pixel blocks: the pixels as they are (and half the PNG size)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(label, fontsize=9)
            for a in gts:
                x, y, w, h = a["bbox"]
                ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="white", linestyle="--", linewidth=1.0))
            for d in dets:
                if d["image_id"] != image_id or d["score"] < score:
                    continue
                x, y, w, h = d["bbox"]
                colour = colours.get(d["category_id"], "red")
                ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=1.2))
                ax.text(x, y, f"{coco.cats[d['category_id']]['name']} {d['score']:.2f}", fontsize=6, color="black",
                        va="bottom", bbox={"facecolor": colour, "alpha": 0.7, "pad": 0.5, "linewidth": 0})
    fig.suptitle(f"detections with score >= {score} (GT dashed white)", fontsize=10)
    return _save(fig, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="assignbench-show", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished runs evaluated on the same val set")
    parser.add_argument("--out", type=Path, help="output PNG (default: detections.png beside the first run)")
    parser.add_argument("--score", type=float, default=DEFAULT_SCORE, help="lowest detection score drawn")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help="how many showcase images")
    args = parser.parse_args(argv)
    out = args.out or args.run_dirs[0].parent / "detections.png"
    try:
        path = draw_detections(args.run_dirs, out, args.score, args.images)
    except ResultsError as exc:
        print(f"assignbench-show: error: {exc}", file=sys.stderr)
        return 1
    print(f"[assignbench] wrote {path}")
    return 0


__all__ = ["draw_detections", "image_dir_of", "main", "val_annotations"]

if __name__ == "__main__":
    sys.exit(main())
