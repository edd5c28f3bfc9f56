"""Benchmark of the SPA attention block (Select and Pack Attention, arXiv 2410.23608) on CPU against its
dense counterpart, per pack strategy and kept ratio: ``python -m kernels.bench [--json]``.

One block = gate score (Linear C->1, ``kernels.token_scores``) + top-k per image (``kernels.topk_indices``;
counts vary per image around the ratio) + pack + qkv Linear + attention + proj Linear + unpack onto the residual. Strategies (DESIGN.md):

- ``varlen``: one sequence per image (``kernels.varlen_attention``); dense counterpart: global attention;
- ``containers``: the paper's containers of L = M*M = 49 slots as varlen sequences; dense counterpart:
  Swin window attention, M = 7 (14x14 tokens = 4 windows of 49);
- ``pad``: each image padded to the batch's largest count, one SDPA with a key mask; vs global;
- ``mask``: dense compute over all tokens, unselected keys masked (no saving; the control); vs global.

Reported per strategy and ratio: kept fraction, time ratio (dense / SPA time), FLOP ratio (dense / SPA
multiply-adds, fvcore with ``kernels.FVCORE_HANDLES``) and packing efficiency = time ratio / FLOP ratio
(1.0: time falls exactly as FLOPs do). Times are forward passes in inference mode; dense and SPA runs
alternate in one process and the ratio is taken per pair, so machine load affects both alike; the
table shows medians and the interquartile range of the per-pair ratios, and each block's per-call time.

``--impl auto,torch`` times one SPA block per implementation (same weights) against the same dense calls,
one row each: what the C++ kernels buy over the plain torch path, measured in one process.

``--ops`` times the attention op alone per CPU implementation (``--impls torch,cpp``) on the varlen and
container layouts of the same packs, and the gate's ``token_scores`` over the batch; ``--profile``
prints torch.profiler's per-op table of each block.

This module builds its blocks from ``kernels``' own ops only (it must not import spa_core).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import (
    ENV_VAR,
    FVCORE_HANDLES,
    IMPLS,
    container_seqlens,
    cpu_op_thread_count,
    cu_seqlens_from_counts,
    pack_tokens,
    token_scores,
    topk_indices,
    unpack_tokens,
    varlen_attention,
    varlen_attention_macs,
)

__all__ = [
    "SPAAttentionBlock", "GlobalAttentionBlock", "WindowAttentionBlock", "STRATEGIES", "run", "run_ops", "profile",
    "time_in_rotation", "main",
]  # fmt: skip

STRATEGIES = ("varlen", "containers", "pad", "mask")


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def split(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., C) -> q, k, v: (..., H, D) each."""
        *lead, C = x.shape
        return self.qkv(x).view(*lead, 3, self.num_heads, C // self.num_heads).unbind(-3)


class GlobalAttentionBlock(_Attention):
    """Dense global attention over all N tokens: x (B, N, C) -> x + proj(attn(x))."""

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.split(x))  # (B, H, N, D)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        return x + self.proj(o)


class WindowAttentionBlock(_Attention):
    """Swin window attention (no shift, no position bias) with M x M windows on an (h, w) grid."""

    def __init__(self, dim: int, num_heads: int, grid: tuple[int, int], window: int = 7):
        super().__init__(dim, num_heads)
        self.grid, self.window = grid, window

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        (h, w), M = self.grid, self.window
        win = x.view(B, h // M, M, w // M, M, C).transpose(2, 3).reshape(-1, M * M, C)  # (B*nW, M*M, C)
        q, k, v = (t.transpose(1, 2) for t in self.split(win))  # (B*nW, H, M*M, D)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, M * M, C)
        o = self.proj(o).view(B, h // M, w // M, M, M, C).transpose(2, 3).reshape(B, N, C)
        return x + o


class SPAAttentionBlock(_Attention):
    """Gate, top-k per image, pack, attention within the strategy's sequences, unpack.

    x: (B, N, C); counts: (B,) tokens kept per image. Unselected tokens pass through unchanged.
    """

    def __init__(
        self, dim: int, num_heads: int, strategy: str, container_len: int = 49, impl: str | None = None
    ):
        super().__init__(dim, num_heads)
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        self.strategy, self.container_len, self.impl = strategy, container_len, impl
        self.gate = nn.Linear(dim, 1)

    def select(self, x: Tensor, counts: Tensor) -> Tensor:
        """Top-``counts[b]`` tokens of image b by gate score -> flat row ids (T,), image-major, each
        image's in token order."""
        score = token_scores(x, self.gate.weight, self.gate.bias, impl=self.impl)  # (B, N)
        return topk_indices(score, counts, impl=self.impl)

    def forward(self, x: Tensor, counts: Tensor) -> Tensor:
        B, N, C = x.shape
        flat = x.reshape(B * N, C)
        indices = self.select(x, counts)  # (T,)
        if self.strategy == "mask":
            return self._forward_mask(x, indices)
        packed = pack_tokens(flat, indices, impl=self.impl)  # (T, C)
        if self.strategy == "pad":
            o = self._attend_pad(packed, counts)
        else:
            if self.strategy == "varlen":
                cu, max_seqlen = cu_seqlens_from_counts(counts, impl=self.impl)
            else:
                cu, max_seqlen, _, _ = container_seqlens(counts, self.container_len, impl=self.impl)
            q, k, v = self.split(packed)  # (T, H, D)
            o = varlen_attention(q, k, v, cu, max_seqlen, impl=self.impl).reshape(-1, C)
        return unpack_tokens(self.proj(o), indices, flat, add=True, impl=self.impl).view(B, N, C)

    def _attend_pad(self, packed: Tensor, counts: Tensor) -> Tensor:
        """Every image padded to the largest count P: (B, P) slots, key mask. qkv runs on the padding
        too (the strategy's cost)."""
        B, C = counts.numel(), packed.shape[1]
        P = int(counts.max()) if B else 0
        cu, _ = cu_seqlens_from_counts(counts, impl=self.impl)
        slot = torch.arange(P, device=packed.device)[None, :]  # (1, P)
        valid = slot < counts[:, None]  # (B, P)
        src = (cu[:-1, None].long() + slot).clamp(max=max(packed.shape[0] - 1, 0))  # (B, P)
        grid = pack_tokens(packed, src.reshape(-1), impl=self.impl).view(B, P, C)
        q, k, v = (t.transpose(1, 2) for t in self.split(grid))  # (B, H, P, D)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        return o.transpose(1, 2).reshape(B * P, C)[valid.view(-1)]  # (T, C)

    def _forward_mask(self, x: Tensor, indices: Tensor) -> Tensor:
        B, N, C = x.shape
        flat = x.reshape(B * N, C)
        keep = torch.zeros(B * N, device=x.device).index_fill(0, indices, 1.0).view(B, N) > 0
        q, k, v = (t.transpose(1, 2) for t in self.split(x))  # (B, H, N, D)
        mask = keep[:, None, None, :] | ~keep.any(1)[:, None, None, None]  # images keeping nothing: any key
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B * N, C)
        o = pack_tokens(self.proj(o), indices, impl=self.impl)
        return unpack_tokens(o, indices, flat, add=True, impl=self.impl).view(B, N, C)


# ----------------------------------------------------------------------------------------------------
# measurement


def make_counts(
    batch: int, num_tokens: int, ratio: float, spread: float, generator: torch.Generator
) -> Tensor:
    """Per-image kept counts around ``ratio * N``: uniform within +-spread (relative), clamped to [1, N]."""
    u = torch.rand(batch, generator=generator) * 2 - 1
    counts = torch.round(num_tokens * ratio * (1 + spread * u)).long()
    return counts.clamp(1, num_tokens)


def fvcore_macs(module: nn.Module, inputs: tuple) -> int:
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(module, inputs).set_op_handle(**FVCORE_HANDLES)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(fca.total())


def counts_at(position: int, batch: int, num_tokens: int, ratio: float, spread: float, seed: int) -> Tensor:
    """The counts of the ratio at ``position`` in the ratio list: every strategy (and ``--ops``,
    ``--profile``) sees the same counts at a ratio; the seed follows the position."""
    return make_counts(batch, num_tokens, ratio, spread, torch.Generator().manual_seed(seed * 1009 + position + 1))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def time_in_rotation(
    fns: dict, reps: int, warmup: int, clock=time.perf_counter, start: int = 0
) -> dict[str, list[float]]:
    """Per-call times (seconds) of each function, in inference mode, called in rotation (which goes
    first rotates too) for ``warmup`` untimed and ``reps`` timed rounds: machine load in a round falls
    on all of them. With two functions: dense and SPA alternating, pair by pair. ``start``: the
    rotation of the first round."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode():
        for r in range(start, start + warmup + reps):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = clock()
                fns[name]()
                if r >= start + warmup:
                    times[name].append(clock() - t0)
    return times


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def run(
    strategies=STRATEGIES,
    ratios=(0.1, 0.25, 0.5, 0.75, 1.0),
    batch: int = 32,
    grid: tuple[int, int] = (14, 14),
    dim: int = 384,
    num_heads: int = 6,
    window: int = 7,
    spread: float = 0.3,
    reps: int = 21,
    warmup: int = 5,
    seed: int = 0,
    impl: str | tuple[str, ...] | None = None,
    clock: str = "wall",
    log=None,
) -> list[dict]:
    """Measure every (strategy, ratio); one flat dict per pair, or per pair and implementation when
    ``impl`` names several (``("auto", "torch")``): then one SPA block per implementation, with the
    same weights, each timed against the same dense block in one rotation (``_time_pairs``), so the
    implementations compare in one process."""
    impls = (impl,) if impl is None or isinstance(impl, str) else tuple(impl)
    torch.manual_seed(seed)
    N = grid[0] * grid[1]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, N, dim, generator=g)
    global_block = GlobalAttentionBlock(dim, num_heads).eval()
    window_block = WindowAttentionBlock(dim, num_heads, grid, window).eval()
    dense_macs = {
        "global": fvcore_macs(global_block, (x,)),
        "window": fvcore_macs(window_block, (x,)),
    }
    rows = []
    for strategy in strategies:
        spas = {}
        for name in impls:
            spa = SPAAttentionBlock(dim, num_heads, strategy, container_len=window * window, impl=name).eval()
            if spas:  # every implementation computes the same block
                spa.load_state_dict(spas[impls[0]].state_dict())
            spas[name] = spa
        dense_name = "window" if strategy == "containers" else "global"
        dense = window_block if dense_name == "window" else global_block
        for i, ratio in enumerate(ratios):
            counts = counts_at(i, batch, N, ratio, spread, seed)
            spa_macs = fvcore_macs(spas[impls[0]], (x, counts))  # the same for every impl
            pairs = _time_pairs(partial(dense, x), {n: partial(b, x, counts) for n, b in spas.items()}, reps,
                                warmup, CLOCKS[clock])  # fmt: skip
            for name, (td, ts) in pairs.items():
                row = _row(strategy, ratio, counts, batch * N, td, ts, dense_name, dense_macs[dense_name],
                           spa_macs, reps, name, clock)  # fmt: skip
                rows.append(row)
                if log is not None:
                    log(_format_row(row, with_impl=len(impls) > 1))
    return rows


def _time_pairs(dense, spas: dict, reps: int, warmup: int, clock) -> dict[str, tuple[list[float], list[float]]]:
    """(dense times, SPA times) per SPA block: each SPA call paired with a dense call (which goes first
    alternates), the blocks' pairs in rotation round by round. One block: ``time_in_rotation``'s
    alternation of the two."""
    names = list(spas)
    out: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for r in range(warmup + reps):
        for j in ((r + k) % len(names) for k in range(len(names))):
            t = time_in_rotation({"dense": dense, "spa": spas[names[j]]}, 1, 0, clock, start=r + j)
            if r >= warmup:
                out[names[j]][0].extend(t["dense"])
                out[names[j]][1].extend(t["spa"])
    return out


def _row(strategy, ratio, counts, total, td, ts, dense_name, dense_macs, spa_macs, reps, impl, clock) -> dict:
    """One output row from the paired per-call times (seconds) of the dense and the SPA block."""
    q1, med, q3 = _quartiles([a / b for a, b in zip(td, ts)])
    dq1, dmed, dq3 = (1e3 * t for t in _quartiles(td))
    sq1, smed, sq3 = (1e3 * t for t in _quartiles(ts))
    flop_ratio = dense_macs / spa_macs
    return {
        "strategy": strategy,
        "ratio": ratio,
        "kept_fraction": round(float(counts.sum()) / total, 4),
        "time_ratio": round(med, 4),
        "time_ratio_q1": round(q1, 4),
        "time_ratio_q3": round(q3, 4),
        "flop_ratio": round(flop_ratio, 4),
        "efficiency": round(med / flop_ratio, 4),
        "efficiency_q1": round(q1 / flop_ratio, 4),
        "efficiency_q3": round(q3 / flop_ratio, 4),
        "dense": dense_name,
        "dense_gmacs": round(dense_macs / 1e9, 4),
        "spa_gmacs": round(spa_macs / 1e9, 4),
        # per-call times, ms: median and interquartile range (the ratio's own spread is above)
        "dense_ms": round(dmed, 3),
        "dense_ms_q1": round(dq1, 3),
        "dense_ms_q3": round(dq3, 3),
        "spa_ms": round(smed, 3),
        "spa_ms_q1": round(sq1, 3),
        "spa_ms_q3": round(sq3, 3),
        "reps": reps,
        "threads": torch.get_num_threads(),
        "op_threads": cpu_op_thread_count(),
        "kernel_threads": cpu_op_thread_count(single_region=True),
        "impl": impl or os.environ.get(ENV_VAR, "auto"),
        "clock": clock,
    }


_HEADER = (
    "| strategy | dense | ratio | kept | time ratio (IQR) | FLOP ratio | efficiency (IQR) "
    "| dense ms (IQR) | SPA ms (IQR) |"
)


def _header(with_impl: bool = False) -> str:
    header = _HEADER.replace("| strategy |", "| strategy | impl |", 1) if with_impl else _HEADER
    return header + "\n" + "|---" * (header.count("|") - 1) + "|"


def _format_row(r: dict, with_impl: bool = False) -> str:
    impl = f" {r['impl']} |" if with_impl else ""
    return (
        f"| {r['strategy']} |{impl} {r['dense']} | {r['ratio']:.2f} | {r['kept_fraction']:.3f} | "
        f"{r['time_ratio']:.2f} ({r['time_ratio_q1']:.2f}-{r['time_ratio_q3']:.2f}) | {r['flop_ratio']:.2f} | "
        f"{r['efficiency']:.2f} ({r['efficiency_q1']:.2f}-{r['efficiency_q3']:.2f}) | "
        f"{r['dense_ms']:.1f} ({r['dense_ms_q1']:.1f}-{r['dense_ms_q3']:.1f}) | "
        f"{r['spa_ms']:.1f} ({r['spa_ms_q1']:.1f}-{r['spa_ms_q3']:.1f}) |"
    )


# ----------------------------------------------------------------------------------------------------
# the attention op alone, per CPU implementation; profiles of the blocks


def run_ops(
    ratios=(0.25, 0.5),
    impls=("torch", "cpp"),
    batch: int = 32,
    grid: tuple[int, int] = (14, 14),
    dim: int = 384,
    num_heads: int = 6,
    window: int = 7,
    spread: float = 0.3,
    reps: int = 21,
    warmup: int = 5,
    seed: int = 0,
    clock: str = "wall",
    log=None,
) -> list[dict]:
    """``varlen_attention`` alone on the varlen and container layouts of the block's packs, and the
    gate's ``token_scores`` over the whole batch (layout ``gate``, every ratio alike), the
    implementations called in rotation in one process. One row per (layout, ratio, impl): median and
    interquartile range of the per-call times, GMAC/s, and the speedup over the first impl's median."""
    N, D = grid[0] * grid[1], dim // num_heads
    rows = []

    def emit(layout, ratio, macs, times):
        base = statistics.median(times[impls[0]])
        for name in impls:
            q1, med, q3 = _quartiles(times[name])
            row = {
                "layout": layout, "ratio": ratio, "impl": name, "mmacs": round(macs / 1e6, 3),
                "ms": round(1e3 * med, 3), "ms_q1": round(1e3 * q1, 3), "ms_q3": round(1e3 * q3, 3),
                "gmacs_per_s": round(macs / med / 1e9, 2), "speedup": round(base / med, 3),
                "threads": torch.get_num_threads(), "kernel_threads": cpu_op_thread_count(single_region=True),
                "reps": reps, "clock": clock,
            }  # fmt: skip
            rows.append(row)
            if log is not None:
                r = "-" if ratio is None else f"{ratio:.2f}"
                log(
                    f"| {layout} | {r} | {row['mmacs']:.0f} | {name} | {row['ms']:.2f} "
                    f"({row['ms_q1']:.2f}-{row['ms_q3']:.2f}) | {row['gmacs_per_s']:.1f} | {row['speedup']:.2f}x |"
                )

    for i, ratio in enumerate(ratios):
        counts = counts_at(i, batch, N, ratio, spread, seed)
        T = int(counts.sum())
        q, k, v = torch.randn(T, 3, num_heads, D, generator=torch.Generator().manual_seed(seed)).unbind(1)
        layouts = {"varlen": cu_seqlens_from_counts(counts), "containers": container_seqlens(counts, window**2)[:2]}
        for layout, (cu, max_seqlen) in layouts.items():
            lengths = (cu[1:] - cu[:-1]).tolist()
            macs = varlen_attention_macs(num_heads, D, sum(n * n for n in lengths))
            run = {name: partial(varlen_attention, q, k, v, cu, max_seqlen, impl=name) for name in impls}
            emit(layout, ratio, macs, time_in_rotation(run, reps, warmup, CLOCKS[clock]))
    g = torch.Generator().manual_seed(seed)
    x, gate = torch.randn(batch, N, dim, generator=g), nn.Linear(dim, 1)
    run = {name: partial(token_scores, x, gate.weight, gate.bias, impl=name) for name in impls}
    emit("gate", None, batch * N * dim, time_in_rotation(run, reps, warmup, CLOCKS[clock]))
    return rows


def profile(strategies, ratios, batch=32, grid=(14, 14), dim=384, num_heads=6, window=7, spread=0.3,
            reps=10, seed=0, impl=None, rows: int = 12) -> str:  # fmt: skip
    """torch.profiler's per-op table (self CPU time, sorted) of each dense block and SPA block, run
    alternately ``reps`` times after warmup: where each block's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    N = grid[0] * grid[1]
    x = torch.randn(batch, N, dim, generator=torch.Generator().manual_seed(seed))
    blocks = {"global": GlobalAttentionBlock(dim, num_heads).eval(),
              "window": WindowAttentionBlock(dim, num_heads, grid, window).eval()}  # fmt: skip
    out = []
    for strategy in strategies:
        spa = SPAAttentionBlock(dim, num_heads, strategy, container_len=window * window, impl=impl).eval()
        dense_name = "window" if strategy == "containers" else "global"
        dense = blocks[dense_name]
        for i, ratio in enumerate(ratios):
            counts = counts_at(i, batch, N, ratio, spread, seed)
            with torch.inference_mode():
                for _ in range(5):
                    dense(x)
                    spa(x, counts)
                with torch_profile(activities=[ProfilerActivity.CPU]) as pd:
                    for _ in range(reps):
                        dense(x)
                with torch_profile(activities=[ProfilerActivity.CPU]) as ps:
                    for _ in range(reps):
                        spa(x, counts)
            for name, prof in ((f"dense {dense_name}", pd),
                               (f"SPA {strategy} at ratio {ratio}", ps)):  # fmt: skip
                out.append(f"## {name}: {reps} calls, {torch.get_num_threads()} threads")
                out.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--ratios", default="0.1,0.25,0.5,0.75,1.0")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--grid", type=int, default=14, help="tokens per side (N = grid^2)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--window", type=int, default=7)
    p.add_argument("--spread", type=float, default=0.3, help="relative spread of per-image counts")
    p.add_argument("--reps", type=int, default=21, help="timed dense/SPA pairs per row")
    p.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="untimed pairs first: the allocator's first calls page-fault fresh memory (measured here: "
        "thousands of faults per dense call for the first 4 calls, none after)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: process CPU time, robust to other load on a shared machine "
        "when used with --threads 1",
    )
    p.add_argument(
        "--impl",
        default=None,
        help="kernel implementation (default: SPA_ATTN_IMPL or auto); for the blocks, a comma list "
        "(auto,torch) times one SPA block per implementation against the same dense calls, one row each",
    )
    p.add_argument(
        "--ops",
        action="store_true",
        help="time the attention op alone per CPU implementation (--impls) on the varlen and container "
        "layouts, and the gate's token scores, instead of the blocks",
    )
    p.add_argument("--impls", default="torch,cpp", help="with --ops: implementations, the first is the baseline")
    p.add_argument(
        "--profile", action="store_true", help="print torch.profiler's per-op table of each dense and SPA block"
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    strategies = [s for s in a.strategies.split(",") if s]
    for s in strategies:
        if s not in STRATEGIES:
            p.error(f"unknown strategy {s!r}; known: {', '.join(STRATEGIES)}")
    ratios = [float(r) for r in a.ratios.split(",") if r]
    impls = tuple(i.strip() for i in (a.impl or "").split(",") if i.strip()) or (None,)
    for i in impls:
        if i is not None and i.lower() not in IMPLS:
            p.error(f"unknown implementation {i!r}; known: {', '.join(IMPLS)}")
    if len(impls) > 1 and (a.ops or a.profile):
        p.error("--impl takes one implementation with --ops (use --impls) and --profile")
    size = dict(batch=a.batch, grid=(a.grid, a.grid), dim=a.dim, num_heads=a.heads, window=a.window, spread=a.spread)
    if a.profile:
        print(profile(strategies, ratios, reps=a.reps, seed=a.seed, impl=impls[0], **size))
        return 0
    if a.ops:
        op_impls = tuple(i for i in a.impls.split(",") if i)
        log = None
        if not a.json:
            print(
                f"varlen attention op and the gate's token scores alone, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads "
                f"(one-region kernels: {cpu_op_thread_count(single_region=True)}), reps={a.reps}, {a.clock} clock; "
                "median (interquartile range) per call"
            )
            print("| layout | ratio | MMAC | impl | ms (IQR) | GMAC/s | speedup |")
            print("|---|---|---|---|---|---|---|")
            log = print
        rows = run_ops(ratios, op_impls, reps=a.reps, warmup=a.warmup, seed=a.seed, clock=a.clock, log=log, **size)
        if a.json:
            json.dump(rows, sys.stdout)
            print()
        return 0
    log = None
    if not a.json:
        print(
            f"SPA attention block vs dense, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads "
            f"(SPA's ops, SPA_CPU_OP_THREADS: {cpu_op_thread_count(single_region=True)} for one-region kernels, "
            f"{cpu_op_thread_count()} for many-call torch paths), impl {a.impl or os.environ.get(ENV_VAR, 'auto')}: "
            f"B={a.batch}, N={a.grid}x{a.grid}, C={a.dim}, heads={a.heads}, L={a.window}^2, "
            f"reps={a.reps}, {a.clock} clock; medians (interquartile range) of per-pair ratios"
        )
        print(_header(with_impl=len(impls) > 1))
        log = print
    rows = run(
        strategies, ratios, a.batch, (a.grid, a.grid), a.dim, a.heads, a.window, a.spread, a.reps,
        a.warmup, a.seed, impls if len(impls) > 1 else impls[0], a.clock, log,
    )  # fmt: skip
    if a.json:
        json.dump(rows, sys.stdout)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
