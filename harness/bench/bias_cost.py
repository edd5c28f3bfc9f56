"""``python -m harness.bench bias-cost``: the share of the SPA block's time that Swin's relative position
bias costs it, the block with ``position_bias: swin`` against the same block (same weights, same
selection) with ``none``, calls alternating."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch

from harness.bench.common import BlockSize, Runner, Timing, impl_in_env, ms_columns
from harness.bench.pair import block_pair
from harness.bench.selection import bench_selection, counts_at
from harness.task.timing import quartiles
from spa_core.block import SPABlock

__all__ = ["BiasCostRunner"]


class BiasCostRunner(Runner):
    """One row per (strategy, shift, ratio): ``bias_share`` = (t_swin - t_none) / t_swin per pair of
    calls, its median and interquartile range, and each block's per-call time. ``shifts`` apply to
    containers."""

    def __init__(
        self,
        size: BlockSize | None = None,
        timing: Timing | None = None,
        *,
        strategies: Sequence[str] = ("varlen", "containers"),
        ratios: Sequence[float] = (0.5,),
        shifts: Sequence[int] = (0,),
        mlp_on: str = "selected",
    ) -> None:
        self.size, self.timing = size or BlockSize(), timing or Timing()
        self.strategies, self.ratios, self.shifts = tuple(strategies), tuple(ratios), tuple(shifts)
        self.mlp_on = mlp_on

    def rows(self) -> Iterator[dict[str, Any]]:
        size, seed = self.size, self.timing.seed
        N = size.num_tokens
        x = size.tokens(seed)  # (B, H, W, C)
        with bench_selection() as policy:
            for strategy in self.strategies:
                for shift in self.shifts if strategy == "containers" else (0,):
                    with_bias, without = self._blocks(strategy, shift)
                    for i, ratio in enumerate(self.ratios):
                        policy.counts = counts_at(i, size.batch, N, ratio, size.spread, seed)
                        t = self.timing.time({"swin": partial(with_bias, x), "none": partial(without, x)})
                        q1, med, q3 = quartiles([(a - b) / a for a, b in zip(t["swin"], t["none"])])
                        yield {
                            "strategy": strategy,
                            "ratio": ratio,
                            "shift": shift,
                            "kept_fraction": round(float(policy.counts.sum()) / (size.batch * N), 4),
                            "bias_share": round(med, 4),
                            "bias_share_q1": round(q1, 4),
                            "bias_share_q3": round(q3, 4),
                            **ms_columns("swin", t["swin"]),
                            **ms_columns("none", t["none"]),
                            "mlp_on": self.mlp_on,
                            "impl": impl_in_env(),
                            **self.timing.env(),
                        }

    def _blocks(self, strategy: str, shift: int) -> tuple[SPABlock, SPABlock]:
        """The SPA block of ``strategy`` with Swin's bias and the same block without it."""
        size = self.size
        kw: dict[str, Any] = dict(
            dim=size.dim, num_heads=size.num_heads, grid=size.grid, window=size.window, shift=shift
        )
        torch.manual_seed(self.timing.seed)
        _, with_bias = block_pair(strategy, position_bias="swin", mlp_on=self.mlp_on, **kw)
        _, without = block_pair(strategy, position_bias="none", mlp_on=self.mlp_on, **kw)
        missing, _ = without.load_state_dict(with_bias.state_dict(), strict=False)
        if missing:  # only the bias table may differ
            raise RuntimeError(f"the block without bias lacks weights of the block with it: {missing}")
        return with_bias, without

    def title(self, machine: str) -> str:
        return (
            f"SPA block, position_bias swin vs none (same weights and selection), mlp_on {self.mlp_on}: "
            f"{machine}; {self.size.describe()}, reps={self.timing.reps}, {self.timing.clock} clock; bias share "
            "= (swin - none) / swin per pair, median (interquartile range)"
        )

    def header(self) -> str:
        return (
            "| strategy | shift | ratio | kept | bias share (IQR) | swin ms (IQR) | none ms (IQR) |\n"
            "|---|---|---|---|---|---|---|"
        )

    def format_row(self, r: dict[str, Any]) -> str:
        return (
            f"| {r['strategy']} | {r['shift']} | {r['ratio']:.2f} | {r['kept_fraction']:.3f} | "
            f"{100 * r['bias_share']:.1f}% ({100 * r['bias_share_q1']:.1f}-{100 * r['bias_share_q3']:.1f}) | "
            f"{r['swin_ms']:.1f} ({r['swin_ms_q1']:.1f}-{r['swin_ms_q3']:.1f}) | "
            f"{r['none_ms']:.1f} ({r['none_ms_q1']:.1f}-{r['none_ms_q3']:.1f}) |"
        )
