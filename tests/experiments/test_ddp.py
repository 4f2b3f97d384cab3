"""A 2-process DDP (gloo, CPU) loss equals one process on the merged batch.

DDP averages gradients over processes, so the right per-process normaliser is the
all-reduced number of positives divided by the world size (official ATSS/PAA). Then the
mean over processes of each loss term equals the single-process loss on the whole batch.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import assigners
from detector import DetectionLoss, Detector, build_scorer

NUM_CLASSES = 3


def _batch():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 64, 64, generator=g)
    targets = []
    for n in (3, 1, 2, 0):  # uneven GT counts, one image without boxes
        xy = torch.rand(n, 2, generator=g) * 40
        wh = 8 + torch.rand(n, 2, generator=g) * 20
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(0, NUM_CLASSES, (n,), generator=g)})
    return images, targets


def _losses(images, targets, scorer_name):
    torch.manual_seed(0)
    scorer = build_scorer(scorer_name, box_weight=1.0, quality_weight=1.0)
    model = Detector(num_classes=NUM_CLASSES, backbone="resnet18", norm="frozen_bn", frozen_stages=0,
                     fpn_channels=32, num_convs=1, levels=(3, 4, 5, 6), anchor_scale=4.0,
                     use_quality=scorer.has_quality_branch)
    loss = DetectionLoss(assigners.build("max_iou"), scorer, NUM_CLASSES)
    losses, _ = loss(model(images), targets)
    return {k: float(v.detach()) for k, v in losses.items()}


def _worker(rank, world, port, scorer_name, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        images, targets = _batch()
        per = len(targets) // world
        sl = slice(rank * per, (rank + 1) * per)
        out[rank] = _losses(images[sl], targets[sl], scorer_name)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scorer_name", ["none", "iou"])
def test_two_process_losses_average_to_the_merged_batch(scorer_name):
    images, targets = _batch()
    merged = _losses(images, targets, scorer_name)
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), scorer_name, out), nprocs=2, join=True)
    assert set(out.keys()) == {0, 1}
    for term, value in merged.items():
        mean = (out[0][term] + out[1][term]) / 2
        assert mean == pytest.approx(value, rel=1e-4, abs=1e-6), term
    # the two halves really differ, so the check is not vacuous
    assert out[0]["loss_cls"] != pytest.approx(out[1]["loss_cls"])
