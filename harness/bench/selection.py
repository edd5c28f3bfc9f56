"""The bench's selection: image b keeps its ``counts[b]`` best-scoring tokens, the counts spread around a
ratio, so the packs are ragged as a gate's are while every strategy sees the same counts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from spa_core.registry import SELECTION_POLICIES
from spa_core.select import Selection

__all__ = ["BENCH_SELECTION", "KeptCounts", "bench_selection", "make_counts", "counts_at"]

BENCH_SELECTION = "bench_kept_counts"  # registered only while the benchmark runs


class KeptCounts:
    """Selection policy (``SELECTION_POLICIES`` contract): image b keeps its ``counts[b]`` best-scoring
    tokens; ``counts: (B,)`` int64 is set by the caller before a forward (ties to the lower index)."""

    def __init__(self) -> None:
        self.counts: Tensor | None = None

    def __call__(
        self, scores: Tensor, *, cfg: Any, training: bool, generator: Any = None, tokens: Any = None
    ) -> Selection:
        if self.counts is None or self.counts.shape != scores.shape[:1]:
            raise ValueError(
                f"{BENCH_SELECTION}: counts (B,) = ({scores.shape[0]},) must be set, got {self.counts}"
            )
        B, N = scores.shape
        order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices  # (B, N)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=scores.device).expand(B, N))
        mask = rank < self.counts.to(scores.device)[:, None]  # (B, N)
        return Selection(mask=mask, counts=mask.sum(1), weight=torch.ones_like(scores))


@contextlib.contextmanager
def bench_selection() -> Iterator[KeptCounts]:
    """Register a ``KeptCounts`` policy as ``BENCH_SELECTION`` for the block; yields it. Scoped, so that
    code iterating over ``SELECTION_POLICIES`` elsewhere never meets a policy without counts."""
    policy = KeptCounts()
    SELECTION_POLICIES.register(BENCH_SELECTION, policy, origin="harness.bench")
    try:
        yield policy
    finally:
        SELECTION_POLICIES.unregister(BENCH_SELECTION)


def make_counts(
    batch: int, num_tokens: int, ratio: float, spread: float, generator: torch.Generator
) -> Tensor:
    """Per-image kept counts ``(batch,)`` int64 around ``ratio * num_tokens``: uniform within +-spread
    (relative), clamped to [1, num_tokens]."""
    u = torch.rand(batch, generator=generator) * 2 - 1
    counts = torch.round(num_tokens * ratio * (1 + spread * u)).long()
    return counts.clamp(1, num_tokens)


def counts_at(position: int, batch: int, num_tokens: int, ratio: float, spread: float, seed: int) -> Tensor:
    """The counts ``(batch,)`` of the ratio at ``position`` in a mode's ratio list: every strategy and
    every mode sees the same counts at a ratio; the seed follows the position."""
    return make_counts(
        batch, num_tokens, ratio, spread, torch.Generator().manual_seed(seed * 1009 + position + 1)
    )
