"""Datasets: the COCO-format loader and the embedded ``digits`` benchmark.

``build_dataset`` is the one entry point the engine uses; it turns a data set name and split into a
``CocoDetection``.
"""

from __future__ import annotations

from pathlib import Path

from experiments.data.coco import CocoDetection, DatasetError, collate
from experiments.data.digits import DIGITS_DEFAULTS, build_digits, data_root

__all__ = ["DIGITS_DEFAULTS", "CocoDetection", "DatasetError", "build_dataset", "build_digits", "collate", "data_root"]

SPLITS = ("train", "val")


def build_dataset(
    name: str,
    split: str,
    *,
    root: str | Path | None = None,
    train: bool,
    min_size: int | list[int] = 800,
    max_size: int = 1333,
    flip_prob: float = 0.5,
    digits_params: dict | None = None,
    filter_empty: bool = False,
) -> CocoDetection:
    """The ``split`` ("train" or "val") of data set ``name`` ("digits" or "coco").

    Args:
        root: for "digits", the data root (``data_root``); the set is generated there on first use with
            ``build_digits(root, **digits_params)``. For "coco", the COCO 2017 folder holding ``train2017/``,
            ``val2017/`` and ``annotations/instances_{train,val}2017.json``; default ``<data root>/coco``.
        train, min_size, max_size, flip_prob, filter_empty: passed to ``CocoDetection``.
        digits_params: overrides of ``DIGITS_DEFAULTS`` (and optionally ``num_workers``); digits only.

    Raises:
        DatasetError naming the missing folder or file; ValueError for an unknown name or split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if name == "digits":
        directory = build_digits(root, **(digits_params or {}))
        image_dir, ann_file = directory / split, directory / "annotations" / f"instances_{split}.json"
    elif name == "coco":
        if digits_params:
            raise ValueError("digits_params only apply to name='digits'")
        directory = Path(root) if root is not None else data_root() / "coco"
        image_dir, ann_file = directory / f"{split}2017", directory / "annotations" / f"instances_{split}2017.json"
        for path in (image_dir, ann_file):
            if not path.exists():
                raise DatasetError(f"COCO 2017 {split} split not found: {path} does not exist")
    else:
        raise ValueError(f"unknown dataset {name!r}; expected 'digits' or 'coco'")
    return CocoDetection(image_dir, ann_file, train=train, min_size=min_size, max_size=max_size, flip_prob=flip_prob,
                         filter_empty=filter_empty)
