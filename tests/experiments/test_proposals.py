"""Proposal recall (AR@100, AR@1000) from COCOeval, on hand-built proposals whose recall is known."""

import contextlib
import io
from types import SimpleNamespace

import pytest
import torch
from pycocotools.coco import COCO

from experiments.proposals import ProposalRecorder, proposal_recall, proposals_to_coco


def two_object_gt():
    """One 100 x 100 image with two objects of two categories: A at (10, 10, 20, 20), B at (60, 60, 30, 30) xywh."""
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 7, "width": 100, "height": 100}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [60, 60, 30, 30], "area": 900, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def proposals_finding_b_at_rank(rank):
    """A exactly at rank 1, ``rank - 2`` proposals overlapping nothing, then B exactly at ``rank`` (scores
    decreasing), all under category 1: the recall ignores categories (B is of category 2)."""
    boxes = [[10.0, 10.0, 30.0, 30.0]] + [[0.0, 90.0, 5.0, 95.0]] * (rank - 2) + [[60.0, 60.0, 90.0, 90.0]]
    scores = torch.linspace(1.0, 0.01, len(boxes))
    return proposals_to_coco(torch.tensor(boxes), scores, image_id=7, scale=1.0, category_id=1)


@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_recall_counts_the_objects_found_among_the_first_100_and_1000(backend):
    if backend == "faster":
        pytest.importorskip("faster_coco_eval")
    gt = two_object_gt()
    # B at rank 101: among the first 1000 proposals, not among the first 100. Both exact: found at every IoU.
    assert proposal_recall(gt, proposals_finding_b_at_rank(101), backend) == {"AR100": 50.0, "AR1000": 100.0}
    assert proposal_recall(gt, proposals_finding_b_at_rank(100), backend) == {"AR100": 100.0, "AR1000": 100.0}


def test_recall_averages_over_the_iou_thresholds():
    gt = two_object_gt()
    # A found at IoU 0.8 (a 20 x 16 box inside it): recalled at the thresholds 0.5 .. 0.8, 7 of 10; B not found.
    proposals = proposals_to_coco(torch.tensor([[10.0, 10.0, 30.0, 26.0]]), torch.tensor([0.9]), 7, 1.0, 1)
    result = proposal_recall(gt, proposals)
    assert result["AR100"] == pytest.approx(100.0 * 0.5 * 7 / 10) and result["AR1000"] == result["AR100"]
    assert proposal_recall(gt, []) == {"AR100": 0.0, "AR1000": 0.0}


def test_proposals_go_back_to_the_original_image():
    [result] = proposals_to_coco(torch.tensor([[20.0, 10.0, 60.0, 30.0]]), torch.tensor([0.5]), 3, 2.0, 5)
    assert result == {"image_id": 3, "category_id": 5, "bbox": [10.0, 5.0, 20.0, 10.0], "score": 0.5}


def test_recorder_pairs_each_images_proposals_with_its_id_and_scale():
    class Model:
        mode = None

        def eval(self):
            self.mode = "eval"

        def train(self, mode=True):
            self.mode = "train"

        def __call__(self, images):  # the second image has 1001 proposals (all the same)
            boxes = [torch.tensor([[0.0, 0.0, 10.0, 10.0]]), torch.tensor([[0.0, 0.0, 20.0, 10.0]] * 1001)]
            return SimpleNamespace(proposals=boxes, proposal_scores=[torch.tensor([0.5]), torch.full((1001,), 0.5)])

    model = Model()
    recorder = ProposalRecorder(model, category_id=1)
    recorder.eval()
    loader = [(torch.zeros(2, 3, 8, 8), [{"image_id": 4, "scale": 1.0}, {"image_id": 9, "scale": 2.0}])]
    for images, _ in recorder.watch(loader):
        recorder(images)
    recorder.train()
    first, second = recorder.take()
    assert model.mode == "train" and recorder.take() == []
    assert first[0]["image_id"] == 4 and first[0]["bbox"] == [0.0, 0.0, 10.0, 10.0]
    assert second[0]["image_id"] == 9 and second[0]["bbox"] == [0.0, 0.0, 10.0, 5.0]
    assert len(first) == 1 and len(second) == 1000  # COCOeval reads the best 1000 of an image, no more
