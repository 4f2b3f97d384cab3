"""Training batches from a data set decoded once into device memory (``data.resident=true``).

The DataLoader path decodes and resizes every image again each epoch in worker processes and copies
each batch to the GPU; on a GPU that trains a small detector at hundreds of images per second, that
pipeline, not the model, sets the speed, and several runs sharing one GPU also share its few CPU cores.
Here every training image is decoded and resized once (``CocoDetection.load_resized``, so the pixels
are exactly the DataLoader's) into one (N, 3, H, W) uint8 tensor on the device, about 1.2 GB for
6000 digits images at 256 px, and each batch is gathered, flipped and converted there.

Batch order: the indices come from a DataLoader over ``range(N)`` with the training loader's own
sampler and generator, so the order is the DataLoader path's, draw for draw (from the second epoch on
it differs from a DataLoader with persistent workers, which draws its worker seed once, not per epoch). Flips: drawn on the host
from their own seeded generator (the DataLoader path draws them in its workers from seeds nobody can
restate), so nothing in a step waits for the device. With ``flip_prob=0`` a batch equals the
DataLoader's exactly, which is what the tests check.

The one restriction: every image must have one size after resizing (one ``min_size``, images of one
shape, as digits has); a COCO-style set of many shapes keeps the DataLoader path.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch

from .coco import DatasetError, hflip_boxes, padded_size

__all__ = ["ResidentBatches", "index_loader", "resident_images"]


class _Indices(torch.utils.data.Dataset):
    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


def _stack_indices(batch: list[int]) -> list[int]:
    return list(batch)


def _load_items(dataset, indices: list[int]) -> list:
    return [dataset.load_resized(i) for i in indices]


def resident_images(dataset, device: torch.device, num_workers: int = 0, context=None):
    """(pixels (N, 3, H, W) uint8 on ``device``, targets): every item of ``dataset`` resized, unflipped,
    decoded by ``num_workers`` processes (``context``: their multiprocessing context).

    Raises DatasetError naming the first image whose resized size differs from the first image's.
    """
    if len(dataset.min_sizes) != 1:
        raise DatasetError(f"data.resident needs one training min_size, got {dataset.min_sizes}")
    loader = torch.utils.data.DataLoader(
        _Indices(len(dataset)), batch_size=64, num_workers=num_workers, multiprocessing_context=context,
        collate_fn=functools.partial(_load_items, dataset),
    )
    pixels, targets = None, []
    for chunk in loader:
        for image, target in chunk:
            if pixels is None:
                pixels = torch.empty((len(dataset), *image.shape), dtype=torch.uint8, device=device)
                first_id = target["image_id"]
            if tuple(image.shape) != tuple(pixels.shape[1:]):
                raise DatasetError(
                    f"{dataset.ann_file.name}: data.resident needs every image resized to one size; image id "
                    f"{target['image_id']} is {image.shape[1]}x{image.shape[2]} but image id "
                    f"{first_id} is {pixels.shape[2]}x{pixels.shape[3]}"
                )
            pixels[len(targets)].copy_(image)
            targets.append(target)
    if pixels is None:
        raise DatasetError(f"{dataset.ann_file.name}: no training images")
    return pixels, targets


class ResidentBatches:
    """An iterable of ``(images (B, 3, Hp, Wp) float32 in [0, 1], targets)`` on the device, one epoch per
    iteration, like the DataLoader it replaces (``experiments.build.infinite_batches`` drives both).

    Args:
        dataset: the training ``CocoDetection``.
        index_loader: a DataLoader over ``range(len(dataset))`` yielding lists of indices (its sampler
            and generator are the training order's).
        device: where images and boxes live.
        size_divisibility: images are zero-padded at the bottom and right to a multiple of this.
        flip_seed: seed of the host generator that draws the horizontal flips.
        num_workers, context: processes that decode the images once, and their multiprocessing context.
    """

    def __init__(self, dataset, index_loader, device: torch.device, size_divisibility: int, flip_seed: int,
                 num_workers: int = 0, context=None) -> None:
        self.index_loader = index_loader
        self.device = device
        self.flip_prob = float(dataset.flip_prob) if dataset.train else 0.0
        self.flip_generator = torch.Generator().manual_seed(int(flip_seed))
        self.pixels, targets = resident_images(dataset, device, num_workers, context)
        _, _, height, self.width = self.pixels.shape
        self.padded = padded_size(height, self.width, size_divisibility)
        self.targets = [
            {**t, "boxes": t["boxes"].to(device), "labels": t["labels"].to(device),
             "crowd_boxes": t["crowd_boxes"].to(device)}
            for t in targets
        ]

    @property
    def sampler(self):
        return self.index_loader.sampler

    @property
    def generator(self):
        return self.index_loader.generator

    def __len__(self) -> int:
        return len(self.index_loader)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, list[dict]]:
        """The batch of dataset items ``indices``: gathered, flipped where drawn, converted and padded."""
        flips = (torch.rand(len(indices), generator=self.flip_generator) < self.flip_prob).tolist() \
            if self.flip_prob > 0 else [False] * len(indices)
        index = torch.tensor(indices, dtype=torch.long).to(self.device, non_blocking=True)
        pixels = self.pixels.index_select(0, index)
        if any(flips):
            mask = torch.tensor(flips).to(self.device, non_blocking=True).view(-1, 1, 1, 1)
            pixels = torch.where(mask, pixels.flip(-1), pixels)
        images = pixels.new_zeros((len(indices), 3, *self.padded), dtype=torch.float32)
        images[:, :, : pixels.shape[2], : pixels.shape[3]] = pixels.float().div_(255.0)
        targets = []
        for i, flip in zip(indices, flips):
            target = dict(self.targets[i])
            if flip:
                target["boxes"] = hflip_boxes(target["boxes"], self.width)
                target["crowd_boxes"] = hflip_boxes(target["crowd_boxes"], self.width)
            targets.append(target)
        return images, targets

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[dict]]]:
        for indices in self.index_loader:
            yield self.batch(indices)


def index_loader(length: int, batch_size: int, sampler, generator) -> torch.utils.data.DataLoader:
    """The DataLoader over ``range(length)`` that gives ``ResidentBatches`` its order."""
    return torch.utils.data.DataLoader(
        _Indices(length), batch_size=batch_size, sampler=sampler, num_workers=0, collate_fn=_stack_indices,
        drop_last=True, generator=generator,
    )
