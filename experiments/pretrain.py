"""A backbone pretrained on digits (``model.weights=digits``): ImageNet stand-in for the embedded data.

Every model of the paper starts from ImageNet weights; nothing can be downloaded here, so this
builds the closest honest substitute from the digits **train** split only: the 10-way
classification of crops around each train GT box (val handwriting is never seen). The recipe is
fixed and deterministic (``RECIPE``); the weights are cached beside the data as
``<digits dir>/pretrained/<arch>-<key>.pt`` with a JSON holding the recipe, the accuracy on
held-out train images (the last ``holdout_fraction`` of them by id: other images, same
handwriting pool) and the build time. The state dict is a torchvision ResNet's, loaded by
``detector.ResNetBackbone(weights=<path>)``.

    assignbench-pretrain            # builds (or reports) the cached backbone for the default digits
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.nn import functional as F

from .runfiles import atomic_write_text

RECIPE: dict[str, Any] = {
    "arch": "resnet18",
    "crop_size": 48,        # pixels; a digit box (12-64 px) resized to this
    "margin": 0.15,         # context around the tight box, as a fraction of its side
    "epochs": 4,
    "batch_size": 64,
    "lr": 0.1,              # SGD, momentum 0.9, cosine to 0 over the epochs
    "weight_decay": 1e-4,
    "holdout_fraction": 0.1,
    "seed": 0,
    "pixel_mean": [0.485, 0.456, 0.406],  # the detector's normalisation (detector.Detector)
    "pixel_std": [0.229, 0.224, 0.225],
}


def recipe_key(recipe: dict[str, Any], data_hash: str) -> str:
    """A short hash of the recipe and the annotation file it trains on: the cache file's name."""
    text = json.dumps({"recipe": recipe, "data": data_hash}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def train_crops(digits_dir: Path, crop_size: int, margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crops (N, 3, S, S) uint8, labels (N,) int64 in [0, 10), image rank (N,) int64) of the train split.

    One crop per non-crowd GT box, the box widened by ``margin`` of its side on each side, clipped to
    the image and resized (bilinear) to ``crop_size``. Image rank = position of its image by id.
    """
    coco = json.loads((digits_dir / "annotations" / "instances_train.json").read_text())
    categories = sorted(c["id"] for c in coco["categories"])
    label_of = {cid: i for i, cid in enumerate(categories)}
    images = sorted(coco["images"], key=lambda im: im["id"])
    rank = {im["id"]: i for i, im in enumerate(images)}
    by_image: dict[int, list[dict]] = {}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            by_image.setdefault(ann["image_id"], []).append(ann)
    crops, labels, ranks = [], [], []
    for image in images:
        anns = by_image.get(image["id"], [])
        if not anns:
            continue
        with Image.open(digits_dir / "train" / image["file_name"]) as handle:
            pixels = handle.convert("RGB")
            for ann in sorted(anns, key=lambda a: a["id"]):
                x, y, w, h = ann["bbox"]
                pad_x, pad_y = margin * w, margin * h
                box = (max(0.0, x - pad_x), max(0.0, y - pad_y), min(pixels.width, x + w + pad_x),
                       min(pixels.height, y + h + pad_y))
                crop = pixels.crop(tuple(round(v) for v in box)).resize((crop_size, crop_size), Image.BILINEAR)
                crops.append(torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1))
                labels.append(label_of[ann["category_id"]])
                ranks.append(rank[image["id"]])
    return torch.stack(crops), torch.tensor(labels), torch.tensor(ranks)


def _normalise(crops: torch.Tensor, recipe: dict[str, Any]) -> torch.Tensor:
    mean = torch.tensor(recipe["pixel_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(recipe["pixel_std"]).view(1, 3, 1, 1)
    return (crops.float() / 255.0 - mean) / std


@torch.no_grad()
def accuracy(net: torch.nn.Module, crops: torch.Tensor, labels: torch.Tensor, recipe: dict[str, Any]) -> float:
    net.eval()
    correct = 0
    for start in range(0, len(crops), 256):
        logits = net(_normalise(crops[start:start + 256], recipe))
        correct += int((logits.argmax(1) == labels[start:start + 256]).sum())
    net.train()
    return correct / max(1, len(crops))


def train_classifier(crops, labels, ranks, recipe: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the recipe's ResNet on the crops of the first (1 - holdout) images; returns it and its record."""
    torch.manual_seed(int(recipe["seed"]))
    generator = torch.Generator().manual_seed(int(recipe["seed"]))
    num_images = int(ranks.max()) + 1
    train_mask = ranks < math.ceil(num_images * (1.0 - float(recipe["holdout_fraction"])))
    train_x, train_y = crops[train_mask], labels[train_mask]
    hold_x, hold_y = crops[~train_mask], labels[~train_mask]
    net = getattr(torchvision.models, recipe["arch"])(weights=None, num_classes=10)
    optimizer = torch.optim.SGD(net.parameters(), lr=float(recipe["lr"]), momentum=0.9,
                                weight_decay=float(recipe["weight_decay"]))
    batch = int(recipe["batch_size"])
    steps_per_epoch = len(train_x) // batch
    total_steps = max(1, steps_per_epoch * int(recipe["epochs"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    history, start = [], time.perf_counter()
    net.train()
    for epoch in range(int(recipe["epochs"])):
        order = torch.randperm(len(train_x), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * batch:(step + 1) * batch]
            loss = F.cross_entropy(net(_normalise(train_x[index], recipe)), train_y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        history.append({"epoch": epoch + 1, "holdout_accuracy": accuracy(net, hold_x, hold_y, recipe),
                        "seconds": round(time.perf_counter() - start, 1)})
        print(f"[assignbench-pretrain] epoch {epoch + 1}: held-out accuracy {history[-1]['holdout_accuracy']:.3f} "
              f"({history[-1]['seconds']:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    record = {
        "train_crops": int(len(train_x)), "holdout_crops": int(len(hold_x)),
        "holdout_accuracy": history[-1]["holdout_accuracy"] if history else None, "history": history,
        "train_seconds": round(seconds, 1),
        "crops_per_second": round(steps_per_epoch * batch * int(recipe["epochs"]) / seconds, 1) if seconds else None,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    return net, record


def digits_backbone(digits_dir: Path, recipe: dict[str, Any] | None = None) -> Path:
    """The cached digits-pretrained state dict for ``recipe`` (default ``RECIPE``), built on first use."""
    from .environment import file_digest

    recipe = dict(RECIPE if recipe is None else recipe)
    digits_dir = Path(digits_dir)
    data_hash = file_digest([digits_dir / "annotations" / "instances_train.json"])
    out_dir = digits_dir / "pretrained"
    path = out_dir / f"{recipe['arch']}-{recipe_key(recipe, data_hash)}.pt"
    if path.exists():
        return path
    from .checkpoint import save_checkpoint

    start = time.perf_counter()
    crops, labels, ranks = train_crops(digits_dir, int(recipe["crop_size"]), float(recipe["margin"]))
    with torch.random.fork_rng(devices=[]):  # a first-use build leaves the caller's RNG as it was
        net, record = train_classifier(crops, labels, ranks, recipe)
    record.update(recipe=recipe, data_hash=data_hash, build_seconds=round(time.perf_counter() - start, 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, net.state_dict())
    atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    from .data import build_digits

    parser = argparse.ArgumentParser(prog="assignbench-pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None, help="data root (default: ASSIGNBENCH_DATA or ./data)")
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    args = parser.parse_args(argv)
    digits_dir = build_digits(args.root)
    path = digits_backbone(digits_dir, {**RECIPE, "epochs": args.epochs})
    print(f"{path}\n{path.with_suffix('.json').read_text()}")
    return 0


__all__ = ["RECIPE", "digits_backbone", "main", "recipe_key", "train_classifier", "train_crops"]
