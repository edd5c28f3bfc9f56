"""The gate of an SPA block (Select and Pack Attention, arXiv 2410.23608): a linear token scorer.

For tokens ``r: (B, N, C)`` the gate scores ``s = max(f(r), s_up)``, where ``f`` is a linear layer
``C -> 1`` and ``s_up`` is the previous SPA block's score map resized to this block's grid (the
element-wise max lets a region that an earlier block found relevant stay selected). The block then
scales the tokens ``r_g = sigmoid(s) * r``, which is how the task loss reaches the gate.

Cost, next to the attention it serves (multiply-adds per image, N tokens, C channels, T kept, M the
window): the gate is ``N*C`` (the scorer) ``+ T*C`` (the scaling, which the block applies to the
kept tokens only); the Swin window attention it replaces is ``4*N*C^2 + 2*M^2*N*C``, the SPA attention
it enables ``4*T*C^2 + 2*sum_i n_i^2*C`` (``n_i`` the packed sequence lengths; ``<= 2*L*T*C`` for
containers of L). At Swin-T's stage 3 (N=196, C=384, M=7) the gate is at most 0.12% of the window
attention (2NC = 0.15M vs 123M). Its time is not that small: the scorer reads every token, which is
memory-bound, so the scorer runs ``kernels.token_scores`` (a C++ kernel on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import token_scores
from spa_core.config import SPAConfig
from spa_core.registry import GATES

__all__ = ["LinearGate", "TokenScorer", "resize_scores"]


class TokenScorer(nn.Linear):
    """``nn.Linear(dim, 1)`` whose forward is ``kernels.token_scores``: (..., C) -> (...,) scores.

    A module of its own (not the op called on a parent's parameters) so that module hooks see it: ZeRO-3
    gathers a module's parameters around its own forward, and fvcore attributes the op to it."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        return token_scores(x, self.weight, self.bias)


@GATES.register("linear")
class LinearGate(nn.Module):
    """The paper's scorer: ``s = max(linear(r), prev)``.

    forward(x: (B, N, C), prev_scores: (B, N) | None) -> scores: (B, N) logits.
    """

    def __init__(self, dim: int, cfg: SPAConfig | None = None) -> None:
        super().__init__()
        self.score = TokenScorer(dim)
        nn.init.trunc_normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)  # sigmoid(0) = 0.5: tokens start half-scaled, selection unbiased

    def forward(self, x: Tensor, prev_scores: Tensor | None = None) -> Tensor:
        s = self.score(x)  # (B, N)
        if prev_scores is not None:
            s = torch.maximum(s, prev_scores.to(s.dtype))
        return s


def resize_scores(scores: Tensor, grid: tuple[int, int]) -> Tensor:
    """A score map ``(B, h, w)`` resized to ``grid = (H, W)``, returned flat ``(B, H*W)``.

    Coarser target (the next stage): the max over the cells each token was merged from (a token is as
    relevant as its most relevant part, the same rule as the labels). With the backbone's geometry
    (``H == ceil(h / k)``: odd maps padded before merging) that is a ``k x k`` max pool over the padded
    map; other sizes fall back to ``adaptive_max_pool2d``. Finer target: nearest upsampling.
    """
    B, h, w = scores.shape
    H, W = grid
    if (h, w) == (H, W):
        return scores.reshape(B, H * W)
    s = scores[:, None]  # (B, 1, h, w)
    if H <= h and W <= w:
        kh, kw = -(-h // H), -(-w // W)
        if -(-h // kh) == H and -(-w // kw) == W:
            s = F.pad(s, (0, W * kw - w, 0, H * kh - h), value=float("-inf"))
            s = F.max_pool2d(s, (kh, kw))
        else:
            s = F.adaptive_max_pool2d(s, (H, W))
    else:
        s = F.interpolate(s, size=(H, W), mode="nearest")
    return s.reshape(B, H * W)
