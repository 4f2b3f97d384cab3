"""Inference on hand-built head outputs: thresholds, per-level top-k, NMS, clipping, score voting."""

import math

import torch

from detector import BoxCoder, DetectorOutput, build_scorer, postprocess, score_vote

LOW = 0.001  # class probability below every score threshold used here


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float32)
    return torch.log(p / (1 - p))


def hand_output(boxes, cls_prob, quality_prob=None, counts=None):
    """One-image DetectorOutput whose decoded boxes are ``boxes`` (A, 4) and class probabilities ``cls_prob`` (A, C)."""
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0]]).repeat(boxes.shape[0], 1)
    quality = None if quality_prob is None else logit(quality_prob)[None]
    return DetectorOutput(
        cls_logits=logit(cls_prob)[None],
        box_deltas=BoxCoder().encode(boxes, anchors)[None],
        quality=quality,
        anchors=anchors,
        num_anchors_per_level=counts or [boxes.shape[0]],
        strides=[8] * len(counts or [1]),
    )


# Three overlapping class-0 boxes and one class-1 box.
B0, B1, B2, B3 = [0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0], [0.0, 0.0, 10.0, 20.0], [2.0, 0.0, 12.0, 10.0]
S0, S1, S2, S3 = 0.9, 0.6, 0.5, 0.95
SIGMA = 0.025


def voted_b0_by_hand():
    # IoU(B0, B1) = 90 / 110 = 9/11; IoU(B0, B2) = 100 / 200 = 1/2; B0 votes for itself with IoU 1.
    w0 = S0 * math.exp(-((1 - 1) ** 2) / SIGMA)
    w1 = S1 * math.exp(-((1 - 9 / 11) ** 2) / SIGMA)  # = 0.6 * exp(-1.3223) = 0.15993
    w2 = S2 * math.exp(-((1 - 1 / 2) ** 2) / SIGMA)  # = 0.5 * exp(-10) = 2.27e-5
    total = w0 + w1 + w2
    return [
        (w0 * 0 + w1 * 1 + w2 * 0) / total,
        0.0,
        (w0 * 10 + w1 * 11 + w2 * 10) / total,
        (w0 * 10 + w1 * 10 + w2 * 20) / total,
    ]


def voted_b2_by_hand():
    # IoU(B2, B0) = 1/2; IoU(B2, B1) = 90 / (200 + 100 - 90) = 3/7.
    w0 = S0 * math.exp(-((1 - 1 / 2) ** 2) / SIGMA)
    w1 = S1 * math.exp(-((1 - 3 / 7) ** 2) / SIGMA)
    w2 = S2
    total = w0 + w1 + w2
    return [
        (w1 * 1) / total,
        0.0,
        (w0 * 10 + w1 * 11 + w2 * 10) / total,
        (w0 * 10 + w1 * 10 + w2 * 20) / total,
    ]


def test_score_vote_by_hand():
    candidates = torch.tensor([B0, B1, B2, B3])
    scores = torch.tensor([S0, S1, S2, S3])
    labels = torch.tensor([0, 0, 0, 1])
    voted = score_vote(torch.tensor([B0, B3]), torch.tensor([0, 1]), candidates, scores, labels, sigma=SIGMA)
    expected_b0 = torch.tensor(voted_b0_by_hand())
    torch.testing.assert_close(voted[0], expected_b0)
    torch.testing.assert_close(expected_b0, torch.tensor([0.15088, 0.0, 10.15088, 10.00021]), atol=1e-4, rtol=0)
    # B3 overlaps the class-0 boxes but only votes with its own class: itself, unchanged.
    torch.testing.assert_close(voted[1], torch.tensor(B3))


def test_score_vote_with_no_boxes():
    voted = score_vote(
        torch.zeros(0, 4),
        torch.zeros(0, dtype=torch.int64),
        torch.zeros(0, 4),
        torch.zeros(0),
        torch.zeros(0, dtype=torch.int64),
    )
    assert voted.shape == (0, 4)


def test_postprocess_nms_then_voting_keeps_scores():
    cls_prob = torch.full((4, 2), LOW)
    cls_prob[0, 0], cls_prob[1, 0], cls_prob[2, 0], cls_prob[3, 1] = S0, S1, S2, S3
    out = hand_output([B0, B1, B2, B3], cls_prob)
    scorer = build_scorer("none")
    plain = postprocess(out, [(30, 30)], scorer, nms_thresh=0.6)[0]
    # NMS at 0.6: B1 (IoU 9/11 with B0) is suppressed, B2 (IoU 1/2) survives; B3 is another class.
    torch.testing.assert_close(plain["boxes"], torch.tensor([B3, B0, B2]), atol=1e-4, rtol=0)
    torch.testing.assert_close(plain["scores"], torch.tensor([S3, S0, S2]))
    assert plain["labels"].tolist() == [1, 0, 0] and plain["labels"].dtype == torch.int64
    assert plain["quality"] is None

    voted = postprocess(out, [(30, 30)], scorer, nms_thresh=0.6, score_voting=True, voting_sigma=SIGMA)[0]
    expected = torch.tensor([B3, voted_b0_by_hand(), voted_b2_by_hand()])
    torch.testing.assert_close(voted["boxes"], expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(voted["scores"], plain["scores"])
    assert voted["labels"].tolist() == [1, 0, 0]


def test_postprocess_image_without_detections():
    out = hand_output([B0, B1], torch.full((2, 3), LOW), quality_prob=torch.tensor([0.9, 0.9]))
    result = postprocess(out, [(30, 30)], build_scorer("iou"), score_voting=True)[0]
    assert result["boxes"].shape == (0, 4) and result["scores"].shape == (0,) and result["labels"].shape == (0,)
    assert result["quality"].shape == (0,)


def test_threshold_per_level_topk_unified_score_and_clipping():
    boxes = [
        [-5.0, 2.0, 8.0, 8.0],  # level 0: p 0.9, q 0.5 -> sqrt(0.45); clipped to the 10-wide image
        [20.0, 20.0, 28.0, 28.0],  # level 0: p 0.8, q 0.5 -> sqrt(0.40): loses the level's top-1
        [40.0, 40.0, 48.0, 48.0],  # level 0: p 0.04 < threshold although sqrt(0.04 * 0.99) > 0.05
        [2.0, 10.0, 6.0, 18.0],  # level 1: p 0.7, q 0.9 -> sqrt(0.63)
        [60.0, 60.0, 68.0, 68.0],  # level 1: p 0.6, q 0.1 -> sqrt(0.06)
    ]
    cls_prob = torch.tensor([[0.9], [0.8], [0.04], [0.7], [0.6]])
    quality = torch.tensor([0.5, 0.5, 0.99, 0.9, 0.1])
    out = hand_output(boxes, cls_prob, quality, counts=[3, 2])
    scorer = build_scorer("iou")
    result = postprocess(out, [(20, 10)], scorer, score_thresh=0.05, pre_nms_top_n=1)[0]
    torch.testing.assert_close(result["scores"], torch.tensor([math.sqrt(0.63), math.sqrt(0.45)]))
    torch.testing.assert_close(
        result["boxes"], torch.tensor([[2.0, 10.0, 6.0, 18.0], [0.0, 2.0, 8.0, 8.0]]), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(result["quality"], torch.tensor([0.9, 0.5]))

    wide = postprocess(out, [(100, 100)], scorer, pre_nms_top_n=10)[0]
    assert len(wide["scores"]) == 4  # everything but the candidate under the class threshold
    assert len(postprocess(out, [(100, 100)], scorer, max_det=1)[0]["scores"]) == 1
    # Boxes clipped to nothing (entirely outside a 16x16 image) are removed.
    assert len(postprocess(out, [(16, 16)], scorer, pre_nms_top_n=10)[0]["scores"]) == 2


def test_postprocess_batch_of_two_images():
    cls_prob = torch.full((2, 1), LOW)
    cls_prob[0, 0] = 0.9
    first = hand_output([B0, B1], cls_prob)
    second = hand_output([B0, B1], torch.full((2, 1), LOW))
    out = DetectorOutput(
        torch.cat([first.cls_logits, second.cls_logits]),
        torch.cat([first.box_deltas, second.box_deltas]),
        None,
        first.anchors,
        first.num_anchors_per_level,
        first.strides,
    )
    results = postprocess(out, [(30, 30), (30, 30)], build_scorer("none"))
    assert [len(r["scores"]) for r in results] == [1, 0]
