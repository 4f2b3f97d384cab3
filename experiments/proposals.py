"""Proposal recall of a two-stage model: AR@100 and AR@1000 of its RPN proposals, scored by COCOeval.

The proposals of every val image are COCO results (original-image xywh, the proposal score), scored as
class-agnostic boxes: ``COCOeval(..., "bbox")`` with ``useCats = 0`` and ``maxDets = [100, 1000]``; the
recall at IoU 0.50:0.95, averaged over the ten thresholds, over all object sizes, is COCO's AR (the
``AR@100`` line of ``summarize``). Only the "all" area range is evaluated: the per-size ranges are not
reported and would quadruple COCOeval's matching time. Values in percent, None when the val set has no GT.

``ProposalRecorder`` collects the proposals during the evaluation's inference pass, so AR costs no second
pass over the val set: it stands in for the model and the loader given to ``run_inference``.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .matches import no_detections
from .runfiles import PROPOSAL_AR_NAMES

MAX_PROPOSALS = (100, 1000)  # COCOeval maxDets of PROPOSAL_AR_NAMES, in that order
ALL_AREAS = [0.0, 1e5**2]  # COCOeval's "all" area range


def proposals_to_coco(boxes: torch.Tensor, scores: torch.Tensor, image_id: int, scale: float,
                      category_id: int) -> list[dict[str, Any]]:
    """One image's (N, 4) xyxy proposals of the resized image and their (N,) scores as COCO results in
    the original image (divided by ``scale``), under ``category_id`` (any category: the recall ignores it)."""
    xywh = boxes.detach().float().cpu() / scale
    xywh[:, 2:] -= xywh[:, :2]
    return [{"image_id": int(image_id), "category_id": int(category_id), "bbox": [round(v, 3) for v in box],
             "score": round(float(score), 5)} for box, score in zip(xywh.tolist(), scores.detach().float().cpu().tolist())]


def proposal_recall(coco_gt, proposals: list[dict[str, Any]], backend: str = "pycocotools") -> dict[str, float | None]:
    """{"AR100": ..., "AR1000": ...} of class-agnostic ``proposals`` (COCO results) against ``coco_gt``.

    backend: "pycocotools" (default) or "faster" (faster-coco-eval, the same evaluation in C++); an empty
    ``proposals`` list is scored by pycocotools (recall 0). The dicts are handed to ``loadRes`` as they are
    (it adds ``id``, ``area`` and ``iscrowd`` to them): a val set's proposals are too many to copy first.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster" and proposals:
            from faster_coco_eval import COCO as FastCOCO
            from faster_coco_eval import COCOeval_faster as COCOeval

            gt = FastCOCO(copy.deepcopy(coco_gt.dataset))
        else:
            from pycocotools.cocoeval import COCOeval

            gt = coco_gt
        dt = gt.loadRes(proposals) if proposals else no_detections(gt)
        evaluation = COCOeval(gt, dt, "bbox")
        evaluation.params.useCats = 0
        evaluation.params.maxDets = list(MAX_PROPOSALS)
        evaluation.params.areaRng = [ALL_AREAS]
        evaluation.params.areaRngLbl = ["all"]
        evaluation.evaluate()
        evaluation.accumulate()
    recall = evaluation.eval["recall"]  # (IoU thresholds, categories = 1, areas = 1, maxDets)
    result: dict[str, float | None] = {}
    for index, name in enumerate(PROPOSAL_AR_NAMES):
        values = recall[:, 0, 0, index]
        values = values[values > -1]  # -1: no GT
        result[name] = float(values.mean()) * 100.0 if values.size else None
    return result


class ProposalRecorder:
    """Collects a two-stage model's proposals over one inference pass, per image in loader order.

    ``watch(loader)`` yields the loader's batches and notes each image's id and scale; calling the
    recorder as the model (``recorder(images)``) runs the model and notes each image's proposals (the
    best ``MAX_PROPOSALS[-1]``);
    ``eval``/``train`` are the model's. ``take()`` returns what was noted, one list of COCO results per
    image, and forgets it.
    """

    def __init__(self, model: torch.nn.Module, category_id: int):
        self.model = model
        self.category_id = int(category_id)
        self._images: list[tuple[int, float]] = []
        self._proposals: list[tuple[torch.Tensor, torch.Tensor]] = []

    def eval(self) -> ProposalRecorder:
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> ProposalRecorder:
        self.model.train(mode)
        return self

    def __call__(self, images: torch.Tensor):
        out = self.model(images)
        # The best MAX_PROPOSALS[-1] of each image (proposals come best first): COCOeval reads no more.
        keep = MAX_PROPOSALS[-1]
        self._proposals.extend((boxes[:keep].cpu(), scores[:keep].cpu())
                               for boxes, scores in zip(out.proposals, out.proposal_scores))
        return out

    def watch(self, loader: Iterable) -> Iterator:
        for images, targets in loader:
            self._images.extend((int(t["image_id"]), float(t["scale"])) for t in targets)
            yield images, targets

    def take(self) -> list[list[dict[str, Any]]]:
        if len(self._images) != len(self._proposals):
            raise RuntimeError(f"{len(self._images)} images were loaded but {len(self._proposals)} had proposals")
        noted = [proposals_to_coco(boxes, scores, image_id, scale, self.category_id)
                 for (image_id, scale), (boxes, scores) in zip(self._images, self._proposals)]
        self._images, self._proposals = [], []
        return noted


__all__ = ["MAX_PROPOSALS", "ProposalRecorder", "proposal_recall", "proposals_to_coco"]
