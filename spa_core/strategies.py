"""The pack strategies of SPA (Select and Pack Attention, arXiv 2410.23608), one registered object each:
how the selected tokens are packed (``spa_core.pack``), how attention runs over the pack
(``spa_core.attention``) and what that costs by the paper's formulas, together, so that a plugin
strategy touches one place and the harness's analytic FLOP column reads every strategy's own formula.

The paper's per-block formulas (multiply-adds; B images of N tokens, C channels, T kept, n_i the
sequence lengths, L the container length, B' = ceil(T / L) containers): SPA
``B(NC + NC^2) + B'(3LC^2 + 2L^2 C)`` (the gate and the output projection over all N tokens, then
the containers' qkv projection and scores/PV computed densely per container). The other strategies
swap the container term: ``varlen`` ``3TC^2 + 2C sum_i n_i^2``; ``pad`` ``B(3 n_max C^2 + 2 n_max^2 C)``;
``mask`` ``B(3NC^2 + 2N^2 C)``. These are upper bounds of what the kernels compute (the output
projection runs on the T kept tokens, the varlen kernel computes one image's part of a container);
fvcore's count of the traced ops is the measured figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spa_core.attention import attend_masked, attend_padded, attend_varlen
from spa_core.pack import pack_containers, pack_mask, pack_pad, pack_varlen
from spa_core.registry import PACK_STRATEGIES

__all__ = ["PackStrategy"]


@dataclass(frozen=True)
class PackStrategy:
    """A pack strategy: ``pack``, ``attend`` and ``attention_macs`` (contract: ``PACK_STRATEGIES``'s
    docstring in ``spa_core/registry.py``)."""

    pack: Callable
    attend: Callable
    attention_macs: Callable[[Sequence[int], int, int, int], float]


def _gate_and_out_proj(counts: Sequence[int], n: int, c: int) -> float:
    return len(counts) * (n * c + n * c * c)


def _containers_macs(counts: Sequence[int], n: int, c: int, container_len: int) -> float:
    L = container_len
    return _gate_and_out_proj(counts, n, c) + math.ceil(sum(counts) / L) * (3 * L * c * c + 2 * L * L * c)


def _varlen_macs(counts: Sequence[int], n: int, c: int, container_len: int) -> float:
    return _gate_and_out_proj(counts, n, c) + 3 * sum(counts) * c * c + 2 * c * sum(k * k for k in counts)


def _pad_macs(counts: Sequence[int], n: int, c: int, container_len: int) -> float:
    longest = max(counts, default=0)
    return _gate_and_out_proj(counts, n, c) + len(counts) * (3 * longest * c * c + 2 * longest * longest * c)


def _mask_macs(counts: Sequence[int], n: int, c: int, container_len: int) -> float:
    return _gate_and_out_proj(counts, n, c) + len(counts) * (3 * n * c * c + 2 * n * n * c)


PACK_STRATEGIES.register(
    "containers", origin="builtin", obj=PackStrategy(pack_containers, attend_varlen, _containers_macs)
)
PACK_STRATEGIES.register(
    "varlen", origin="builtin", obj=PackStrategy(pack_varlen, attend_varlen, _varlen_macs)
)
PACK_STRATEGIES.register("pad", origin="builtin", obj=PackStrategy(pack_pad, attend_padded, _pad_macs))
PACK_STRATEGIES.register("mask", origin="builtin", obj=PackStrategy(pack_mask, attend_masked, _mask_macs))
