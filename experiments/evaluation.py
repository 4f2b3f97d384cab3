"""Evaluation: detections -> COCO results JSON -> COCOeval (pycocotools or faster-coco-eval).

AP values are returned in percent, as papers print them. ``iou_pred_error`` is the paper's
Table 2 (right) figure: each detection is matched to the GT it overlaps most, and the
mean |predicted IoU - true IoU| over detections with true IoU >= 0.5 is reported.
"""

from __future__ import annotations

import contextlib
import copy
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


@torch.no_grad()
def run_inference(model, loader, device, scorer, inference_cfg: dict, label_to_category_id, autocast_dtype=None):
    """Detections of ``model`` over ``loader`` as COCO results plus the IoU-prediction error.

    Returns (results list, iou_pred_error or None). The error is None unless the scorer
    predicts IoU (``scorer.predicts_iou``).
    """
    from detector import postprocess

    from .trainer import autocast

    inference_cfg = {key: value for key, value in inference_cfg.items() if key != "tta"}  # see experiments.tta
    model.eval()
    results: list[dict] = []
    err_sum, err_count = 0.0, 0
    track_iou = scorer.predicts_iou
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        with autocast(device, autocast_dtype):
            out = model(images)
        sizes = [tuple(t["size"]) for t in targets]
        dets = postprocess(out, sizes, scorer, **inference_cfg)
        for det, tgt in zip(dets, targets):
            results.extend(detections_to_coco(det, tgt["image_id"], tgt["scale"], label_to_category_id))
            if track_iou and det.get("quality") is not None:
                s, n = iou_prediction_error(det["boxes"].cpu(), det["quality"].cpu(), tgt["boxes"])
                err_sum += s
                err_count += n
    model.train()
    iou_err = (err_sum / err_count if err_count else float("nan")) if track_iou else None
    return results, iou_err


def summarize_ap(values: dict[str, float]) -> str:
    return "  ".join(f"{k} {values[k]:.1f}" if values[k] is not None else f"{k} -" for k in AP_NAMES)


__all__ = [
    "AP_NAMES",
    "BACKENDS",
    "coco_evaluate",
    "detections_to_coco",
    "iou_prediction_error",
    "run_inference",
    "summarize_ap",
]
