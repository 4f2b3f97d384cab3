"""COCO-format detection dataset (real COCO 2017 or the embedded ``digits`` set) and its batch collation.

Images come out as float RGB in [0, 1], *not* normalised (the detector normalises), resized so the shorter
side is ``min_size`` and the longer at most ``max_size``. Annotations are sanitised once at construction:
boxes are clipped to the image, boxes with no area left are dropped, annotations of unknown categories are
dropped, and each kind of fix is counted and reported in one warning. Two fields that COCOeval reads but
box-only conversions often leave out get their usual defaults at load time, so evaluation cannot fail on
them after hours of training: a missing ``iscrowd`` is 0 and a missing ``area`` is the box's ``w * h``.
"""

from __future__ import annotations

import contextlib
import io
import json
import numbers
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO

__all__ = ["CocoDetection", "DatasetError", "collate", "hflip_boxes"]


class DatasetError(ValueError):
    """A data set file is missing or unusable. The message names the file (and the image id for images)."""


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection data set.

    Args:
        image_dir: folder the images' ``file_name`` entries are relative to.
        ann_file: COCO instances json.
        train: training mode: random scale from a ``min_size`` list and random horizontal flip.
        min_size: target shorter side in pixels, or a list of them for multi-scale training (one is drawn per
            image). Evaluation uses the *first* element of a list, so put the test scale first.
        max_size: cap on the longer side in pixels.
        flip_prob: probability of a horizontal flip in training.
        filter_empty: drop the images that have no annotation wider and taller than 1 pixel (crowd ones
            count), as the official PAA/ATSS training set does (maskrcnn-benchmark's
            ``remove_images_without_annotations`` with ``has_valid_annotation``); for COCO training.

    Item ``i`` is ``(image, target)``:

    * ``image``: (3, H, W) float32 RGB in [0, 1], resized.
    * ``target["boxes"]``: (G, 4) float32 xyxy in resized-image pixels (non-crowd annotations).
    * ``target["labels"]``: (G,) int64 contiguous labels in [0, num_classes): sorted category ids -> 0..C-1.
    * ``target["crowd_boxes"]``: (K, 4) float32 xyxy resized pixels of ``iscrowd=1`` annotations.
    * ``target["image_id"]``: int; ``target["orig_size"]`` and ``target["size"]``: (h, w) ints before and after
      resizing; ``target["scale"]``: float, resized / original side length. Boxes are scaled per axis by the
      exact ratio of the rounded output size, which differs from ``scale`` by under half a pixel over the image.

    Without ``filter_empty``, images without annotations are kept (they train as all-negative).
    """

    def __init__(
        self,
        image_dir: str | Path,
        ann_file: str | Path,
        *,
        train: bool,
        min_size: int | list[int] = 800,
        max_size: int = 1333,
        flip_prob: float = 0.5,
        filter_empty: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.train = train
        # Hydra hands lists over as ListConfig, so test for a number rather than for a list.
        self.min_sizes = [int(min_size)] if isinstance(min_size, numbers.Real) else [int(size) for size in min_size]
        if not self.min_sizes:
            raise ValueError("min_size must be an int or a non-empty list of ints")
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)

        self.coco = _load_coco(self.ann_file)
        self.ids: list[int] = sorted(self.coco.imgs)
        if filter_empty:
            self.ids = [image_id for image_id in self.ids if self._has_valid_annotation(image_id)]
        self.label_to_category_id: list[int] = sorted(self.coco.cats)
        self.category_names: list[str] = [self.coco.cats[cat_id]["name"] for cat_id in self.label_to_category_id]
        self.num_classes = len(self.label_to_category_id)
        self._sanitise()

    def _has_valid_annotation(self, image_id: int) -> bool:
        """Whether the image has an annotation (crowd or not) whose box is wider and taller than 1 pixel."""
        annotations = self.coco.imgToAnns.get(image_id, [])
        return any(len(a.get("bbox", ())) == 4 and a["bbox"][2] > 1 and a["bbox"][3] > 1 for a in annotations)

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, image_id: int) -> Path:
        """Path of the image file of ``image_id``."""
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def validate(self) -> None:
        """Check that every referenced image file exists (a cheap stat per image, no decoding).

        Raises DatasetError naming the missing files and their image ids, so a run fails before training.
        """
        missing = [
            (image_id, self.image_path(image_id)) for image_id in self.ids if not self.image_path(image_id).is_file()
        ]
        if missing:
            shown = ", ".join(f"{path} (image id {image_id})" for image_id, path in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DatasetError(f"{self.ann_file.name}: {len(missing)} image file(s) missing: {shown}{more}")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        pixels, target = self.load_resized(index, self._draw_min_size())
        image_tensor = pixels.float().div_(255.0)
        # torch's RNG (not numpy's): DataLoader workers get distinct torch seeds but copies of numpy's state.
        if self.train and self.flip_prob > 0 and torch.rand(()).item() < self.flip_prob:
            image_tensor = image_tensor.flip(-1)
            width = target["size"][1]
            target["boxes"] = hflip_boxes(target["boxes"], width)
            target["crowd_boxes"] = hflip_boxes(target["crowd_boxes"], width)
        return image_tensor, target

    def load_resized(self, index: int, min_size: int | None = None) -> tuple[torch.Tensor, dict]:
        """Item ``index`` resized for shorter side ``min_size`` (default the first), never flipped, as
        (3, H, W) uint8 pixels and its target; ``__getitem__`` is this, converted to float and maybe flipped."""
        image_id = self.ids[index]
        image = self._read_image(image_id)
        orig_w, orig_h = image.size
        min_size = self.min_sizes[0] if min_size is None else int(min_size)
        scale = min(min_size / min(orig_h, orig_w), self.max_size / max(orig_h, orig_w))
        new_h, new_w = max(1, round(orig_h * scale)), max(1, round(orig_w * scale))
        if (new_w, new_h) != (orig_w, orig_h):
            image = image.resize((new_w, new_h), Image.BILINEAR)
        box_scale = np.array([new_w / orig_w, new_h / orig_h] * 2, dtype=np.float32)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
        target = {
            "boxes": torch.from_numpy(self._boxes[image_id] * box_scale),
            "labels": torch.from_numpy(self._labels[image_id].copy()),
            "crowd_boxes": torch.from_numpy(self._crowd_boxes[image_id] * box_scale),
            "image_id": int(image_id),
            "orig_size": (orig_h, orig_w),
            "size": (new_h, new_w),
            "scale": float(scale),
        }
        return pixels, target

    def _draw_min_size(self) -> int:
        if not self.train or len(self.min_sizes) == 1:
            return self.min_sizes[0]
        return self.min_sizes[int(torch.randint(len(self.min_sizes), ()).item())]

    def _read_image(self, image_id: int) -> Image.Image:
        """The image as RGB; DatasetError naming path and id when it is missing, unreadable or mis-sized."""
        path = self.image_path(image_id)
        try:
            with Image.open(path) as handle:
                image = handle.convert("RGB")
        except (OSError, UnidentifiedImageError) as error:
            raise DatasetError(f"cannot read image {path} (image id {image_id}): {error}") from error
        info = self.coco.imgs[image_id]
        expected = (info["width"], info["height"])
        if expected != image.size:
            raise DatasetError(
                f"image {path} (image id {image_id}) is {image.size[0]}x{image.size[1]} pixels but "
                f"{self.ann_file.name} says {expected[0]}x{expected[1]}"
            )
        return image

    def _sanitise(self) -> None:
        """Per-image clean arrays in original pixels: ``_boxes`` (G, 4) float32 xyxy, ``_labels`` (G,) int64,
        ``_crowd_boxes`` (K, 4) float32 xyxy. (numpy rather than torch: ~100k small tensors weigh more.)

        Clips boxes to the image, drops boxes with width or height <= 0 after clipping and annotations whose
        category is unknown; counts each in ``sanitize_report`` and warns once when anything was fixed.
        """
        category_to_label = {cat_id: label for label, cat_id in enumerate(self.label_to_category_id)}
        report = {"dropped_nonpositive": 0, "clipped": 0, "dropped_unknown_category": 0, "unknown_category_ids": []}
        unknown_ids: set = set()
        self._boxes: dict[int, np.ndarray] = {}
        self._labels: dict[int, np.ndarray] = {}
        self._crowd_boxes: dict[int, np.ndarray] = {}
        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            annotations = self.coco.imgToAnns.get(image_id, [])
            known = [ann for ann in annotations if ann["category_id"] in category_to_label]
            unknown_ids.update(ann["category_id"] for ann in annotations if ann["category_id"] not in category_to_label)
            report["dropped_unknown_category"] += len(annotations) - len(known)
            xywh = np.array([ann["bbox"] for ann in known], dtype=np.float64).reshape(-1, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            clipped = boxes.copy()
            clipped[:, 0::2] = clipped[:, 0::2].clip(0, info["width"])
            clipped[:, 1::2] = clipped[:, 1::2].clip(0, info["height"])
            positive = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
            report["dropped_nonpositive"] += int((~positive).sum())
            report["clipped"] += int((positive & (clipped != boxes).any(axis=1)).sum())
            crowd = np.array([bool(ann.get("iscrowd", 0)) for ann in known], dtype=bool)
            labels = np.array([category_to_label[ann["category_id"]] for ann in known], dtype=np.int64)
            keep, keep_crowd = positive & ~crowd, positive & crowd
            self._boxes[image_id] = clipped[keep].astype(np.float32)
            self._labels[image_id] = labels[keep]
            self._crowd_boxes[image_id] = clipped[keep_crowd].astype(np.float32)
        report["unknown_category_ids"] = sorted(unknown_ids)
        self.sanitize_report = report
        _warn_sanitised(self.ann_file.name, report)


def _warn_sanitised(file_name: str, report: dict) -> None:
    """One warning listing every kind of annotation fix made in ``file_name`` (none when nothing changed)."""
    parts = []
    if report["dropped_nonpositive"]:
        parts.append(f"dropped {_plural(report['dropped_nonpositive'], 'box')} with non-positive size")
    if report["clipped"]:
        parts.append(f"clipped {_plural(report['clipped'], 'box')} to the image")
    if report["dropped_unknown_category"]:
        ids = ", ".join(str(cat_id) for cat_id in report["unknown_category_ids"])
        parts.append(
            f"dropped {_plural(report['dropped_unknown_category'], 'annotation')} with unknown category_id {ids}"
        )
    if parts:
        warnings.warn(f"{file_name}: " + ", ".join(parts), stacklevel=4)  # points at CocoDetection(...)


def _plural(count: int, noun: str) -> str:
    suffix = "es" if noun.endswith("x") else "s"
    return f"{count} {noun}" if count == 1 else f"{count} {noun}{suffix}"


def _load_coco(ann_file: Path) -> COCO:
    """pycocotools ``COCO`` for ``ann_file``; DatasetError naming the file when it is missing or malformed."""
    try:
        with open(ann_file) as handle:
            dataset = json.load(handle)
    except FileNotFoundError as error:
        raise DatasetError(f"annotation file not found: {ann_file}") from error
    except (OSError, ValueError) as error:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DatasetError(f"malformed annotation file {ann_file}: {error}") from error
    _check_fields(ann_file, dataset)
    _fill_eval_defaults(dataset)
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


_REQUIRED_FIELDS = {
    "images": ("id", "file_name", "width", "height"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}


def _check_fields(ann_file: Path, dataset: object) -> None:
    """DatasetError naming ``ann_file`` unless it holds the lists and fields the loader reads."""
    if not isinstance(dataset, dict):
        raise DatasetError(f"malformed annotation file {ann_file}: top level is not a JSON object")
    for key, fields in _REQUIRED_FIELDS.items():
        entries = dataset.get(key)
        if not isinstance(entries, list):
            raise DatasetError(f"malformed annotation file {ann_file}: '{key}' is missing or not a list")
        for entry in entries:
            if not isinstance(entry, dict) or any(field not in entry for field in fields):
                raise DatasetError(
                    f"malformed annotation file {ann_file}: an entry of '{key}' lacks one of {fields}: {str(entry)[:200]}"
                )
            if key == "annotations" and not _is_xywh(entry["bbox"]):
                raise DatasetError(
                    f"malformed annotation file {ann_file}: annotation {entry['id']} bbox {entry['bbox']} is not [x, y, w, h] (four numbers)"
                )


def _is_xywh(bbox: object) -> bool:
    """True for a list of four numbers (bools are not numbers here)."""
    return (
        isinstance(bbox, list)
        and len(bbox) == 4
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in bbox)
    )


def _fill_eval_defaults(dataset: dict) -> None:
    """Give every annotation the ``iscrowd`` and ``area`` fields COCOeval reads (in place).

    The loader needs neither, but pycocotools' COCOeval raises KeyError without them, which would
    only show at the first evaluation. Defaults: ``iscrowd`` 0, ``area`` the box's ``w * h``
    (what COCOeval takes for detections; COCO's own ``area`` is the mask area, kept when present).
    """
    for ann in dataset["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            width, height = ann["bbox"][2], ann["bbox"][3]
            ann["area"] = float(max(width, 0) * max(height, 0))


def hflip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror (N, 4) xyxy boxes in an image ``width`` pixels wide: x -> width - x, swapping x0 and x1."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def padded_size(height: int, width: int, size_divisibility: int) -> tuple[int, int]:
    """(height, width) rounded up to multiples of ``size_divisibility`` (the coarsest FPN stride)."""
    step = max(1, int(size_divisibility))
    return -(-height // step) * step, -(-width // step) * step


def collate(batch: list[tuple[torch.Tensor, dict]], size_divisibility: int = 32) -> tuple[torch.Tensor, list[dict]]:
    """Stack ``(image, target)`` items into ``(images (B, 3, Hp, Wp), targets)``.

    Images are zero-padded at the bottom and right to the largest height and width in the batch, rounded up to
    a multiple of ``size_divisibility`` (the coarsest FPN stride), so boxes need no shift.
    """
    if not batch:
        raise ValueError("collate needs at least one item")
    height, width = padded_size(max(image.shape[1] for image, _ in batch), max(image.shape[2] for image, _ in batch),
                                size_divisibility)
    images = batch[0][0].new_zeros((len(batch), 3, height, width))
    for slot, (image, _) in enumerate(batch):
        images[slot, :, : image.shape[1], : image.shape[2]] = image
    return images, [target for _, target in batch]
