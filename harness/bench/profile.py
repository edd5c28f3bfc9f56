"""``python -m harness.bench profile``: torch.profiler's per-op table (self CPU time, sorted) of each dense
block and SPA block: where each block's time goes."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from harness.bench.common import BlockSize, Timing
from harness.bench.pair import block_pair, with_impl
from harness.bench.selection import bench_selection, counts_at

__all__ = ["ProfileRunner"]

_WARMUP = 5  # calls of each block before the profiled ones


class ProfileRunner:
    """Per strategy and ratio, ``timing.reps`` calls of the dense block and of the SPA block under
    torch.profiler after a warmup; ``run()`` returns the tables as text (``rows`` lines each). Not a
    ``Runner``: a profile is a table of ops, not a row of measurements."""

    def __init__(
        self,
        size: BlockSize | None = None,
        timing: Timing | None = None,
        *,
        strategies: Sequence[str] = ("containers",),
        ratios: Sequence[float] = (0.25,),
        shift: int = 0,
        position_bias: str = "swin",
        mlp_on: str = "selected",
        impl: str | None = None,
        rows: int = 12,
    ) -> None:
        self.size, self.timing = size or BlockSize(), timing or Timing(reps=10)
        self.strategies, self.ratios, self.shift = tuple(strategies), tuple(ratios), shift
        self.position_bias, self.mlp_on, self.impl, self.table_rows = position_bias, mlp_on, impl, rows

    def run(self) -> str:
        size, reps, seed = self.size, self.timing.reps, self.timing.seed
        x = size.tokens(seed)  # (B, H, W, C)
        kw: dict[str, Any] = dict(dim=size.dim, num_heads=size.num_heads, grid=size.grid, window=size.window)
        out = []
        with bench_selection() as policy:
            for strategy in self.strategies:
                shift = self.shift if strategy == "containers" else 0
                dense, spa = block_pair(
                    strategy,
                    shift=shift,
                    position_bias=self.position_bias,
                    mlp_on=self.mlp_on,
                    impl=self.impl,
                    **kw,
                )
                dense_name = "window" if strategy == "containers" else "global"
                for i, ratio in enumerate(self.ratios):
                    policy.counts = counts_at(i, size.batch, size.num_tokens, ratio, size.spread, seed)
                    spa_call = with_impl(partial(spa, x), self.impl)
                    with torch.inference_mode():
                        for _ in range(_WARMUP):
                            dense(x)
                            spa_call()
                        with torch_profile(activities=[ProfilerActivity.CPU]) as pd:
                            for _ in range(reps):
                                dense(x)
                        with torch_profile(activities=[ProfilerActivity.CPU]) as ps:
                            for _ in range(reps):
                                spa_call()
                    for name, prof in ((f"dense {dense_name}", pd), (f"SPA {strategy} at ratio {ratio}", ps)):
                        out.append(f"## {name}: {reps} calls, {torch.get_num_threads()} threads")
                        out.append(
                            prof.key_averages().table(
                                sort_by="self_cpu_time_total", row_limit=self.table_rows
                            )
                        )
        return "\n".join(out)
