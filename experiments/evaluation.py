"""Evaluation: detections -> COCO results JSON -> COCOeval (pycocotools or faster-coco-eval).

AP values are returned in percent, as papers print them. ``iou_pred_error`` is the paper's
Table 2 (right) figure: each detection is matched to the GT it overlaps most, and the
mean |predicted IoU - true IoU| over detections with true IoU >= 0.5 is reported.

Inference yields one ``ImageDetections`` per image, so that the images of a val set sharded over
ranks (``experiments.engine.make_evaluator``) can be gathered and put back in order before
``combine_images`` makes the results and the error of the whole set.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
from typing import Any

import torch
from torchvision.ops import box_iou

from .matches import no_detections
from .runfiles import AP_NAMES

BACKENDS = ("pycocotools", "faster")


def coco_evaluate(coco_gt, results: list[dict[str, Any]], backend: str = "pycocotools") -> dict[str, float]:
    """Run bbox COCOeval of ``results`` (COCO results-format dicts) against ``coco_gt``.

    coco_gt: a pycocotools ``COCO`` holding the ground truth.
    Returns the six AP numbers in percent (None for an area range without GT). An empty
    ``results`` is scored by pycocotools' COCOeval whatever the backend: 0, or None where no GT
    is scored.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown eval.backend '{backend}'; valid choices: {', '.join(BACKENDS)}")
    if backend == "pycocotools" or not results:
        from pycocotools.cocoeval import COCOeval

        gt = coco_gt
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(copy.deepcopy(results)) if results else no_detections(gt)
            ev = COCOeval(gt, dt, "bbox")
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = ev.stats
    else:
        try:
            from faster_coco_eval import COCO as FastCOCO
            from faster_coco_eval import COCOeval_faster
        except ImportError as exc:  # pragma: no cover - depends on the optional extra
            raise ImportError("eval.backend=faster needs the 'fast' extra: pip install 'assignbench[fast]'") from exc
        with contextlib.redirect_stdout(io.StringIO()):
            gt = FastCOCO(copy.deepcopy(coco_gt.dataset))
            dt = gt.loadRes(copy.deepcopy(results))
            ev = COCOeval_faster(gt, dt, "bbox", print_function=lambda *a, **k: None)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        stats = ev.stats
    # COCOeval reports -1 for an area range without any GT (e.g. APl on small images): null.
    return {name: (float(stats[i]) * 100.0 if stats[i] >= 0 else None) for i, name in enumerate(AP_NAMES)}


def iou_prediction_error(
    det_boxes: torch.Tensor, det_quality: torch.Tensor, gt_boxes: torch.Tensor, min_iou: float = 0.5
) -> tuple[float, int]:
    """Sum of |predicted IoU - true IoU| and the count, for one image.

    det_boxes: (N, 4) xyxy; det_quality: (N,) predicted IoU in [0, 1]; gt_boxes: (G, 4) xyxy,
    same coordinates. Each detection is matched to the GT it overlaps most; only detections
    whose true IoU >= ``min_iou`` count.
    """
    if det_boxes.numel() == 0 or gt_boxes.numel() == 0:
        return 0.0, 0
    true_iou = box_iou(det_boxes.float(), gt_boxes.float()).max(dim=1).values
    keep = true_iou >= min_iou
    err = (det_quality.float()[keep] - true_iou[keep]).abs()
    return float(err.sum()), int(keep.sum())


def detections_to_coco(dets: dict[str, torch.Tensor], image_id: int, scale: float, label_to_category_id) -> list[dict]:
    """Convert one image's detections (resized-image xyxy) to COCO results dicts (original xywh)."""
    boxes = dets["boxes"].detach().float().cpu() / scale
    scores = dets["scores"].detach().float().cpu()
    labels = dets["labels"].detach().cpu()
    out = []
    xywh = boxes.clone()
    xywh[:, 2:] -= xywh[:, :2]
    for b, s, lab in zip(xywh.tolist(), scores.tolist(), labels.tolist()):
        out.append(
            {
                "image_id": int(image_id),
                "category_id": int(label_to_category_id[int(lab)]),
                "bbox": [round(v, 3) for v in b],
                "score": round(float(s), 5),
            }
        )
    return out


@dataclasses.dataclass
class ImageDetections:
    """One val image's detections as COCO results dicts, and its terms of the IoU-prediction error
    (``iou_prediction_error``: the sum and the count; 0 and 0 unless the scorer predicts IoU)."""

    results: list[dict]
    iou_error_sum: float = 0.0
    iou_error_count: int = 0


def postprocess_settings(inference_cfg: dict) -> dict:
    """The ``inference`` config as ``detector.postprocess`` takes it: without ``tta`` (``experiments.tta``)."""
    return {key: value for key, value in inference_cfg.items() if key != "tta"}


@torch.no_grad()
def run_inference(model, loader, device, scorer, inference_cfg: dict, label_to_category_id,
                  autocast_dtype=None) -> list[ImageDetections]:
    """Detections of ``model`` over ``loader``, one ``ImageDetections`` per image in loader order.

    The IoU-prediction error terms are filled in when the scorer predicts IoU (``scorer.predicts_iou``).
    ``combine_images`` turns the list into COCO results and the error.
    """
    from detector import postprocess

    from .trainer import autocast

    inference_cfg = postprocess_settings(inference_cfg)
    model.eval()
    images_out: list[ImageDetections] = []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        with autocast(device, autocast_dtype):
            out = model(images)
        sizes = [tuple(t["size"]) for t in targets]
        dets = postprocess(out, sizes, scorer, **inference_cfg)
        for det, tgt in zip(dets, targets):
            image = ImageDetections(detections_to_coco(det, tgt["image_id"], tgt["scale"], label_to_category_id))
            if scorer.predicts_iou and det.get("quality") is not None:
                image.iou_error_sum, image.iou_error_count = iou_prediction_error(
                    det["boxes"].cpu(), det["quality"].cpu(), tgt["boxes"])
            images_out.append(image)
    model.train()
    return images_out


def combine_images(images: list[ImageDetections], predicts_iou: bool) -> tuple[list[dict], float | None]:
    """(COCO results of every image, in order; the mean IoU-prediction error over them, NaN without a
    detection that counts, None unless the scorer ``predicts_iou``)."""
    results: list[dict] = []
    error_sum, error_count = 0.0, 0
    for image in images:
        results.extend(image.results)
        error_sum += image.iou_error_sum
        error_count += image.iou_error_count
    if not predicts_iou:
        return results, None
    return results, (error_sum / error_count if error_count else float("nan"))


def summarize_ap(values: dict[str, float]) -> str:
    return "  ".join(f"{k} {values[k]:.1f}" if values[k] is not None else f"{k} -" for k in AP_NAMES)


__all__ = [
    "AP_NAMES",
    "BACKENDS",
    "ImageDetections",
    "coco_evaluate",
    "combine_images",
    "detections_to_coco",
    "iou_prediction_error",
    "run_inference",
    "summarize_ap",
]
