"""The pack strategies of SPA (Select and Pack Attention, arXiv 2410.23608), one registered object each:
how the selected tokens are packed (``spa_core.pack``), how attention runs over the pack
(``spa_core.attention``) and what that costs, together, so that a plugin strategy touches one place
and the harness's analytic FLOP column reads every strategy's own formula.

Each ``attention_macs`` counts what its strategy runs for one SPA block (multiply-adds; B images, N
the positions the block packs from, C channels, T packed tokens, L the container length): the qkv
and output projections on the packed tokens ``4TC^2``, the same for every strategy, plus the scores
and weighted sum ``2C sum_s n_s^2`` over the sequences the strategy's attention runs. N and the
per-image counts are those of the map the block packs: padded to whole windows where Swin pads it
(an image that keeps all its tokens packs the padding too, as Swin attends over it). The gate's
scorer, ``BNC`` over the real tokens, is not the strategy's: the harness adds it.

- ``containers``: the varlen kernel over sequences cut at image boundaries and at multiples of L
  (``kernels.container_seqlens``): a container holding two images' tokens computes two blocks;
- ``varlen``: one sequence per image, ``n_b`` its kept count;
- ``pad``: every image padded to the batch's largest count, ``2C B max_b(n_b)^2``;
- ``mask``: every image dense over all N positions, ``2C B N^2`` (no saving in attention).

So the analytic column follows the kept tokens, and it equals fvcore's count of the same modules
(the gate and attention modules of the traced model; ``tests/harness/task/test_measure.py``). The
paper's own formula, ``B(NC + NC^2) + B'(3LC^2 + 2L^2 C)`` with ``B' = ceil(T / L)`` containers,
counts the paper's dense-container implementation: every container full (L slots, L x L scores)
and the output projection over all N tokens. It is an upper bound of the count here, and on maps
smaller than a container it exceeds the dense block it replaces (the micro backbone at 64 px:
stage 4 has 4 tokens a block, L = 16), whatever the kept fraction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from spa_core.attention import attend_masked, attend_padded, attend_varlen
from spa_core.pack import pack_containers, pack_mask, pack_pad, pack_varlen
from spa_core.registry import PACK_STRATEGIES

__all__ = ["PackStrategy", "container_lengths"]


@dataclass(frozen=True)
class PackStrategy:
    """A pack strategy: ``pack``, ``attend`` and ``attention_macs`` (contract: ``PACK_STRATEGIES``'s
    docstring in ``spa_core/registry.py``)."""

    pack: Callable
    attend: Callable
    attention_macs: Callable[[Sequence[int], int, int, int], float]


def _projections(counts: Sequence[int], c: int) -> float:
    """The qkv and output projections over the T packed tokens."""
    return 4 * sum(int(k) for k in counts) * c * c


def container_lengths(counts: Sequence[int], container_len: int) -> list[int]:
    """Lengths of the sequences of a containers pack: each image's tokens poured after the previous
    image's into containers of ``container_len`` slots, cut at image and container boundaries (as
    ``kernels.container_seqlens`` cuts ``cu_seqlens``)."""
    out, pos = [], 0
    for k in counts:
        k = int(k)
        while k > 0:
            take = min(container_len - pos % container_len, k)
            out.append(take)
            pos += take
            k -= take
    return out


def _containers_macs(counts: Sequence[int], n: int, c: int, container_len: int) -> float:
    seqs = container_lengths(counts, container_len)
    return _projections(counts, c) + 2 * c * sum(s * s for s in seqs)


def _varlen_macs(counts: Sequence[int], n: int, c: int, container_len: int) -> float:
    return _projections(counts, c) + 2 * c * sum(int(k) ** 2 for k in counts)


def _pad_macs(counts: Sequence[int], n: int, c: int, container_len: int) -> float:
    longest = max((int(k) for k in counts), default=0)
    return _projections(counts, c) + 2 * c * len(counts) * longest * longest


def _mask_macs(counts: Sequence[int], n: int, c: int, container_len: int) -> float:
    attention = 2 * c * len(counts) * n * n if sum(counts) else 0  # nothing kept: attention is skipped
    return _projections(counts, c) + attention


PACK_STRATEGIES.register(
    "containers", origin="builtin", obj=PackStrategy(pack_containers, attend_varlen, _containers_macs)
)
PACK_STRATEGIES.register(
    "varlen", origin="builtin", obj=PackStrategy(pack_varlen, attend_varlen, _varlen_macs)
)
PACK_STRATEGIES.register("pad", origin="builtin", obj=PackStrategy(pack_pad, attend_padded, _pad_macs))
PACK_STRATEGIES.register("mask", origin="builtin", obj=PackStrategy(pack_mask, attend_masked, _mask_macs))
