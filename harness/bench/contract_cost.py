"""``python -m harness.bench contract-cost``: what the contract checks of ``spa_core.contracts`` cost
an SPA block, the same block's forward under the checks' modes, calls in rotation."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from harness.bench.common import BlockSize, Runner, Timing, impl_in_env, ms_columns
from harness.bench.pair import block_pair
from harness.bench.selection import bench_selection, counts_at
from harness.task.timing import quartiles
from spa_core import contracts
from spa_core.block import SPABlock

__all__ = ["ContractCostRunner"]


class ContractCostRunner(Runner):
    """One row per strategy: ``always`` (every rule on every call), ``shapes`` (mode ``first`` past its
    first ``VALUE_CHECKS`` calls: metadata rules only) against ``off``; ``*_cost`` = (t_mode - t_off) /
    t_off per round, median and interquartile range, and each mode's per-call time."""

    def __init__(
        self,
        size: BlockSize | None = None,
        timing: Timing | None = None,
        *,
        strategies: Sequence[str] = ("containers",),
        ratio: float = 0.25,
        mlp_on: str = "selected",
    ) -> None:
        self.size, self.timing = size or BlockSize(), timing or Timing()
        self.strategies, self.ratio, self.mlp_on = tuple(strategies), ratio, mlp_on

    def rows(self) -> Iterator[dict[str, Any]]:
        size, seed = self.size, self.timing.seed
        N = size.num_tokens
        x = size.tokens(seed)  # (B, H, W, C)
        with bench_selection() as policy:
            policy.counts = counts_at(0, size.batch, N, self.ratio, size.spread, seed)
            for strategy in self.strategies:
                torch.manual_seed(seed)
                _, spa = block_pair(
                    strategy,
                    dim=size.dim,
                    num_heads=size.num_heads,
                    grid=size.grid,
                    window=size.window,
                    mlp_on=self.mlp_on,
                )
                contracts.reset()
                with contracts.checking("first"), torch.inference_mode():
                    for _ in range(contracts.VALUE_CHECKS):  # spend the value checks of mode "first"
                        spa(x)
                modes = {"always": "always", "shapes": "first", "off": "off"}
                t = self.timing.time({name: _under(spa, x, mode) for name, mode in modes.items()})
                row: dict[str, Any] = {
                    "strategy": strategy,
                    "ratio": self.ratio,
                    "kept_fraction": round(float(policy.counts.sum()) / (size.batch * N), 4),
                }
                for mode in ("always", "shapes"):
                    q1, med, q3 = quartiles([(a - b) / b for a, b in zip(t[mode], t["off"])])
                    row.update(
                        {f"{mode}_cost": round(med, 4), f"{mode}_cost_q1": round(q1, 4)},
                        **{f"{mode}_cost_q3": round(q3, 4)},
                        **ms_columns(mode, t[mode]),
                    )
                row.update(**ms_columns("off", t["off"]), mlp_on=self.mlp_on, impl=impl_in_env())
                row.update(self.timing.env())
                yield row

    def title(self, machine: str) -> str:
        return (
            f"SPA block under the contract checks (spa_core.contracts), mlp_on {self.mlp_on}: {machine}; "
            f"{self.size.describe()}, reps={self.timing.reps}, {self.timing.clock} clock; cost = (t_mode - "
            "t_off) / t_off per round, median (interquartile range); always: every rule, every call; "
            "shapes: mode first after its value checks"
        )

    def header(self) -> str:
        return "| strategy | ratio | kept | always (IQR) | shapes (IQR) | off ms (IQR) |\n|---|---|---|---|---|---|"

    def format_row(self, r: dict[str, Any]) -> str:
        return (
            f"| {r['strategy']} | {r['ratio']:.2f} | {r['kept_fraction']:.3f} | "
            f"{100 * r['always_cost']:+.2f}% ({100 * r['always_cost_q1']:+.2f} to {100 * r['always_cost_q3']:+.2f}) | "
            f"{100 * r['shapes_cost']:+.2f}% ({100 * r['shapes_cost_q1']:+.2f} to {100 * r['shapes_cost_q3']:+.2f}) | "
            f"{r['off_ms']:.2f} ({r['off_ms_q1']:.2f}-{r['off_ms_q3']:.2f}) |"
        )


def _under(block: SPABlock, x: torch.Tensor, mode: str) -> Callable[[], None]:
    def call() -> None:
        with contracts.checking(mode), torch.inference_mode():
            block(x)

    return call
