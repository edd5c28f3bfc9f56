"""``python -m harness.bench blocks``: the SPA block (Select and Pack Attention, arXiv 2410.23608)
against the dense Swin block it replaces, per pack strategy, shift and kept ratio.

The SPA block loads the Swin block's weights (only its gate is its own), so a row compares one block
with and without selection. Per pack strategy (every name ``spa_core.registry.PACK_STRATEGIES``
holds):

- ``containers``: the paper's containers of L = M*M slots; dense counterpart: Swin window attention
  (M = 7 on a 14x14 grid: 4 windows), with its relative position bias and, for a shifted block, its
  shift mask;
- every other strategy (``varlen``, ``pad``, ``mask``, a plugin's): dense counterpart a Swin block
  whose window covers the grid, i.e. global attention with Swin's bias.

Selection: ``harness.bench.selection`` (per-image counts spread around the ratio). ``mlp_on:
selected`` (default) lets an unselected token skip the whole block, the regime where SPA saves
compute: time and FLOPs both scale with the kept tokens.

Per row: kept fraction, time ratio (dense / SPA time per pair of calls), FLOP ratio (dense / SPA
multiply-adds, fvcore with ``kernels.FVCORE_HANDLES``) and efficiency = time ratio / FLOP ratio (1.0:
time falls exactly as FLOPs do), medians and interquartile ranges over the pairs, and each block's
per-call time. With several kernel implementations (``impls``), one SPA block per implementation
(same weights) joins the dense block's rotation, one row each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from harness.bench.common import BlockSize, Runner, Timing, impl_in_env, ms_columns, pack_strategies
from harness.bench.pair import BlockOutput, block_pair, fvcore_macs, with_impl
from harness.bench.selection import KeptCounts, bench_selection, counts_at
from harness.task.timing import quartiles

__all__ = ["BlocksRunner", "block_row"]

_HEADER = (
    "| strategy | dense | shift | ratio | kept | time ratio (IQR) | FLOP ratio | efficiency (IQR) "
    "| dense ms (IQR) | SPA ms (IQR) |"
)


class BlocksRunner(Runner):
    """Every (strategy, shift, ratio[, impl]) of the SPA block against its Swin block. ``shifts``
    apply to containers (a window covering the grid is never shifted); ``impls``: kernel
    implementations (None: as the environment has it), each timed against the same dense calls."""

    def __init__(
        self,
        size: BlockSize | None = None,
        timing: Timing | None = None,
        *,
        strategies: Sequence[str] | None = None,
        ratios: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 1.0),
        shifts: Sequence[int] = (0,),
        position_bias: str = "swin",
        mlp_on: str = "selected",
        impls: Sequence[str | None] = (None,),
    ) -> None:
        self.size, self.timing = size or BlockSize(), timing or Timing()
        self.strategies = tuple(strategies) if strategies else pack_strategies()
        self.ratios, self.shifts = tuple(ratios), tuple(shifts)
        self.position_bias, self.mlp_on = position_bias, mlp_on
        self.impls = tuple(impls) or (None,)

    def rows(self) -> Iterator[dict[str, Any]]:
        x = self.size.tokens(self.timing.seed)  # (B, H, W, C)
        with bench_selection() as policy:
            for strategy in self.strategies:
                for shift in self.shifts if strategy == "containers" else (0,):
                    yield from self._rows_of(strategy, shift, x, policy)

    def _rows_of(self, strategy: str, shift: int, x: Tensor, policy: KeptCounts) -> Iterator[dict[str, Any]]:
        """The rows of one strategy and shift: one per ratio and implementation."""
        size, seed = self.size, self.timing.seed
        torch.manual_seed(seed)
        kw: dict[str, Any] = dict(
            dim=size.dim, num_heads=size.num_heads, grid=size.grid, window=size.window, shift=shift
        )
        kw.update(position_bias=self.position_bias, mlp_on=self.mlp_on)
        dense, spa = block_pair(strategy, impl=self.impls[0], **kw)
        spas = {self.impls[0]: spa}
        for impl in self.impls[1:]:  # every implementation computes the same block
            spas[impl] = block_pair(strategy, impl=impl, **kw)[1]
            spas[impl].load_state_dict(spa.state_dict())
        dense_macs = fvcore_macs(dense, (x,))
        for i, ratio in enumerate(self.ratios):
            policy.counts = counts_at(i, size.batch, size.num_tokens, ratio, size.spread, seed)
            spa_macs = fvcore_macs(BlockOutput(spa), (x,))  # the same for every impl
            calls: dict[str, Callable[[], object]] = {"dense": partial(dense, x)}
            calls.update({f"spa {n}": with_impl(partial(b, x), n) for n, b in spas.items()})
            t = self.timing.time(calls)
            for impl in spas:
                row = block_row(
                    strategy,
                    ratio,
                    shift,
                    policy.counts,
                    size.num_tokens,
                    t["dense"],
                    t[f"spa {impl}"],
                    dense_macs,
                    spa_macs,
                )
                row.update(
                    dense="window" if strategy == "containers" else "global",
                    position_bias=self.position_bias,
                    mlp_on=self.mlp_on,
                    impl=impl or impl_in_env(),
                    **self.timing.env(),
                )
                yield row

    def title(self, machine: str) -> str:
        return (
            f"SPA block vs Swin block (position_bias {self.position_bias}, mlp_on {self.mlp_on}): {machine}; "
            f"{self.size.describe()}, L={self.size.window}^2, reps={self.timing.reps}, {self.timing.clock} "
            "clock; medians (interquartile range) of per-pair ratios"
        )

    def header(self) -> str:
        header = _HEADER.replace("| strategy |", "| strategy | impl |", 1) if len(self.impls) > 1 else _HEADER
        return header + "\n" + "|---" * (header.count("|") - 1) + "|"

    def format_row(self, r: dict[str, Any]) -> str:
        impl = f" {r['impl']} |" if len(self.impls) > 1 else ""
        return (
            f"| {r['strategy']} |{impl} {r['dense']} | {r['shift']} | {r['ratio']:.2f} | {r['kept_fraction']:.3f} | "
            f"{r['time_ratio']:.2f} ({r['time_ratio_q1']:.2f}-{r['time_ratio_q3']:.2f}) | {r['flop_ratio']:.2f} | "
            f"{r['efficiency']:.2f} ({r['efficiency_q1']:.2f}-{r['efficiency_q3']:.2f}) | "
            f"{r['dense_ms']:.1f} ({r['dense_ms_q1']:.1f}-{r['dense_ms_q3']:.1f}) | "
            f"{r['spa_ms']:.1f} ({r['spa_ms_q1']:.1f}-{r['spa_ms_q3']:.1f}) |"
        )


def block_row(
    strategy: str,
    ratio: float,
    shift: int,
    counts: Tensor,
    num_tokens: int,
    dense_s: Sequence[float],
    spa_s: Sequence[float],
    dense_macs: int,
    spa_macs: int,
) -> dict[str, Any]:
    """One row's measured columns from the paired per-call times (seconds) of the dense and the SPA
    block, ``counts: (B,)`` the kept tokens per image."""
    q1, med, q3 = quartiles([a / b for a, b in zip(dense_s, spa_s)])
    flop_ratio = dense_macs / spa_macs
    return {
        "strategy": strategy,
        "ratio": ratio,
        "shift": shift,
        "kept_fraction": round(float(counts.sum()) / (counts.numel() * num_tokens), 4),
        "time_ratio": round(med, 4),
        "time_ratio_q1": round(q1, 4),
        "time_ratio_q3": round(q3, 4),
        "flop_ratio": round(flop_ratio, 4),
        "efficiency": round(med / flop_ratio, 4),
        "efficiency_q1": round(q1 / flop_ratio, 4),
        "efficiency_q3": round(q3 / flop_ratio, 4),
        "dense_gmacs": round(dense_macs / 1e9, 4),
        "spa_gmacs": round(spa_macs / 1e9, 4),
        **ms_columns("dense", dense_s),  # per-call times, ms: median and interquartile range
        **ms_columns("spa", spa_s),
    }
