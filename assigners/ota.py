"""Optimal Transport Assignment (``ota``): Ge et al., CVPR 2021.

OTA treats label assignment as an optimal-transport problem: every real GT is a supplier
of ``mu_g`` units of "positive label", the background is one more supplier holding the
rest, and every anchor demands one unit. The cheapest plan (entropy-regularised, solved by
Sinkhorn-Knopp) decides which supplier each anchor gets its label from.

Source: Megvii-BaseDetection/OTA, ``playground/detection/coco/ota.res50.fpn.coco.800size.1x``
(``fcos.py`` is the same file in the res101/x101/x101.dcnv2 playgrounds), method
``FCOS.get_ground_truth`` and class ``SinkhornDistance``; its helpers from cvpods
(``Shift2BoxTransform.get_deltas``, ``sigmoid_focal_loss_jit``). Per image:

1. Candidates (centre prior), fcos.py:256-275: anchor ``a`` (its location is the anchor
   centre) is a candidate of GT ``g`` when it lies inside the GT by more than 0.01 px
   (min of the four distances > 0.01, fcos.py:259) AND inside the GT's centre region, the
   square of half-side ``center_radius * stride`` (2.5, hard-coded at fcos.py:261; the
   config key MODEL.FCOS.CENTER_SAMPLING_RADIUS is not read there) around the GT centre,
   clipped to the GT box, strictly (> 0, fcos.py:266-272). (Given the AND, the clipping
   changes nothing: a location inside the box by 0.01 px is inside it by > 0.)
2. Cost of GT ``g`` for anchor ``a``, fcos.py:286-311:
   ``focal(cls_logits[a], one_hot(label_g)).sum()  +  reg_weight * -log(IoU(pred_box[a], box_g))
   + 1e6 * (a is not a candidate of g)``, with the sigmoid focal loss of cvpods (alpha 0.25,
   gamma 2, config.py MODEL.FCOS.FOCAL_LOSS_ALPHA/GAMMA), the IoU and loss of
   ``get_ious_and_iou_loss(..., loss_type='iou')`` (fcos.py:47-113: areas clamped at 0,
   union clamped at float32 eps, IoU clamped at eps before the log; note that config.py's
   IOU_LOSS_TYPE "giou" is the training loss, not the cost) and reg_weight 1.5
   (MODEL.OTA.REG_WEIGHT). The background's cost for anchor ``a`` is the focal loss of its
   logits against an all-zero target, summed over classes (fcos.py:293-298).
3. Supplies (dynamic k), fcos.py:314-317: ``mu_g = max(1, int(sum of the top_candidates
   largest IoU(pred, box_g) over anchors, IoUs of non-candidates set to 0))`` with
   top_candidates 20 (MODEL.OTA.TOP_CANDIDATES); the background supplies
   ``num_anchors - sum_g mu_g``. Demands ``nu_a = 1`` (fcos.py:318).
4. Sinkhorn-Knopp in the log domain, fcos.py:665-715: ``sinkhorn_iters`` (50,
   MODEL.OTA.SINKHORN_ITER) rounds of first the anchor potentials, then the supplier
   potentials, ``v = eps (log(nu + 1e-8) - logsumexp_i M) + v``,
   ``u = eps (log(mu + 1e-8) - logsumexp_a M) + u``, ``M = (-C + u + v) / eps``, eps 0.1
   (MODEL.OTA.SINKHORN_EPS); plan ``pi = exp(M)``.
5. Each supplier's row of ``pi`` is divided by its max (fcos.py:325-326), and every anchor
   takes the supplier of the largest rescaled value (fcos.py:328): a GT makes it positive,
   the background negative. (fcos.py:340-342 also keep the IoU of each positive's
   prediction with its GT as the target of the IoU branch; the ``Assignment`` contract has
   no field for it, and the classification target is a hard 1, fcos.py:380.)

Where this implementation departs, and why:

- Batched over images and GT slots: one (B, G + 1, A) cost tensor, the background in row G;
  padded GT rows get no supply and are -inf in the log domain, so they neither receive
  anchors nor change the real rows (the background supplies A minus the real GTs' mu).
  The focal cost is computed without the (B, G, A, C) tensor: the sum over classes against
  the one-hot label is the background cost minus the label's negative term plus its
  positive term.
- Locations are the anchor centres (one square anchor per location), whatever grid offset
  the detector uses (cvpods' shift generator has OFFSET 0.0).
- The potentials are kept in nats (u / eps, v / eps) and start at 0 rather than 1; each
  update does not depend on the previous value of the potential it replaces, and a constant
  start value of u only shifts v by a constant that the next u update removes, so the
  iterates are the official ones up to rounding. (A per-row shift of the costs would give
  the same limit but other iterates after 50 rounds, so none is made: as officially, in
  float32 the costs of a GT without candidates, all near 1e6, are resolved to 1/16 only.)
- In the log-sum-exps, terms below the smallest normal float relative to the largest term
  are counted as 0 instead of being exponentiated (far below the rounding of the sum; it
  makes the CPU Sinkhorn about twice as fast, ``exp`` of underflowing arguments is slow).
- IoU is the official formula (clamped areas) on xyxy boxes, not torchvision ``box_iou``:
  the official ltrb predictions are >= 0 (ReLU), here a decoded box may be inverted and
  ``box_iou`` would give it a negative area.
- Ties: after rescaling, every row's maximum is exactly 1, so two GTs whose best anchor is
  the same anchor tie exactly (``torch.max`` then takes the lower index, an order effect).
  Here the tie goes to the supplier with the larger raw share ``pi`` of that anchor, then to
  the lower slot index (the background last): the result follows the GTs when their slots
  are permuted, unless two GTs are identical. An anchor whose every rescaled share
  underflows to 0 is negative.
- Robustness the official code does not need: an anchor with any non-finite logit or box
  coordinate (or a non-finite cost) is no candidate, costs +inf for every GT (it cannot be
  any GT's, not even the cheapest anchor of a GT without candidates) and 0 for the
  background, so it is negative (officially NaN would spread through the plan); the
  background supply is clamped at 0 when the GTs' supplies exceed the anchors (officially
  log of a negative number); top_candidates is capped at the number of anchors.
- Memory: images are solved in groups of at most ``DENSE_MAX_PAIRS`` (GT slot, anchor) pairs
  (``assign_in_image_chunks``; images are independent, as in the official per-image loop), so
  the (B, G + 1, A) Sinkhorn tensors stay bounded on images with many GTs.
- GTs with no candidate (a tiny box between locations): as officially, every cost of the
  GT carries the same 1e6 penalty, which does not change its plan, and it still supplies
  mu = 1 unit, so it usually ends with one positive, the anchor of its lowest cost
  (relative to the background), outside any centre prior. Empty (zero-area) and crowd
  boxes are dropped by cvpods' data pipeline before assignment (``filter_empty_instances``,
  ``iscrowd``); here ``gt_mask`` decides, and a real zero-area GT is a GT without candidates.
- ``num_candidates`` counts the centre-prior candidates of each GT (step 1, predictions not
  looked at).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import (
    DENSE_MAX_PAIRS,
    NEGATIVE,
    Assigner,
    AssignInputs,
    Assignment,
    assign_in_image_chunks,
    check_positive_int,
    check_real,
)
from .geometry import box_centers, centers_inside_boxes
from .registry import register_assigner

INSIDE_MARGIN = 0.01  # fcos.py:259, deltas.min(dim=-1).values > 0.01
NON_CANDIDATE_COST = 1e6  # fcos.py:311, 1e6 * (1 - is_in_boxes.float())
MARGINAL_EPS = 1e-8  # fcos.py:695-698, log(nu + 1e-8), log(mu + 1e-8)
IOU_EPS = torch.finfo(torch.float32).eps  # fcos.py:73, whatever the dtype


def _softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)), exactly (no linear cut-off as in ``F.softplus``): max(x, 0) + log1p(exp(-|x|))."""
    return x.clamp(min=0) + torch.log1p(torch.exp(-x.abs()))


def focal_terms(logits: Tensor, alpha: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Sigmoid focal loss of every logit against target 0 and against target 1.

    Returns (negative, positive), each shaped like ``logits``:
    negative = (1 - alpha) p^gamma (-log(1 - p)), positive = alpha (1 - p)^gamma (-log p),
    p = sigmoid(x): the two values ``torchvision.ops.sigmoid_focal_loss`` (and cvpods'
    ``sigmoid_focal_loss``) takes for a target of 0 and of 1.
    """
    negative = torch.sigmoid(logits).pow_(gamma).mul_(_softplus(logits)).mul_(1.0 - alpha)
    positive = torch.sigmoid(-logits).pow_(gamma).mul_(_softplus(-logits)).mul_(alpha)
    return negative, positive


def prediction_iou(pred_boxes: Tensor, gt_boxes: Tensor) -> Tensor:
    """(B, G, A) IoU of each anchor's predicted box (B, A, 4) with each GT box (B, G, 4), xyxy.

    The formula of OTA's ``get_ious_and_iou_loss`` (fcos.py:73-87): widths and heights of
    both boxes clamped at 0, union clamped at float32 eps.
    """
    px1, py1, px2, py2 = (c.unsqueeze(1) for c in pred_boxes.unbind(-1))  # (B, 1, A)
    gx1, gy1, gx2, gy2 = (c.unsqueeze(2) for c in gt_boxes.unbind(-1))  # (B, G, 1)
    pred_area = (px2 - px1).clamp(min=0) * (py2 - py1).clamp(min=0)
    gt_area = (gx2 - gx1).clamp(min=0) * (gy2 - gy1).clamp(min=0)
    width = torch.minimum(px2, gx2).sub_(torch.maximum(px1, gx1)).clamp_(min=0)
    height = torch.minimum(py2, gy2).sub_(torch.maximum(py1, gy1)).clamp_(min=0)
    inter = width.mul_(height)
    union = (pred_area + gt_area).sub_(inter).clamp_(min=IOU_EPS)
    return inter.div_(union)


def centre_prior(
    anchor_centers: Tensor, gt_boxes: Tensor, num_anchors_per_level: list[int], strides: list[int], radius: float
) -> Tensor:
    """(B, G, A) bool: OTA's candidates, inside the GT by > 0.01 px and inside its clipped centre region.

    anchor_centers: (A, 2); gt_boxes: (B, G, 4). Level by level, as fcos.py:256-275: the
    centre region of a GT at a level of stride s is the box of half-side ``radius * s``
    around the GT centre, intersected with the GT box; a location is inside it when all
    four distances to its sides are > 0.
    """
    boxes = gt_boxes.unsqueeze(2)  # (B, G, 1, 4)
    centres = box_centers(gt_boxes)  # (B, G, 2)
    inside = []
    start = 0
    for count, stride in zip(num_anchors_per_level, strides):
        points = anchor_centers[start : start + count]
        start += count
        half = radius * stride
        region = torch.cat(
            [torch.maximum(centres - half, gt_boxes[..., :2]), torch.minimum(centres + half, gt_boxes[..., 2:])], dim=-1
        ).unsqueeze(2)
        inside.append(centers_inside_boxes(points, boxes, INSIDE_MARGIN) & centers_inside_boxes(points, region, 0.0))
    return torch.cat(inside, dim=-1)


def _logsumexp_(x: Tensor, dim: int) -> Tensor:
    """``torch.logsumexp(x, dim)``, overwriting ``x``; terms below the smallest normal float
    (relative to the largest term of their sum) count as exactly 0.

    Such terms are far below the rounding of a sum whose largest term is 1, so the result is
    the same to the last bits; they are left out because ``exp`` of an argument whose result
    underflows (here the 1e6 costs of non-candidates and the -inf of padded rows, most of the
    matrix) is an order of magnitude slower on CPU than ``exp`` of an ordinary one.
    """
    floor = math.log(torch.finfo(x.dtype).tiny) + 1.0
    top = x.amax(dim=dim, keepdim=True)
    top = torch.where(torch.isfinite(top), top, 0.0)  # an all -inf slice sums to 0: -inf
    x.sub_(top)
    negligible = x <= floor
    x.clamp_(min=floor).exp_().masked_fill_(negligible, 0.0)
    return x.sum(dim=dim).log_().add_(top.squeeze(dim))


def sinkhorn_plan(cost: Tensor, log_mu: Tensor, rows: Tensor, log_nu: float, eps: float, iters: int) -> Tensor:
    """Entropic OT plan of supplies ``exp(log_mu)`` (B, R) to demands ``exp(log_nu)`` per column.

    cost: (B, R, A), +inf where a row may not send anything to a column; rows: (B, R) bool,
    False rows take no part (their plan is 0, as is that of a row whose every cost is +inf).
    Every column needs a finite cost in some row. Log-domain Sinkhorn with the updates of
    OTA's ``SinkhornDistance`` (columns first, then rows), the potentials kept in nats.
    Returns the plan pi (B, R, A).
    """
    kernel = (cost / -eps).masked_fill_(~rows.unsqueeze(-1), float("-inf"))
    row_potential = torch.zeros_like(log_mu)
    column_potential = kernel.new_zeros(kernel.shape[0], kernel.shape[2])
    work = torch.empty_like(kernel)
    for _ in range(iters):
        torch.add(kernel, row_potential.unsqueeze(-1), out=work)
        column_potential = log_nu - _logsumexp_(work, dim=1)
        torch.add(kernel, column_potential.unsqueeze(1), out=work)
        row_sum = _logsumexp_(work, dim=2)
        row_potential = torch.where(rows & torch.isfinite(row_sum), log_mu - row_sum, 0.0)
    torch.add(kernel, row_potential.unsqueeze(-1), out=work)
    return work.add_(column_potential.unsqueeze(1)).exp_()


@register_assigner("ota", uses_predictions=True)
class OTAAssigner(Assigner):
    """OTA; see the module docstring. Defaults: the official FCOS-R50 1x config (config.py, fcos.py).

    top_candidates: IoUs summed for a GT's dynamic k (MODEL.OTA.TOP_CANDIDATES, 20).
    reg_weight: weight of the -log IoU cost (MODEL.OTA.REG_WEIGHT, 1.5).
    sinkhorn_eps: entropic regularisation (MODEL.OTA.SINKHORN_EPS, 0.1).
    sinkhorn_iters: Sinkhorn iterations (MODEL.OTA.SINKHORN_ITER, 50).
    center_radius: half-side of the centre region in strides (fcos.py:261, 2.5).
    focal_alpha, focal_gamma: focal classification cost (MODEL.FCOS.FOCAL_LOSS_ALPHA/GAMMA).
    """

    def __init__(
        self,
        top_candidates: int = 20,
        reg_weight: float = 1.5,
        sinkhorn_eps: float = 0.1,
        sinkhorn_iters: int = 50,
        center_radius: float = 2.5,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ):
        check_positive_int(top_candidates, "top_candidates")
        check_positive_int(sinkhorn_iters, "sinkhorn_iters")
        check_real(reg_weight, "reg_weight", low=0.0, low_inclusive=True)
        check_real(sinkhorn_eps, "sinkhorn_eps", low=0.0, low_inclusive=False)
        check_real(center_radius, "center_radius", low=0.0, low_inclusive=False)
        check_real(focal_alpha, "focal_alpha", low=0.0, low_inclusive=True, high=1.0)
        check_real(focal_gamma, "focal_gamma", low=0.0, low_inclusive=True)
        self.top_candidates = top_candidates
        self.reg_weight = float(reg_weight)
        self.sinkhorn_eps = float(sinkhorn_eps)
        self.sinkhorn_iters = sinkhorn_iters
        self.center_radius = float(center_radius)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    def assign(self, inputs: AssignInputs) -> Assignment:
        inputs.require_strides(self.name)
        b, g = inputs.batch_size, inputs.num_gt_slots
        a = inputs.anchors.shape[0]
        device = inputs.anchors.device
        gt_mask = inputs.gt_mask
        if g == 0 or a == 0 or not bool(gt_mask.any()):
            return Assignment(
                gt_index=torch.full((b, a), NEGATIVE, dtype=torch.int64, device=device),
                num_candidates=torch.zeros((b, g), dtype=torch.int64, device=device),
            )
        return assign_in_image_chunks(self._assign, inputs, DENSE_MAX_PAIRS)

    def _assign(self, inputs: AssignInputs) -> Assignment:
        b, g = inputs.batch_size, inputs.num_gt_slots
        a = inputs.anchors.shape[0]
        device = inputs.anchors.device
        gt_mask = inputs.gt_mask
        dtype = inputs.gt_boxes.dtype
        gt_boxes = inputs.gt_boxes
        anchors = inputs.anchors.to(dtype)
        logits = inputs.cls_logits.detach().to(dtype)
        pred_boxes = inputs.pred_boxes.detach().to(dtype)
        num_classes = logits.shape[-1]
        real = gt_mask.unsqueeze(-1)  # (B, G, 1)

        # Step 1: centre-prior candidates.
        prior = centre_prior(
            box_centers(anchors), gt_boxes, inputs.num_anchors_per_level, inputs.strides, self.center_radius
        )
        prior &= real
        num_candidates = prior.sum(dim=-1)

        # Step 2: costs. Background: focal loss against all-zero targets, summed over classes.
        negative, positive = focal_terms(logits, self.focal_alpha, self.focal_gamma)  # (B, A, C)
        background_cost = negative.sum(dim=-1)  # (B, A)
        # Per GT: the same sum with the label's negative term swapped for its positive term.
        labels = torch.where(gt_mask, inputs.gt_labels, 0).clamp(0, num_classes - 1)
        label_index = labels.unsqueeze(-1).expand(b, g, a)
        label_negative = negative.transpose(1, 2).gather(1, label_index)  # (B, G, A)
        label_positive = positive.transpose(1, 2).gather(1, label_index)
        del negative, positive
        iou = prediction_iou(pred_boxes, gt_boxes)  # (B, G, A)
        cost = label_positive.sub_(label_negative).add_(background_cost.unsqueeze(1))
        del label_negative
        cost.add_(iou.clamp(min=IOU_EPS).log_().mul_(-self.reg_weight))

        # Anchors whose predictions (or costs) are not finite can go to no GT (infinite cost,
        # so no candidate either) and cost the background nothing.
        valid_anchor = (
            torch.isfinite(logits).all(dim=-1)
            & torch.isfinite(pred_boxes).all(dim=-1)
            & torch.isfinite(background_cost)
        )
        finite = torch.isfinite(cost) & valid_anchor.unsqueeze(1)
        candidate = prior & finite
        cost = cost.add_(torch.where(candidate, 0.0, NON_CANDIDATE_COST)).masked_fill_(~finite, float("inf"))
        background_cost = torch.where(valid_anchor, background_cost, 0.0)

        # Step 3: supplies. Dynamic k of each real GT; the background holds the remaining anchors.
        candidate_iou = torch.where(candidate, iou, 0.0)
        del iou
        top_iou = candidate_iou.topk(min(self.top_candidates, a), dim=-1).values
        mu = top_iou.sum(dim=-1).int().clamp(min=1).to(dtype)
        mu = torch.where(gt_mask, mu, 0.0)
        background_mu = (a - mu.sum(dim=1, keepdim=True)).clamp(min=0)
        supplies = torch.cat([mu, background_mu], dim=1)  # (B, G + 1)
        rows = torch.cat([gt_mask, gt_mask.new_ones(b, 1)], dim=1)
        log_mu = torch.where(rows, (supplies + MARGINAL_EPS).log(), 0.0)

        # Step 4: Sinkhorn over GT rows and the background row.
        full_cost = torch.cat([cost, background_cost.unsqueeze(1)], dim=1)  # (B, G + 1, A)
        del cost
        log_nu = math.log(1.0 + MARGINAL_EPS)
        pi = sinkhorn_plan(full_cost, log_mu, rows, log_nu, self.sinkhorn_eps, self.sinkhorn_iters)
        del full_cost

        # Step 5: rescale each row by its max; each anchor takes the supplier of the largest
        # rescaled share, ties to the larger raw share, then to the lower row.
        row_max = pi.amax(dim=-1, keepdim=True).clamp_(min=torch.finfo(dtype).tiny)
        share = torch.where(rows.unsqueeze(-1), pi / row_max, -1.0)
        best = share.amax(dim=1, keepdim=True)  # (B, 1, A)
        tied = share == best
        raw = torch.where(tied, pi, -1.0)
        winner_mask = tied & (raw == raw.amax(dim=1, keepdim=True))
        row_index = torch.arange(g + 1, device=device).view(1, g + 1, 1)
        winner = torch.where(winner_mask, row_index, g + 1).amin(dim=1)  # (B, A)
        positive_anchor = (winner < g) & (best.squeeze(1) > 0)
        return Assignment(gt_index=torch.where(positive_anchor, winner, NEGATIVE), num_candidates=num_candidates)


__all__ = ["OTAAssigner", "centre_prior", "focal_terms", "prediction_iou", "sinkhorn_plan"]
