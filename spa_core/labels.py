"""Selection labels for the gate (SPA, arXiv 2410.23608): which tokens cover an object.

All boxes of an image are merged into one binary mask of object pixels (or instance masks are used
directly); at every stage resolution a token is positive if any object pixel falls in its patch (a max
pool of the mask), or, with ``coverage``, if the covered fraction of its patch reaches that threshold.

A pixel ``(y, x)`` (the unit square ``[x, x+1) x [y, y+1)``) is an object pixel of a box ``x1 y1 x2 y2``
(pixels, xyxy) when the box overlaps it with positive area: ``floor(x1) <= x < ceil(x2)``.

A token of a grid ``(h, w)`` covers the pixels of its patch: with stride ``s`` (the smallest power of
two with ``ceil(H/s) == h``, the backbone's rule: pad to the patch, pad odd maps before merging),
rows ``[i*s, (i+1)*s)`` clipped to the image. Grids that match no power of two fall back to adaptive
pooling (proportional cells). The covered fraction counts only pixels inside the image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["boxes_to_mask", "selection_labels_from_boxes", "selection_labels_from_masks"]


def boxes_to_mask(boxes: list[Tensor], image_hw: tuple[int, int], device=None) -> Tensor:
    """boxes: per image (n_i, 4) xyxy pixels -> (B, H, W) float mask of object pixels (0 or 1).
    Boxes are clipped to the image; empty or degenerate boxes mark nothing."""
    H, W = image_hw
    if device is None:
        device = boxes[0].device if len(boxes) else torch.device("cpu")
    mask = torch.zeros(len(boxes), H, W, device=device)
    ys = torch.arange(H, device=device)
    xs = torch.arange(W, device=device)
    for b, bx in enumerate(boxes):
        if bx.numel() == 0:
            continue
        bx = bx.to(device=device, dtype=torch.float64).reshape(-1, 4)
        x1, y1 = bx[:, 0].floor()[:, None], bx[:, 1].floor()[:, None]
        x2, y2 = bx[:, 2].ceil()[:, None], bx[:, 3].ceil()[:, None]
        in_x = (xs[None] >= x1) & (xs[None] < x2)  # (n, W)
        in_y = (ys[None] >= y1) & (ys[None] < y2)  # (n, H)
        mask[b] = (in_y[:, :, None] & in_x[:, None, :]).any(0).float()
    return mask


def _stride(size: int, cells: int) -> int | None:
    if cells <= 0 or size <= 0:
        return None
    s = 1 << max(0, math.ceil(math.log2(size / cells)))
    for cand in (s // 2, s, 2 * s):
        if cand >= 1 and -(-size // cand) == cells:
            return cand
    return None


def _pool(mask: Tensor, grid: tuple[int, int], coverage: float | None) -> Tensor:
    """mask: (B, H, W) float -> (B, h, w) labels."""
    B, H, W = mask.shape
    h, w = grid
    sh, sw = _stride(H, h), _stride(W, w)
    m = mask[:, None]  # (B, 1, H, W)
    if sh is None or sw is None:
        if coverage is None:
            return F.adaptive_max_pool2d(m, (h, w))[:, 0]
        return (F.adaptive_avg_pool2d(m, (h, w))[:, 0] >= coverage).to(mask.dtype)
    ph, pw = h * sh - H, w * sw - W
    if coverage is None:
        return F.max_pool2d(F.pad(m, (0, pw, 0, ph)), (sh, sw))[:, 0]
    covered = F.avg_pool2d(F.pad(m, (0, pw, 0, ph)), (sh, sw), divisor_override=1)  # object pixels per cell
    inside = F.avg_pool2d(F.pad(torch.ones_like(m[:1]), (0, pw, 0, ph)), (sh, sw), divisor_override=1)
    return (covered / inside >= coverage)[:, 0].to(mask.dtype)


def selection_labels_from_masks(
    masks: Tensor, grids: list[tuple[int, int]], coverage: float | None = None
) -> dict[tuple[int, int], Tensor]:
    """masks: (B, H, W) (bool or float, nonzero = object) -> {grid (h, w): (B, h, w) float 0/1}.

    coverage: None -> positive if any object pixel is in the token's patch; else positive if the
    object pixels are at least this fraction of the patch's pixels inside the image.
    """
    if coverage is not None and not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    m = (masks != 0).to(torch.float32)
    distinct = dict.fromkeys((int(h), int(w)) for h, w in grids)  # lists or tuples, in order
    return {g: _pool(m, g, coverage) for g in distinct}


def selection_labels_from_boxes(
    boxes: list[Tensor],
    image_hw: tuple[int, int],
    grids: list[tuple[int, int]],
    coverage: float | None = None,
) -> dict[tuple[int, int], Tensor]:
    """boxes: per image (n_i, 4) xyxy pixels of the (resized) image of size ``image_hw`` ->
    {grid (h, w): (B, h, w) float 0/1}; see ``selection_labels_from_masks`` for ``coverage``."""
    return selection_labels_from_masks(boxes_to_mask(boxes, image_hw), grids, coverage)
