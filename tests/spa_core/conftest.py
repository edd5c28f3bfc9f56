"""Shared fixtures of the spa_core tests: a selection policy that keeps a given mask."""

from __future__ import annotations

import pytest
import torch

from spa_core.registry import SELECTION_POLICIES
from spa_core.select import Selection


class FixedPolicy:
    """A test plugin policy: keeps ``self.mask`` (B, N), whatever the scores."""

    name = "fixed_for_tests"

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def __call__(self, scores, *, cfg, training, generator=None, tokens=None) -> Selection:
        assert self.mask is not None and self.mask.shape == scores.shape
        m = self.mask.to(scores.device)
        return Selection(mask=m, counts=m.sum(1), weight=torch.ones_like(scores))


@pytest.fixture
def fixed_policy():
    policy = FixedPolicy()
    SELECTION_POLICIES.register(policy.name, policy)
    try:
        yield policy
    finally:
        SELECTION_POLICIES.unregister(policy.name)


def _mask_with_counts(counts, N, seed=0) -> torch.Tensor:
    """(B, N) bool with ``counts[b]`` random positions kept in image b."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(counts), N, dtype=torch.bool)
    for b, c in enumerate(counts):
        mask[b, torch.randperm(N, generator=g)[:c]] = True
    return mask


@pytest.fixture
def mask_with_counts():
    """``mask_with_counts(counts, N, seed=0) -> (B, N) bool`` with counts[b] random kept positions."""
    return _mask_with_counts
