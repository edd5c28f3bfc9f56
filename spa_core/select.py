"""Selection policies of an SPA block (arXiv 2410.23608): which tokens of each image are kept.

Every policy decides per image, so the number kept varies from image to image (0 and N included),
and returns the counts with the mask. Registered in ``SELECTION_POLICIES`` (contract in
``spa_core/registry.py``):

- ``gate``: the paper's hard decision on the gate logits. Training: Gumbel-sigmoid (logistic noise
  added to the logits, divided by ``gumbel_tau``) thresholded at ``threshold``, straight-through, so the
  kept tokens carry a multiplier of value 1 whose gradient is the soft sample's. Inference: keep
  ``sigmoid(s) > threshold``, no noise. The kept fraction is an outcome, not a setting.
- ``topk``: the ``round(ratio * N)`` highest-scoring tokens of each image (uniform, as SparseViT).
- ``random``: ``round(ratio * N)`` tokens of each image drawn uniformly (the control).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spa_core.config import SPAConfig
from spa_core.registry import SELECTION_POLICIES

__all__ = ["Selection", "select_tokens", "select_gate", "select_topk", "select_random"]


@dataclass
class Selection:
    """mask: (B, N) bool kept tokens; counts: (B,) int64 kept per image; weight: (B, N) float
    multiplier for the kept tokens (the straight-through estimator of ``gate``; ones otherwise)."""

    mask: Tensor
    counts: Tensor
    weight: Tensor


def select_tokens(
    scores: Tensor, cfg: SPAConfig, *, training: bool, generator: torch.Generator | None = None
) -> Selection:
    """scores: (B, N) gate logits -> ``Selection`` by the policy ``cfg.selection``."""
    return SELECTION_POLICIES.get(cfg.selection)(scores, cfg=cfg, training=training, generator=generator)


def _from_mask(mask: Tensor, weight: Tensor | None = None) -> Selection:
    if weight is None:
        weight = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
    return Selection(mask=mask, counts=mask.sum(1, dtype=torch.int64), weight=weight)


def _ratio_count(n: int, ratio: float) -> int:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"selection ratio must be in [0, 1], got {ratio}")
    n = int(n)
    return min(n, max(0, round(ratio * n)))


def _top_mask(values: Tensor, k: int) -> Tensor:
    mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if k > 0:
        idx = values.topk(k, dim=1).indices  # (B, k)
        mask = mask.scatter(1, idx, torch.ones_like(idx, dtype=torch.bool))
    return mask


@SELECTION_POLICIES.register("gate")
def select_gate(scores: Tensor, *, cfg: SPAConfig, training: bool, generator=None) -> Selection:
    """Hard Gumbel-sigmoid straight-through at ``cfg.threshold`` in training; the threshold at inference."""
    if not 0.0 < cfg.threshold < 1.0:
        raise ValueError(f"gate threshold must be in (0, 1), got {cfg.threshold}")
    if not training:
        return _from_mask(torch.sigmoid(scores.detach()) > cfg.threshold)
    gen_device = generator.device if generator is not None else scores.device
    u = torch.rand(scores.shape, generator=generator, dtype=scores.dtype, device=gen_device).to(scores.device)
    u = u.clamp(torch.finfo(scores.dtype).tiny, 1.0 - torch.finfo(scores.dtype).eps)
    noise = torch.log(u) - torch.log1p(-u)  # logistic = difference of two Gumbels
    soft = torch.sigmoid((scores + noise) / cfg.gumbel_tau)  # (B, N)
    hard = soft.detach() > cfg.threshold
    weight = hard.to(soft.dtype) - soft.detach() + soft  # value 1 on kept tokens, gradient of soft
    return _from_mask(hard, weight)


@SELECTION_POLICIES.register("topk")
def select_topk(scores: Tensor, *, cfg: SPAConfig, training: bool, generator=None) -> Selection:
    """The ``round(ratio*N)`` best-scoring tokens of every image."""
    return _from_mask(_top_mask(scores.detach(), _ratio_count(scores.shape[1], cfg.ratio)))


@SELECTION_POLICIES.register("random")
def select_random(scores: Tensor, *, cfg: SPAConfig, training: bool, generator=None) -> Selection:
    """``round(ratio*N)`` tokens of every image drawn uniformly, ignoring the scores (the control)."""
    gen_device = generator.device if generator is not None else scores.device
    r = torch.rand(scores.shape, generator=generator, device=gen_device).to(scores.device)
    return _from_mask(_top_mask(r, _ratio_count(scores.shape[1], cfg.ratio)))
