"""``python -m harness.bench ops``: ``kernels.varlen_attention`` alone on the packs an SPA block makes, and
the gate's ``token_scores``, per CPU kernel implementation, the implementations called in rotation."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from harness.bench.common import BlockSize, Runner, Timing
from harness.bench.pair import dense_window
from harness.bench.selection import counts_at
from harness.task.timing import quartiles
from kernels import token_scores, varlen_attention, varlen_attention_macs
from kernels.position_bias import PositionBias
from spa_core.config import SPAConfig
from spa_core.pack import pack
from spa_core.windows import token_places, window_order

__all__ = ["OpsRunner", "LAYOUTS"]

LAYOUTS = ("varlen", "containers")  # one sequence per image; the paper's containers


class OpsRunner(Runner):
    """Layouts ``varlen`` (one sequence per image, a window covering the grid) and ``containers``
    (L = window^2, window order with ``shift``), packed by ``spa_core.pack.pack`` in the block's window
    order, with Swin's bias from the tokens' places when ``position_bias`` is ``swin``; and layout
    ``gate``: ``token_scores`` over the whole batch. One row per (layout, ratio, impl): median and
    interquartile range of the per-call times, GMAC/s, and the speedup over the first impl's median."""

    def __init__(
        self,
        size: BlockSize | None = None,
        timing: Timing | None = None,
        *,
        ratios: Sequence[float] = (0.25, 0.5),
        impls: Sequence[str] = ("torch", "cpp"),
        shift: int = 0,
        position_bias: str = "swin",
    ) -> None:
        if not impls:
            raise ValueError("ops: name at least one implementation")
        self.size, self.timing = size or BlockSize(), timing or Timing()
        self.ratios, self.impls, self.shift, self.position_bias = (
            tuple(ratios),
            tuple(impls),
            shift,
            position_bias,
        )

    def rows(self) -> Iterator[dict[str, Any]]:
        size = self.size
        N, D, H = size.num_tokens, size.dim // size.num_heads, size.num_heads
        g = torch.Generator().manual_seed(self.timing.seed)
        x = torch.randn(size.batch, N, size.dim, generator=g)  # (B, N, C)
        for i, ratio in enumerate(self.ratios):
            counts = counts_at(i, size.batch, N, ratio, size.spread, self.timing.seed)
            mask = (
                torch.arange(N)[None, :] < counts[:, None]
            )  # (B, N): which tokens does not matter to the op
            for layout in LAYOUTS:
                M = dense_window(layout, size.grid, size.window)
                shift = self.shift if layout == "containers" else 0
                cfg = SPAConfig(pack=layout, container_len=size.window * size.window)
                packed = pack(x, mask, layout, cfg=cfg, order=window_order((size.grid, size.grid), M, shift))
                T = packed.tokens.shape[0]
                q, k, v = torch.randn(T, 3, H, D, generator=g).unbind(1)  # (T, H, D) each
                kw: dict[str, Any] = {}
                if self.position_bias == "swin":
                    pos = token_places((size.grid, size.grid), M, shift).index_select(0, packed.indices % N)
                    table = torch.randn((2 * M - 1) ** 2, H, generator=g) * 0.02  # Swin's table for M
                    kw["bias"] = PositionBias(pos, table, M)
                lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).tolist()
                macs = varlen_attention_macs(H, D, sum(n * n for n in lengths))
                cu, max_len = packed.cu_seqlens, packed.max_seqlen
                calls = {n: partial(varlen_attention, q, k, v, cu, max_len, impl=n, **kw) for n in self.impls}
                yield from self._rows_of(layout, ratio, macs, calls, self.position_bias)
        gate = nn.Linear(size.dim, 1)
        calls = {n: partial(token_scores, x, gate.weight, gate.bias, impl=n) for n in self.impls}
        yield from self._rows_of("gate", None, size.batch * N * size.dim, calls, "none")

    def _rows_of(
        self,
        layout: str,
        ratio: float | None,
        macs: float,
        calls: Mapping[str, Callable[[], object]],
        position_bias: str,
    ) -> Iterator[dict[str, Any]]:
        times = self.timing.time(calls)
        base = statistics.median(times[self.impls[0]])
        for name in self.impls:
            q1, med, q3 = quartiles(times[name])
            yield {
                "layout": layout,
                "ratio": ratio,
                "impl": name,
                "mmacs": round(macs / 1e6, 3),
                "position_bias": position_bias,
                "ms": round(1e3 * med, 3),
                "ms_q1": round(1e3 * q1, 3),
                "ms_q3": round(1e3 * q3, 3),
                "gmacs_per_s": round(macs / med / 1e9, 2),
                "speedup": round(base / med, 3),
                **self.timing.env(),
            }

    def title(self, machine: str) -> str:
        return (
            f"varlen attention op on SPA's packs, and the gate's token scores, alone: {machine}; "
            f"{self.size.describe()}, shift {self.shift}, reps={self.timing.reps}, {self.timing.clock} clock; "
            "median (interquartile range) per call"
        )

    def header(self) -> str:
        return "| layout | ratio | bias | MMAC | impl | ms (IQR) | GMAC/s | speedup |\n|---|---|---|---|---|---|---|---|"

    def format_row(self, r: dict[str, Any]) -> str:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        return (
            f"| {r['layout']} | {ratio} | {r['position_bias']} | {r['mmacs']:.0f} | {r['impl']} | {r['ms']:.2f} "
            f"({r['ms_q1']:.2f}-{r['ms_q3']:.2f}) | {r['gmacs_per_s']:.1f} | {r['speedup']:.2f}x |"
        )
