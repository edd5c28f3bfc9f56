"""Example plugin: SparseViT-style selection by feature norm, with no learnt gate.

SparseViT (Chen et al., CVPR 2023) keeps, at a fixed ratio per image, the windows whose activations
have the largest L2 norm: importance is read off the features, nothing is learnt for it. This plugin
brings that rule to SPA's per-token selection as two registry entries, loaded from a grid with
``plugins: [../plugins/feature_norm.py]`` (a file path, relative to the grid) or ``--plugin``:

- gate ``feature_norm``: a parameter-free scorer. An SPA block's gate sees ``r = norm1(x)``, and a
  LayerNorm gives every token (nearly) the same norm, so the norm is taken of what sets a token apart
  from its image: ``||r_i - mean_j r_j||``; scores are z-scored per image (log-norm), so they are
  comparable across blocks and stages. The previous block's scores are not carried over (SparseViT
  scores every stage afresh).
- selection policy ``feature_norm``: the ``round(ratio * N)`` highest-scoring tokens of every image
  (SparseViT's uniform ratio). Its straight-through ``weight`` is ``1 / sigmoid(s)`` on kept tokens,
  which cancels the block's ``sigmoid(s)`` scaling: kept activations enter attention unscaled, as in
  SparseViT, and no gradient trains a scorer that has no parameters.

Use both together, without gate supervision (there is nothing to supervise)::

    model.spa: {gate: feature_norm, selection: feature_norm, supervision: none, ratio: 0.5}

Contracts: ``spa_core/registry.py`` (GATES, SELECTION_POLICIES).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spa_core.config import SPAConfig
from spa_core.registry import GATES, SELECTION_POLICIES
from spa_core.select import Selection

__all__ = ["FeatureNormGate", "select_feature_norm"]

_Z_CLIP = 6.0  # keeps 1/sigmoid(s) finite and small for any score


@GATES.register("feature_norm")
class FeatureNormGate(nn.Module):
    """forward(x: (B, N, C), prev_scores: (B, N) | None) -> scores (B, N): z-scored log of
    ``||x_i - mean_j x_j||`` per image. No parameters; ``prev_scores`` is ignored."""

    def __init__(self, dim: int, cfg: SPAConfig | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor, prev_scores: Tensor | None = None) -> Tensor:
        x = x.detach().float()
        dev = x - x.mean(dim=1, keepdim=True)  # (B, N, C)
        s = torch.log(dev.norm(dim=-1) + 1e-6)  # (B, N)
        z = (s - s.mean(dim=1, keepdim=True)) / (s.std(dim=1, keepdim=True, unbiased=False) + 1e-6)
        return z.clamp(-_Z_CLIP, _Z_CLIP)


@SELECTION_POLICIES.register("feature_norm")
def select_feature_norm(
    scores: Tensor, *, cfg: SPAConfig, training: bool, generator=None, tokens=None
) -> Selection:
    """scores (B, N) -> the ``round(cfg.ratio * N)`` best of every image; weight undoes sigmoid(s)."""
    N = int(scores.shape[1])  # int(): under fvcore's tracer the shape may be a tensor
    k = min(N, max(0, round(cfg.ratio * N)))
    s = scores.detach()
    mask = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    if k > 0:
        idx = s.topk(k, dim=1).indices  # (B, k)
        mask = mask.scatter(1, idx, torch.ones_like(idx, dtype=torch.bool))
    weight = torch.where(mask, 1.0 / torch.sigmoid(s.float()), torch.ones_like(s, dtype=torch.float32))
    return Selection(mask=mask, counts=mask.sum(1, dtype=torch.int64), weight=weight)
