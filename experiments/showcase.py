"""The val images a report shows (detections, assignment snapshots): a fixed choice, made from the
annotations alone, of images with several objects of varied shape, not one lone digit.

Torch-free, so the report side (``analysis.show``) and the training side (``experiments.snapshots``)
choose the same images.
"""

from __future__ import annotations

import math
from typing import Any


def showcase_image_ids(coco: Any, count: int = 4, min_objects: int = 3) -> list[int]:
    """``count`` image ids of a pycocotools ``COCO``: the images with at least ``min_objects`` non-crowd
    boxes, by the spread of their boxes' aspect ratios (max / min of width / height), then by their number
    of boxes, both decreasing, then by id; images with fewer boxes follow, by number of boxes, if needed."""
    ranked = []
    for image in coco.dataset.get("images", []):
        boxes = [a["bbox"] for a in coco.imgToAnns.get(image["id"], []) if not a.get("iscrowd", 0)]
        aspects = [math.log(w / h) for _, _, w, h in boxes if w > 0 and h > 0]
        spread = max(aspects) - min(aspects) if aspects else 0.0
        ranked.append((len(boxes) >= min_objects, spread if len(boxes) >= min_objects else 0.0, len(boxes), -image["id"]))
    ranked.sort(reverse=True)
    return [-key[3] for key in ranked[:count]]


__all__ = ["showcase_image_ids"]
