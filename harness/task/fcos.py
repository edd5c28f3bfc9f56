"""A small FCOS head (Tian et al., "FCOS: Fully Convolutional One-Stage Object Detection", 2019).

Anchor-free: every location of every level predicts class scores (sigmoid, focal loss), the
distances to the four sides of its box (GIoU loss) and a centerness (BCE) that down-weights
off-centre predictions at test time. The levels are the backbone stages the head reads, merged
top-down as in an FPN. Targets use FCOS's size ranges per level (a level of stride ``s`` takes
boxes whose largest side distance lies in ``(k s_prev, k s]``, FCOS's ``k = 8`` for 800-px images,
scaled down for small canvases by ``head.range_factor``; the first level takes everything smaller,
the last everything larger) and centre sampling (radius 1.5 strides); a box that no location
would learn from (smaller than a stride) gets the location nearest its centre.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FCOSHead",
    "fcos_targets",
    "level_ranges",
    "fcos_loss",
    "fcos_postprocess",
    "level_points",
    "nms",
    "box_iou",
]


def _groups(c: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)


class FCOSHead(nn.Module):
    """``forward(features: list[(B, C_l, H_l, W_l)]) -> (cls [(B, K, H_l, W_l)], ltrb [(B, 4, H_l, W_l)]
    in pixels, centerness [(B, 1, H_l, W_l)])``, levels ordered fine to coarse."""

    def __init__(
        self,
        in_channels: list[int],
        strides: list[int],
        num_classes: int,
        channels: int = 64,
        num_convs: int = 2,
        prior_prob: float = 0.01,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(
                f"one stride per input level: got {len(in_channels)} levels, {len(strides)} strides"
            )
        self.strides = list(strides)
        self.num_classes = num_classes
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in in_channels)

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            for _ in range(num_convs):
                layers += [
                    nn.Conv2d(channels, channels, 3, padding=1),
                    nn.GroupNorm(_groups(channels), channels),
                    nn.ReLU(inplace=True),
                ]
            return nn.Sequential(*layers)

        self.cls_tower, self.reg_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(channels, 4, 3, padding=1)
        self.centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(strides)))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for lat in self.lateral:  # lateral convs see backbone features of any scale: keep their gain
            nn.init.kaiming_uniform_(cast(nn.Conv2d, lat).weight, a=1)
        nn.init.constant_(cast(torch.Tensor, self.cls_logits.bias), -math.log((1 - prior_prob) / prior_prob))

    def forward(
        self, features: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        lat = [conv(f) for conv, f in zip(self.lateral, features)]
        for i in range(len(lat) - 2, -1, -1):  # top-down: coarse context into finer levels
            lat[i] = lat[i] + F.interpolate(lat[i + 1], size=lat[i].shape[-2:], mode="nearest")
        cls, ltrb, ctr = [], [], []
        for i, p in enumerate(lat):
            p = self.smooth[i](p)
            c, r = self.cls_tower(p), self.reg_tower(p)
            cls.append(self.cls_logits(c))
            # Distances in units of the stride, exp keeps them positive; clamped so a bad step cannot overflow.
            ltrb.append(
                torch.exp((self.scales[i] * self.bbox_pred(r)).float().clamp(max=10.0)) * self.strides[i]
            )
            ctr.append(self.centerness(r))
        return cls, ltrb, ctr


def level_points(
    shapes: list[tuple[int, int]], strides: list[int], device: torch.device
) -> list[torch.Tensor]:
    """Centres of every location per level: ``[(H_l * W_l, 2)]`` (x, y) pixels, row-major."""
    out = []
    for (h, w), s in zip(shapes, strides):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) * s
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))
    return out


def level_ranges(strides: list[int], factor: float = 8.0) -> list[tuple[float, float]]:
    """``(lo, hi]`` of the reach each level takes: ``hi = factor * stride`` (FCOS: 8), the first level
    from 0, the last to infinity."""
    his = [factor * s for s in strides[:-1]] + [math.inf]
    los = [0.0] + his[:-1]
    return list(zip(los, his))


def fcos_targets(
    points: list[torch.Tensor],
    strides: list[int],
    boxes: torch.Tensor,
    labels: torch.Tensor,
    radius: float = 1.5,
    range_factor: float = 8.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's targets over all levels' points (concatenated, ``P`` in all).

    ``boxes (M, 4)`` xyxy pixels, ``labels (M,)``. Returns ``cls (P,)`` int64 (-1 background) and
    ``box (P, 4)`` the assigned ground-truth box (xyxy) of each location (zeros for background).
    ``range_factor`` scales the levels' size ranges (``level_ranges``)."""
    pts = torch.cat(points)  # (P, 2)
    p = pts.shape[0]
    ranges = level_ranges(strides, range_factor)
    if boxes.numel() == 0:
        return torch.full((p,), -1, dtype=torch.int64, device=pts.device), pts.new_zeros(p, 4)
    boxes = boxes.to(pts)
    per_level = [len(x) for x in points]
    stride = torch.cat([pts.new_full((n,), float(s)) for n, s in zip(per_level, strides)])  # (P,)
    lo_hi = torch.cat([pts.new_tensor(rng).expand(n, 2) for n, rng in zip(per_level, ranges)])  # (P, 2)
    x, y = pts[:, 0:1], pts[:, 1:2]  # (P, 1)
    ltrb = torch.stack([x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y], -1)  # (P, M, 4)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2  # (M,)
    r = radius * stride[:, None]  # (P, 1)
    in_centre = (
        (x > torch.maximum(boxes[:, 0], cx - r))
        & (x < torch.minimum(boxes[:, 2], cx + r))
        & (y > torch.maximum(boxes[:, 1], cy - r))
        & (y < torch.minimum(boxes[:, 3], cy + r))
    )  # (P, M)
    reach = ltrb.max(-1).values  # (P, M)
    in_range = (reach > lo_hi[:, 0:1]) & (reach <= lo_hi[:, 1:2])
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand(p, -1)  # (P, M)
    cand = in_centre & in_range

    # A box no location learns from (smaller than a stride, or between points) gets the location
    # nearest its centre on the level its size belongs to.
    cand |= _nearest_locations(pts, per_level, ranges, boxes) & ~cand.any(0, keepdim=True)

    area = torch.where(cand, area, torch.full_like(area, math.inf))
    best, idx = area.min(1)  # the smallest box wins an ambiguous location
    pos = torch.isfinite(best)
    cls = torch.where(pos, labels.to(pts.device)[idx], torch.full_like(idx, -1))
    box = torch.where(pos[:, None], boxes[idx], torch.zeros_like(boxes[idx]))
    return cls, box


def _nearest_locations(
    pts: torch.Tensor, per_level: list[int], ranges: list[tuple[float, float]], boxes: torch.Tensor
) -> torch.Tensor:
    """``(P, M)`` bool: for each box, the location nearest its centre (the first of equals) on the
    level its size belongs to (the first whose range reaches half its longer side). Every box at
    once, on the device: no loop over boxes, no host sync."""
    half = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 2  # (M,)
    his = pts.new_tensor([hi for _, hi in ranges[:-1]])  # (L-1,): the last level takes the rest
    level = (half[:, None] > his[None, :]).sum(1)  # (M,)
    level_of = torch.cat([pts.new_full((n,), i, dtype=torch.int64) for i, n in enumerate(per_level)])  # (P,)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # (M, 2)
    d = ((pts[:, None, :] - centre[None]) ** 2).sum(-1)  # (P, M)
    d = torch.where(level_of[:, None] == level[None, :], d, torch.full_like(d, math.inf))
    nearest = torch.zeros_like(d, dtype=torch.bool)
    return nearest.scatter_(0, d.argmin(0, keepdim=True), True)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of xyxy boxes ``a (N, 4)``, ``b (M, 4)`` -> ``(N, M)``."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None] - inter).clamp(min=1e-9)


def _giou_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """``1 - GIoU`` of matched xyxy boxes ``(n, 4)`` -> ``(n,)``."""
    lt = torch.maximum(pred[:, :2], gt[:, :2])
    rb = torch.minimum(pred[:, 2:], gt[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = (pred[:, 2:] - pred[:, :2]).prod(-1) + (gt[:, 2:] - gt[:, :2]).prod(-1) - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.maximum(pred[:, 2:], gt[:, 2:]) - torch.minimum(pred[:, :2], gt[:, :2])).prod(-1)
    return 1 - iou + (hull - union) / hull.clamp(min=1e-6)


def _focal_loss(
    logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    return (ce * (1 - p_t) ** gamma * (alpha * target + (1 - alpha) * (1 - target))).sum()


def _flatten(levels: list[torch.Tensor]) -> torch.Tensor:
    """``[(B, D, H_l, W_l)] -> (B, P, D)``, row-major within a level, levels in order."""
    return torch.cat([x.flatten(2).transpose(1, 2) for x in levels], 1)


def fcos_loss(
    cls: list[torch.Tensor],
    ltrb: list[torch.Tensor],
    ctr: list[torch.Tensor],
    strides: list[int],
    targets: list[dict],
    range_factor: float = 8.0,
    radius: float = 1.5,
    count_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Focal (classes) + GIoU (boxes) + BCE (centerness), each normalised by the number of positive
    locations in the batch (at least 1). ``targets[i]``: ``boxes (n, 4)`` xyxy pixels, ``labels (n,)``;
    ``range_factor``, ``radius``: ``fcos_targets``.

    ``count_mean``: averages a 0-dim tensor over the data-parallel ranks (collective). With it the
    normaliser is the mean positive count of all ranks, as FCOS's reference does: averaged over the
    ranks, the gradient is then that of the whole global batch's loss over all its positives, not
    a mean of per-rank ratios that weights a rank with few objects as much as one with many."""
    points = level_points([(x.shape[-2], x.shape[-1]) for x in cls], strides, cls[0].device)
    pts = torch.cat(points)
    cls_f, ltrb_f, ctr_f = _flatten(cls).float(), _flatten(ltrb).float(), _flatten(ctr).float()[..., 0]
    tc, tb = zip(
        *(fcos_targets(points, strides, t["boxes"], t["labels"], radius, range_factor) for t in targets)
    )
    tcls, tbox = torch.stack(tc), torch.stack(tb)  # (B, P), (B, P, 4)
    pos = tcls >= 0
    count = pos.sum().to(torch.float32)
    if count_mean is not None:
        count = count_mean(count)
    num_pos = count.clamp(min=1.0)  # a tensor: no device sync
    # Every location is computed and the background weighted 0, rather than the positives gathered:
    # no data-dependent shape, so no host sync, and every output stays in the graph when a batch has
    # no positive at all.
    onehot = (tcls[..., None] == torch.arange(cls_f.shape[-1], device=tcls.device)).to(cls_f)  # (B, P, K)
    loss_cls = _focal_loss(cls_f, onehot) / num_pos
    w = pos.to(cls_f)  # (B, P)
    p_xy = pts[None].expand(len(targets), -1, -1)  # (B, P, 2)
    pred_box = torch.cat([p_xy - ltrb_f[..., :2], p_xy + ltrb_f[..., 2:]], -1)  # (B, P, 4)
    loss_box = (_giou_loss(pred_box.reshape(-1, 4), tbox.reshape(-1, 4)) * w.reshape(-1)).sum() / num_pos
    lr_ = torch.stack([p_xy[..., 0] - tbox[..., 0], tbox[..., 2] - p_xy[..., 0]], -1).clamp(
        min=0
    )  # (B, P, 2)
    tb_ = torch.stack([p_xy[..., 1] - tbox[..., 1], tbox[..., 3] - p_xy[..., 1]], -1).clamp(min=0)
    centerness = torch.sqrt(
        (lr_.min(-1).values / lr_.max(-1).values.clamp(min=1e-6))
        * (tb_.min(-1).values / tb_.max(-1).values.clamp(min=1e-6))
    )  # (B, P); 0 on the background (its box is zeros)
    bce = F.binary_cross_entropy_with_logits(ctr_f, centerness, reduction="none")  # (B, P)
    loss_ctr = (bce * w).sum() / num_pos
    return {"cls": loss_cls, "box": loss_box, "ctr": loss_ctr, "num_pos": count.detach()}


@torch.no_grad()
def fcos_postprocess(
    cls: list[torch.Tensor],
    ltrb: list[torch.Tensor],
    ctr: list[torch.Tensor],
    strides: list[int],
    image_size: tuple[int, int],
    *,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.6,
    max_detections: int = 100,
    pre_nms: int = 1000,
) -> list[dict[str, torch.Tensor]]:
    """Per image: ``boxes (n, 4)`` xyxy pixels of the network's input (clipped to ``image_size``
    (h, w)), ``scores (n,)`` = sqrt(class prob * centerness), ``labels (n,)`` 0-based; class-wise NMS."""
    points = torch.cat(level_points([(x.shape[-2], x.shape[-1]) for x in cls], strides, cls[0].device))
    prob = torch.sqrt(
        torch.sigmoid(_flatten(cls).float()) * torch.sigmoid(_flatten(ctr).float())
    )  # (B, P, K)
    dist = _flatten(ltrb).float()  # (B, P, 4)
    h, w = image_size
    num_classes = prob.shape[-1]
    out = []
    for b in range(prob.shape[0]):
        scores = prob[b].flatten()  # (P * K,)
        keep = (scores > score_thresh).nonzero().flatten()
        if keep.numel() > pre_nms:
            keep = keep[scores[keep].topk(pre_nms).indices]
        s = scores[keep]
        loc, label = keep // num_classes, keep % num_classes
        p, d = points[loc], dist[b, loc]
        boxes = torch.cat([p - d[:, :2], p + d[:, 2:]], 1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        idx = nms(boxes, s, nms_thresh, groups=label, max_keep=max_detections)
        out.append({"boxes": boxes[idx], "scores": s[idx], "labels": label[idx]})
    return out


def nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_thresh: float,
    groups: torch.Tensor | None = None,
    max_keep: int | None = None,
) -> torch.Tensor:
    """Greedy non-maximum suppression within each group (e.g. class): the indices kept, by falling
    score, at most ``max_keep`` (it stops there, which is what makes it cheap)."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    b = boxes.detach().double().cpu().numpy()
    if groups is not None:  # push each group's boxes apart so they never overlap another group's
        b = b + (groups.detach().cpu().numpy().astype(np.float64) * (b.max() + 1))[:, None]
    order = scores.detach().float().cpu().numpy().argsort(kind="stable")[::-1]
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep: list[int] = []
    while order.size and (max_keep is None or len(keep) < max_keep):
        i, rest = order[0], order[1:]
        keep.append(int(i))
        iw = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        ih = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = iw * ih
        iou = inter / np.maximum(area[i] + area[rest] - inter, 1e-9)
        order = rest[iou <= iou_thresh]
    return torch.as_tensor(keep, dtype=torch.int64, device=boxes.device)
