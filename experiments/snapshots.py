"""The assignment snapshot: how a fixed val image's anchors are assigned at each evaluation (Fig. 4a)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from .runfiles import atomic_write_bytes
from .showcase import showcase_image_ids
from .trainer import autocast, outputs_to_float


@torch.no_grad()
def record_snapshot(path: Path, model, assigner, val_set, device: torch.device, it: int,
                    autocast_dtype: torch.dtype | None, size_divisibility: int) -> None:
    """Store the assignment of a fixed val image at iteration ``it`` in ``path``: the first of the report's
    showcase images (``experiments.showcase``: several objects of varied shape), ``val_set`` a ``CocoDetection``.

    The file holds, per recorded iteration, ``gt_index_<iter>`` (A,) next to the image's
    ``anchors`` (A, 4), ``num_anchors_per_level`` (L,), ``gt_boxes`` (G, 4) and ``image`` (H, W, 3)
    uint8. The image is padded as the loaders pad it, and ``AssignInputs`` is built as the loss builds it.
    """
    from detector import TwoStageOutput, build_assign_inputs
    from detector.rpn import class_agnostic
    from experiments.data import collate

    image_id = showcase_image_ids(val_set.coco, 1)[0]
    image, target = val_set[val_set.ids.index(image_id)]
    was_training = model.training
    model.eval()
    batch = collate([(image, target)], size_divisibility=size_divisibility)[0].to(device)
    with autocast(device, autocast_dtype):
        out = model(batch)
    out = outputs_to_float(out)
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in target.items()}]
    if isinstance(out, TwoStageOutput):  # the RPN's anchors: one class, as its loss labels them
        targets = class_agnostic(targets)
    assignment = assigner(build_assign_inputs(out, model.decode(out), targets))
    if was_training:
        model.train()
    arrays: dict[str, np.ndarray] = {}
    if path.exists():
        with np.load(path) as old:
            arrays = {k: old[k] for k in old.files}
    arrays["anchors"] = out.anchors.cpu().numpy()
    arrays["num_anchors_per_level"] = np.asarray(out.num_anchors_per_level)
    arrays["gt_boxes"] = target["boxes"].cpu().numpy()
    arrays["image_id"] = np.asarray(image_id)
    arrays["image"] = (image.permute(1, 2, 0).clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
    arrays[f"gt_index_{it}"] = assignment.gt_index[0].cpu().numpy()
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


__all__ = ["record_snapshot"]
