"""Test-time augmentation merges (detector.tta) on hand-built detections."""

import pytest
import torch

from detector.tta import in_area_range, merge_detections, vote_one_class
from experiments.data.coco import hflip_boxes


def test_hflip_mirrors_and_swaps_the_x_sides():
    # In a 100-px wide image, [10, 5, 30, 25] mirrors to [70, 5, 90, 25]; twice is the identity.
    boxes = torch.tensor([[10.0, 5.0, 30.0, 25.0], [0.0, 0.0, 100.0, 50.0]])
    assert hflip_boxes(boxes, 100).tolist() == [[70.0, 5.0, 90.0, 25.0], [0.0, 0.0, 100.0, 50.0]]
    assert torch.equal(hflip_boxes(hflip_boxes(boxes, 100), 100), boxes)


def test_area_range_is_strict_on_both_ends():
    # Areas 100, 400, 900: the range (10, 30) keeps 400 only (100 = 10^2 and 900 = 30^2 are out).
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 20, 20], [0.0, 0, 30, 30]])
    assert in_area_range(boxes, 10, 30).tolist() == [False, True, False]


# Two boxes of one class with IoU 0.8 ([0, 0, 10, 10] and [0, 0, 10, 8]: 80 / 100), scores 0.9 and
# 0.6, and a third far away scoring 0.7.
BOXES = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0], [50.0, 50.0, 60.0, 60.0]])
SCORES = torch.tensor([0.9, 0.6, 0.7])


def test_vote_merges_a_cluster_into_its_score_weighted_mean():
    boxes, scores = vote_one_class(BOXES, SCORES, 0.66, soft=False, score_thresh=0.05)
    # Cluster of the 0.9 box: itself and the 0.6 one -> y2 = (0.9 * 10 + 0.6 * 8) / 1.5 = 9.2, score 0.9.
    # The far box is a cluster of one and stays as it is.
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 10.0, 9.2], [50.0, 50.0, 60.0, 60.0]]))
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7]))
    # Above the cluster's IoU nothing merges.
    boxes, scores = vote_one_class(BOXES, SCORES, 0.85, soft=False, score_thresh=0.05)
    assert torch.equal(scores, torch.tensor([0.9, 0.7, 0.6]))  # greedy order: by score


def test_soft_vote_keeps_members_with_their_score_times_one_minus_iou():
    # As above, plus each member of the merged cluster with score * (1 - IoU with the best): the 0.9 box
    # itself 0.9 * 0 = 0 (dropped, < 0.05), the 0.6 box 0.6 * 0.2 = 0.12 (kept); sorted by score.
    boxes, scores = vote_one_class(BOXES, SCORES, 0.66, soft=True, score_thresh=0.05)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7, 0.12]))
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.0, 10.0, 9.2], [50.0, 50.0, 60.0, 60.0],
                                                    [0.0, 0.0, 10.0, 8.0]]))
    # With a higher threshold the soft copy goes too.
    _, scores = vote_one_class(BOXES, SCORES, 0.66, soft=True, score_thresh=0.2)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7]))


def test_one_box_is_left_alone():
    boxes, scores = vote_one_class(BOXES[:1], SCORES[:1], 0.66, soft=True, score_thresh=0.05)
    assert torch.equal(boxes, BOXES[:1]) and torch.equal(scores, SCORES[:1])


@pytest.mark.parametrize("merge", ["soft-vote", "vote", "nms"])
def test_merge_never_mixes_classes(merge):
    # The two overlapping boxes are of different classes: nothing merges or suppresses.
    labels = torch.tensor([0, 1, 0])
    out = merge_detections(BOXES, SCORES, labels, merge=merge, vote_thresh=0.66, nms_thresh=0.6,
                           score_thresh=0.05, max_det=100)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7, 0.6])
    assert out["labels"].tolist() == [0, 0, 1]


def test_merge_nms_suppresses_and_max_det_keeps_ties():
    labels = torch.zeros(3, dtype=torch.int64)
    out = merge_detections(BOXES, SCORES, labels, merge="nms", vote_thresh=0.66, nms_thresh=0.6,
                           score_thresh=0.05, max_det=100)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7])  # the 0.6 box overlaps the 0.9 by 0.8
    # max_det 2 over scores (0.9, 0.7, 0.7): the 2nd highest is 0.7, and every score >= it stays.
    tied = torch.tensor([0.9, 0.7, 0.7])
    out = merge_detections(BOXES, tied, torch.tensor([0, 1, 2]), merge="nms", vote_thresh=0.66, nms_thresh=0.6,
                           score_thresh=0.05, max_det=2)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7, 0.7])
    with pytest.raises(ValueError, match="merge"):
        merge_detections(BOXES, SCORES, labels, merge="wbf", vote_thresh=0.66, nms_thresh=0.6,
                         score_thresh=0.05, max_det=100)
