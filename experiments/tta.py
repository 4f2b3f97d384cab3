"""Multi-scale and flip testing over a val set (``inference.tta``; the merge rules are ``detector.tta``).

Transforms, as the official ``im_detect_bbox_aug_vote`` (kkhoot/PAA ``paa_core/engine/bbox_aug_vote.py``):
the test size itself; its horizontal mirror (``flip``); each of ``scales`` (shorter side in pixels,
longer side capped at the schedule's test ``max_size`` when the scale is below the test size, else
at ``tta.max_size``), with its mirror (``scale_flip``) and, when ``scale_ranges`` is given, only the
boxes whose area in that scale's pixels lies in (lo^2, hi^2). Images are read and resized from
their files for every scale (as the test pipeline does); mirrors flip the resized pixels. Every
transform runs the plain post-processing (NMS, score voting as configured); the detections are
mapped to the original image and merged per image (``detector.tta.merge_detections``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from detector import postprocess
from detector.tta import MERGES, in_area_range, merge_detections

from .data.coco import hflip_boxes
from .errors import ConfigError
from .evaluation import ImageDetections, detections_to_coco, iou_prediction_error, postprocess_settings


@dataclass(frozen=True)
class Transform:
    """One test transform: the shorter side and the cap of the longer side (pixels), mirrored or not,
    and the (low, high) side range of the boxes kept from it (None: all)."""

    min_size: int
    max_size: int
    flip: bool
    area_range: tuple[float, float] | None = None


def tta_transforms(tta: dict[str, Any], test_min_size: int, test_max_size: int) -> list[Transform]:
    """The transforms ``tta`` asks for, the identity first; ConfigError for inconsistent settings."""
    scales = [int(s) for s in tta.get("scales") or []]
    ranges = tta.get("scale_ranges")
    if ranges is not None and len(ranges) != len(scales):
        raise ConfigError(f"inference.tta.scale_ranges has {len(ranges)} entries for {len(scales)} scales")
    if tta.get("merge", "soft-vote") not in MERGES:
        raise ConfigError(f"inference.tta.merge must be one of {', '.join(MERGES)}, got {tta.get('merge')!r}")
    large_max = int(tta.get("max_size") or test_max_size)
    transforms = [Transform(test_min_size, test_max_size, False)]
    if tta.get("flip", False):
        transforms.append(Transform(test_min_size, test_max_size, True))
    for index, scale in enumerate(scales):
        max_size = test_max_size if scale < test_min_size else large_max
        area_range = None if ranges is None else (float(ranges[index][0]), float(ranges[index][1]))
        transforms.append(Transform(scale, max_size, False, area_range))
        if tta.get("scale_flip", False):
            transforms.append(Transform(scale, max_size, True, area_range))
    return transforms


def resized_view(val_set, min_size: int, max_size: int):
    """The same images and order as ``val_set`` (a ``CocoDetection`` or a ``Subset`` of one), resized for
    shorter side ``min_size`` and longer side at most ``max_size``."""
    if isinstance(val_set, torch.utils.data.Subset):
        return torch.utils.data.Subset(resized_view(val_set.dataset, min_size, max_size), val_set.indices)
    view = copy.copy(val_set)
    view.min_sizes, view.max_size = [int(min_size)], int(max_size)
    return view


def mirror_valid_areas(images: torch.Tensor, sizes: list[tuple[int, int]]) -> torch.Tensor:
    """The padded batch with each image's valid (h, w) area mirrored left-right (padding stays bottom-right)."""
    mirrored = images.clone()
    for slot, (height, width) in enumerate(sizes):
        mirrored[slot, :, :height, :width] = images[slot, :, :height, :width].flip(-1)
    return mirrored


@torch.no_grad()
def run_tta_inference(model, val_set, loader_for, device, scorer, inference_cfg: dict, test_sizes: tuple[int, int],
                      label_to_category_id, autocast_dtype=None) -> list[ImageDetections]:
    """Detections of ``model`` on ``val_set`` under ``inference_cfg["tta"]``, one ``ImageDetections`` per image
    in ``val_set`` order; the IoU-prediction error terms are those of the identity transform's detections
    (filled in when the scorer predicts IoU).

    loader_for: dataset -> its evaluation DataLoader (``build.build_val_loader``).
    """
    from .trainer import autocast

    tta = dict(inference_cfg["tta"])
    post_cfg = postprocess_settings(inference_cfg)
    pooled: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}  # in val_set order
    iou_errors: dict[int, tuple[float, int]] = {}
    model.eval()
    for index, transform in enumerate(tta_transforms(tta, *test_sizes)):
        for images, targets in loader_for(resized_view(val_set, transform.min_size, transform.max_size)):
            sizes = [tuple(t["size"]) for t in targets]
            if transform.flip:
                images = mirror_valid_areas(images, sizes)
            with autocast(device, autocast_dtype):
                out = model(images.to(device, non_blocking=True))
            for det, target, (_, width) in zip(postprocess(out, sizes, scorer, **post_cfg), targets, sizes):
                boxes = hflip_boxes(det["boxes"], width) if transform.flip else det["boxes"]
                keep = torch.ones_like(det["scores"], dtype=torch.bool)
                if transform.area_range is not None:
                    keep = in_area_range(boxes, *transform.area_range)
                pooled.setdefault(int(target["image_id"]), []).append(
                    ((boxes[keep] / float(target["scale"])).cpu(), det["scores"][keep].cpu(), det["labels"][keep].cpu()))
                if index == 0 and scorer.predicts_iou and det.get("quality") is not None:
                    iou_errors[int(target["image_id"])] = iou_prediction_error(
                        det["boxes"].cpu(), det["quality"].cpu(), target["boxes"])
    model.train()
    images_out: list[ImageDetections] = []
    for image_id, parts in pooled.items():
        boxes, scores, labels = (torch.cat(p) for p in zip(*parts))
        merged = merge_detections(boxes, scores, labels, merge=str(tta.get("merge", "soft-vote")),
                                  vote_thresh=float(tta.get("vote_thresh", 0.66)),
                                  nms_thresh=float(post_cfg.get("nms_thresh", 0.6)),
                                  score_thresh=float(post_cfg.get("score_thresh", 0.05)),
                                  max_det=int(tta.get("max_det", 1000)))
        images_out.append(ImageDetections(detections_to_coco(merged, image_id, 1.0, label_to_category_id),
                                          *iou_errors.get(image_id, (0.0, 0))))
    return images_out


__all__ = ["Transform", "mirror_valid_areas", "resized_view", "run_tta_inference", "tta_transforms"]
