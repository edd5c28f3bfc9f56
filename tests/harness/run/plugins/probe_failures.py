"""Test plugin: selection policies that fail at one stage of the probe before training.

``round_topk`` is the mistake of issue 26's walk-through: Python's ``round`` of a shape, which runs
eagerly but fails under fvcore's trace (the shape is a tensor there), so it trains and only its FLOP
count fails. ``fails_backward`` runs forward and raises in its backward; ``fails_forward`` raises at
once.
"""

import torch

from spa_core.registry import SELECTION_POLICIES
from spa_core.select import Selection


def _mask_of(scores: torch.Tensor, k: int) -> torch.Tensor:
    idx = scores.topk(max(1, min(k, scores.shape[1])), dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, idx, True)


@SELECTION_POLICIES.register("round_topk")
def round_topk(scores, *, cfg, training, generator=None, tokens=None):
    k = round(cfg.ratio * scores.shape[1])  # a tensor's round() under torch.jit.trace: TypeError
    mask = _mask_of(scores, k)
    return Selection(mask=mask, counts=mask.sum(1), weight=torch.ones_like(scores))


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("fails_backward has no gradient on purpose")


@SELECTION_POLICIES.register("fails_backward")
def fails_backward(scores, *, cfg, training, generator=None, tokens=None):
    mask = _mask_of(scores, scores.shape[1] // 2)
    return Selection(mask=mask, counts=mask.sum(1), weight=_NoBackward.apply(torch.sigmoid(scores)))


@SELECTION_POLICIES.register("fails_forward")
def fails_forward(scores, *, cfg, training, generator=None, tokens=None):
    raise IndexError("fails_forward selects nothing on purpose")
