"""Swin's relative position bias and shifted-window mask for packed tokens: the position part of the
attention op's contract in SPA (Select and Pack Attention, arXiv 2410.23608).

A Swin block adds ``table[idx(i, j), h]`` to the score of query i and key j in head h, where ``idx``
encodes the (row, column) offset of the two tokens inside their window, and, in a shifted block,
blocks the pairs that the cyclic shift brought together from different regions of the map. SPA packs
tokens of several windows into one sequence (containers, or one sequence per image), so the op takes
the places of the tokens instead of a window index:

- ``pos: (T, 3) int32``, for every packed token its ``(row, col, region)`` on the stage's grid.
  ``region`` is the id of the shift-mask region the token falls in (0 for every token of an
  unshifted block; ``spa_core.windows.shift_regions``); two tokens of different regions never attend
  to each other, which inside one shifted window is exactly Swin's mask.
- ``table: ((2M-1)^2, H)``, the block's learnable bias table, laid out as Swin's
  ``relative_position_bias_table`` (so a dense block's weights load into an SPA block unchanged).
- ``window: M``, the configured window size the table was built for.

``idx(i, j) = (clamp(dr, -(M-1), M-1) + M-1) * (2M-1) + clamp(dc, -(M-1), M-1) + M-1`` with
``dr = row_i - row_j`` and ``dc = col_i - col_j``. Inside one window (offsets within +-(M-1)) this is
Swin's index; two tokens farther apart than a window, which only packing brings together, get the
bias of the nearest offset the table holds (clamped per axis). A query always sees at least itself
(same region, offset 0), so no softmax row is empty.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["PositionBias", "relative_index", "pair_bias", "check_position_bias", "empty_output"]


class PositionBias(NamedTuple):
    """What the attention ops take to apply Swin's bias and shift mask to packed tokens.

    pos: (T, 3) int32 ``(row, col, region)`` per token; table: ((2M-1)^2, H) float; window: M."""

    pos: Tensor
    table: Tensor
    window: int


def relative_index(pos_q: Tensor, pos_k: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """Bias-table index and the shift mask of every (query, key) pair.

    pos_q: (..., Q, 3), pos_k: (..., K, 3) int -> (idx (..., Q, K) int64, allowed (..., Q, K) bool)."""
    M = int(window)
    d = pos_q[..., :, None, :2].to(torch.int64) - pos_k[..., None, :, :2].to(torch.int64)  # (..., Q, K, 2)
    d = d.clamp(-(M - 1), M - 1) + (M - 1)
    idx = d[..., 0] * (2 * M - 1) + d[..., 1]
    allowed = pos_q[..., :, None, 2] == pos_k[..., None, :, 2]
    return idx, allowed


def pair_bias(pos_q: Tensor, pos_k: Tensor, table: Tensor, window: int) -> Tensor:
    """Additive score bias per head: ``table[idx]`` where the pair may attend, ``-inf`` elsewhere.

    pos_q: (..., Q, 3), pos_k: (..., K, 3); table: ((2M-1)^2, H) -> (..., H, Q, K) in table's dtype.
    Differentiable in ``table`` (a gather)."""
    idx, allowed = relative_index(pos_q, pos_k, window)
    bias = table[idx]  # (..., Q, K, H)
    bias = bias.masked_fill(~allowed[..., None], float("-inf"))
    return bias.movedim(-1, -3)  # (..., H, Q, K)


def check_position_bias(pb: PositionBias, T: int, H: int, device: torch.device) -> None:
    """Raise ``ValueError`` naming what is wrong with ``pb`` for an op on (T, H, D) tensors."""
    M = int(pb.window)
    if M < 1:
        raise ValueError(f"position bias: window must be >= 1, got {pb.window}")
    if pb.pos.shape != (T, 3) or pb.pos.is_floating_point() or pb.pos.dtype == torch.bool:
        raise ValueError(
            f"position bias: pos must be (T, 3) = ({T}, 3) integers, got {pb.pos.dtype} {tuple(pb.pos.shape)}"
        )
    if pb.table.shape != ((2 * M - 1) ** 2, H):
        raise ValueError(
            f"position bias: table must be ((2M-1)^2, H) = ({(2 * M - 1) ** 2}, {H}) for window {M}, "
            f"got {tuple(pb.table.shape)}"
        )
    if not pb.table.is_floating_point():
        raise ValueError(f"position bias: table must be floating point, got {pb.table.dtype}")
    for name, t in (("pos", pb.pos), ("table", pb.table)):
        if t.device != device:
            raise ValueError(f"position bias: {name} on {t.device} but q on {device}")


def empty_output(q: Tensor, bias: PositionBias | None) -> Tensor:
    """The attention output of an empty pack: q (0, H, D) -> (0, H, D), part of the graph of q and of
    ``bias.table``, so that a backward gives both a gradient (zeros) as a non-empty pack does. Why: a
    parameter that gets a gradient on some steps and none on others (a GPU whose images keep no
    token in a block) fills different gradient buckets on different ranks under DeepSpeed ZeRO."""
    out = q * 0
    if bias is not None:
        out = out + (bias.table.sum() * 0).to(q.dtype)
    return out
