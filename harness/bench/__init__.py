"""Benchmark of the SPA block (Select and Pack Attention, arXiv 2410.23608) on CPU against the dense Swin
block it replaces, of what Swin's position bias costs it, and of a whole backbone's training step:
``python -m harness.bench [--json]``.

Every timed model is spa_core's own: ``spa_core.block.SPABlock`` against ``spa_core.block.SwinBlock``,
``spa_core.backbone`` for the training step. The SPA block loads the Swin block's weights (only its gate
is its own), so a row compares one block with and without selection. Per pack strategy:

- ``containers``: the paper's containers of L = M*M = 49 slots; dense counterpart: Swin window
  attention, M = 7 on the 14x14 grid (4 windows), with its relative position bias and, for a shifted
  block (``--shifts 0,3``), its shift mask;
- ``varlen``, ``pad``, ``mask``: one sequence per image (padded, or attention dense over all N with
  the unselected keys masked: no saving in attention, the control); dense counterpart: a Swin block
  whose window covers the grid, i.e. global attention with Swin's bias.

Selection: image b keeps the ``counts[b]`` tokens its gate scores highest, the counts spread +-30%
around the ratio (a selection policy the benchmark registers while it runs), so the packs are ragged
as a gate's are. ``mlp_on: selected`` (default) lets an unselected token skip the whole block, the
regime where SPA saves compute: time and FLOPs both scale with the kept tokens.

Reported per strategy and ratio: kept fraction, time ratio (dense / SPA time), FLOP ratio (dense / SPA
multiply-adds, fvcore with ``kernels.FVCORE_HANDLES``) and efficiency = time ratio / FLOP ratio (1.0:
time falls exactly as FLOPs do). Forward passes in inference mode; dense and SPA calls alternate in one
process and the ratio is taken per pair, so machine load falls on both alike; medians and interquartile
ranges of the per-pair ratios, and each block's per-call time.

Other modes: ``--impl auto,torch`` (one SPA block per kernel implementation against the same dense
calls), ``--bias-cost`` (the SPA block with ``position_bias: swin`` against the same block with
``none``: the share of its time the bias costs), ``--train-step`` (forward, backward and AdamW step of
an SPA backbone against its dense twin: Swin-T at 112 px, batch 32, stages 3-4 keeping 25% by
top-k in containers), ``--ops`` (the varlen attention op alone, with the bias, per
CPU implementation, and the gate's scores), ``--profile`` (torch.profiler's per-op table of each block),
``--grid-file GRID`` (the backbone and head forward of every model of a grid, in rotation).

One command, several modes (about 900 lines): they share the block pair builder, the alternating-pairs
timer, the clocks and threads and the table writer, which is most of the file.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings
from functools import partial

import torch
from torch import Tensor, nn

from harness.grid import load_grid
from harness.task.data import build_datasets, fixed_batch
from harness.task.detector import build_detector
from harness.task.measure import InferenceForward
from kernels import (
    ENV_VAR,
    FVCORE_HANDLES,
    IMPLS,
    cpu_op_thread_count,
    token_scores,
    varlen_attention,
    varlen_attention_macs,
)
from kernels.position_bias import PositionBias
from spa_core.backbone import BackboneFeatures, build_backbone
from spa_core.block import SPABlock, SwinBlock
from spa_core.config import SPAConfig, backbone_preset, config_rules
from spa_core.pack import pack
from spa_core.registry import SELECTION_POLICIES
from spa_core.select import Selection
from spa_core.windows import token_places, window_order

__all__ = [
    "STRATEGIES", "CLOCKS", "BENCH_SELECTION", "KeptCounts", "bench_selection", "block_pair", "dense_window",
    "fvcore_macs", "make_counts", "counts_at", "time_in_rotation", "train_configs", "run", "run_bias_cost",
    "run_train_step", "run_ops", "profile", "time_grid", "main",
]  # fmt: skip

STRATEGIES = ("varlen", "containers", "pad", "mask")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
BENCH_SELECTION = "bench_kept_counts"  # registered only while the benchmark runs


# ----------------------------------------------------------------------------------------------------
# selection with per-image counts


class KeptCounts:
    """Selection policy (``SELECTION_POLICIES`` contract): image b keeps its ``counts[b]`` best-scoring
    tokens; ``counts: (B,)`` int64 is set by the caller before a forward (ties to the lower index)."""

    def __init__(self) -> None:
        self.counts: Tensor | None = None

    def __call__(self, scores: Tensor, *, cfg, training, generator=None, tokens=None) -> Selection:
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
def bench_selection():
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
    """Per-image kept counts around ``ratio * N``: uniform within +-spread (relative), clamped to [1, N]."""
    u = torch.rand(batch, generator=generator) * 2 - 1
    counts = torch.round(num_tokens * ratio * (1 + spread * u)).long()
    return counts.clamp(1, num_tokens)


def counts_at(position: int, batch: int, num_tokens: int, ratio: float, spread: float, seed: int) -> Tensor:
    """The counts of the ratio at ``position`` in the ratio list: every strategy (and ``--ops``,
    ``--profile``, ``--bias-cost``) sees the same counts at a ratio; the seed follows the position."""
    return make_counts(
        batch, num_tokens, ratio, spread, torch.Generator().manual_seed(seed * 1009 + position + 1)
    )


# ----------------------------------------------------------------------------------------------------
# the blocks


class _BlockOutput(nn.Module):
    """An SPA block's forward without its info: x (B, H, W, C) -> (B, H, W, C), what fvcore traces."""

    def __init__(self, block: SPABlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)[0]


def dense_window(strategy: str, grid: int, window: int) -> int:
    """The dense counterpart's window: Swin's M for containers, the whole grid (global) otherwise."""
    return window if strategy == "containers" else grid


def block_pair(
    strategy: str,
    *,
    dim: int,
    num_heads: int,
    grid: int,
    window: int = 7,
    shift: int = 0,
    position_bias: str = "swin",
    mlp_on: str = "selected",
    gate_scaling: bool = True,
    impl: str | None = None,
    selection: str = BENCH_SELECTION,
) -> tuple[SwinBlock, SPABlock]:
    """The dense ``SwinBlock`` of ``strategy`` and the ``SPABlock`` holding its weights (its gate is its
    own), both in eval mode. Containers: window ``window``, L = window^2; the other strategies: a window
    covering the ``grid x grid`` map (global attention)."""
    M = dense_window(strategy, grid, window)
    dense = SwinBlock(dim, num_heads, M, shift=shift).eval()
    cfg = SPAConfig(
        selection=selection, pack=strategy, container_len=window * window, position_bias=position_bias,
        mlp_on=mlp_on, gate_scaling=gate_scaling, attn_impl=impl or "auto",
    )  # fmt: skip
    spa = SPABlock(dim, num_heads, M, cfg, shift=shift).eval()
    missing, unexpected = spa.load_state_dict(dense.state_dict(), strict=False)
    own = [k for k in missing if not k.startswith("gate.")]
    dropped = [k for k in unexpected if position_bias == "swin" or "relative_position_bias_table" not in k]
    if own or dropped:
        raise RuntimeError(
            f"SPA block does not hold the Swin block's weights: missing {own}, unexpected {dropped}"
        )
    return dense, spa


def fvcore_macs(module: nn.Module, inputs: tuple) -> int:
    """fvcore's multiply-adds of ``module(*inputs)`` with ``kernels``' op handles."""
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(module, inputs).set_op_handle(**FVCORE_HANDLES)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(fca.total())


def _with_impl(fn, impl: str | None):
    """``fn`` called with ``SPA_ATTN_IMPL`` set to ``impl`` (None: as the environment has it), so that
    the block's pack, unpack and gate ops take it too, not only its attention (``cfg.attn_impl``)."""
    if impl is None:
        return fn

    def call():
        old = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = impl
        try:
            return fn()
        finally:
            if old is None:
                del os.environ[ENV_VAR]
            else:
                os.environ[ENV_VAR] = old

    return call


# ----------------------------------------------------------------------------------------------------
# timing


def time_in_rotation(
    fns: dict, reps: int, warmup: int, clock=time.perf_counter, start: int = 0, inference: bool = True
) -> dict[str, list[float]]:
    """Per-call times (seconds) of each function, called in rotation (which goes first rotates too) for
    ``warmup`` untimed and ``reps`` timed rounds: machine load in a round falls on all of them. With
    two functions: A and B alternating, pair by pair. ``start``: the rotation of the first round;
    ``inference``: run in ``torch.inference_mode`` (False for training steps)."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    with torch.inference_mode() if inference else contextlib.nullcontext():
        for r in range(start, start + warmup + reps):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                t0 = clock()
                fns[name]()
                if r >= start + warmup:
                    times[name].append(clock() - t0)
    return times


def _time_pairs(
    dense, spas: dict, reps: int, warmup: int, clock
) -> dict[str, tuple[list[float], list[float]]]:
    """(dense times, SPA times) per SPA block: each SPA call paired with a dense call (which goes first
    alternates), the blocks' pairs in rotation round by round."""
    names = list(spas)
    out: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in names}
    for r in range(warmup + reps):
        for j in ((r + k) % len(names) for k in range(len(names))):
            t = time_in_rotation({"dense": dense, "spa": spas[names[j]]}, 1, 0, clock, start=r + j)
            if r >= warmup:
                out[names[j]][0].extend(t["dense"])
                out[names[j]][1].extend(t["spa"])
    return out


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def _ms(prefix: str, ts: list[float]) -> dict:
    q1, med, q3 = (1e3 * t for t in _quartiles(ts))
    return {f"{prefix}_ms": round(med, 3), f"{prefix}_ms_q1": round(q1, 3), f"{prefix}_ms_q3": round(q3, 3)}


def _env(clock: str, reps: int) -> dict:
    return {
        "reps": reps,
        "threads": torch.get_num_threads(),
        "op_threads": cpu_op_thread_count(),
        "kernel_threads": cpu_op_thread_count(single_region=True),
        "clock": clock,
    }


# ----------------------------------------------------------------------------------------------------
# SPA block vs Swin block


def run(
    strategies=STRATEGIES,
    ratios=(0.1, 0.25, 0.5, 0.75, 1.0),
    batch: int = 32,
    grid: int = 14,
    dim: int = 384,
    num_heads: int = 6,
    window: int = 7,
    shifts=(0,),
    spread: float = 0.3,
    position_bias: str = "swin",
    mlp_on: str = "selected",
    reps: int = 21,
    warmup: int = 5,
    seed: int = 0,
    impl: str | tuple[str, ...] | None = None,
    clock: str = "wall",
    log=None,
) -> list[dict]:
    """Time every (strategy, shift, ratio): one flat dict per row, or per row and implementation when
    ``impl`` names several (``("auto", "torch")``): then one SPA block per implementation, with the
    same weights, each timed against the same dense calls in one rotation. ``shifts`` apply to
    containers (a window covering the grid is never shifted)."""
    impls = (impl,) if impl is None or isinstance(impl, str) else tuple(impl)
    N = grid * grid
    x = torch.randn(batch, grid, grid, dim, generator=torch.Generator().manual_seed(seed))  # (B, H, W, C)
    rows = []
    with bench_selection() as policy:
        for strategy in strategies:
            for shift in shifts if strategy == "containers" else (0,):
                torch.manual_seed(seed)
                dense, spa = block_pair(strategy, dim=dim, num_heads=num_heads, grid=grid, window=window, shift=shift,
                                        position_bias=position_bias, mlp_on=mlp_on, impl=impls[0])  # fmt: skip
                spas = {impls[0]: spa}
                for name in impls[1:]:  # every implementation computes the same block
                    spas[name] = block_pair(strategy, dim=dim, num_heads=num_heads, grid=grid, window=window,
                                            shift=shift, position_bias=position_bias, mlp_on=mlp_on, impl=name)[1]  # fmt: skip
                    spas[name].load_state_dict(spa.state_dict())
                dense_macs = fvcore_macs(dense, (x,))
                for i, ratio in enumerate(ratios):
                    policy.counts = counts_at(i, batch, N, ratio, spread, seed)
                    spa_macs = fvcore_macs(_BlockOutput(spa), (x,))  # the same for every impl
                    calls = {n: _with_impl(partial(b, x), n) for n, b in spas.items()}
                    pairs = _time_pairs(partial(dense, x), calls, reps, warmup, CLOCKS[clock])
                    for name, (td, ts) in pairs.items():
                        row = _row(strategy, ratio, shift, policy.counts, N, td, ts, dense_macs, spa_macs)
                        row.update(
                            dense="window" if strategy == "containers" else "global", position_bias=position_bias,
                            mlp_on=mlp_on, impl=name or os.environ.get(ENV_VAR, "auto"), **_env(clock, reps),
                        )  # fmt: skip
                        rows.append(row)
                        if log is not None:
                            log(_format_row(row, with_impl=len(impls) > 1))
    return rows


def _row(strategy, ratio, shift, counts, num_tokens, td, ts, dense_macs, spa_macs) -> dict:
    """One output row from the paired per-call times (seconds) of the dense and the SPA block."""
    q1, med, q3 = _quartiles([a / b for a, b in zip(td, ts)])
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
        **_ms("dense", td),  # per-call times, ms: median and interquartile range
        **_ms("spa", ts),
    }


_HEADER = (
    "| strategy | dense | shift | ratio | kept | time ratio (IQR) | FLOP ratio | efficiency (IQR) "
    "| dense ms (IQR) | SPA ms (IQR) |"
)


def _header(with_impl: bool = False) -> str:
    header = _HEADER.replace("| strategy |", "| strategy | impl |", 1) if with_impl else _HEADER
    return header + "\n" + "|---" * (header.count("|") - 1) + "|"


def _format_row(r: dict, with_impl: bool = False) -> str:
    impl = f" {r['impl']} |" if with_impl else ""
    return (
        f"| {r['strategy']} |{impl} {r['dense']} | {r['shift']} | {r['ratio']:.2f} | {r['kept_fraction']:.3f} | "
        f"{r['time_ratio']:.2f} ({r['time_ratio_q1']:.2f}-{r['time_ratio_q3']:.2f}) | {r['flop_ratio']:.2f} | "
        f"{r['efficiency']:.2f} ({r['efficiency_q1']:.2f}-{r['efficiency_q3']:.2f}) | "
        f"{r['dense_ms']:.1f} ({r['dense_ms_q1']:.1f}-{r['dense_ms_q3']:.1f}) | "
        f"{r['spa_ms']:.1f} ({r['spa_ms_q1']:.1f}-{r['spa_ms_q3']:.1f}) |"
    )


# ----------------------------------------------------------------------------------------------------
# the position bias's share of the SPA block's time


def run_bias_cost(
    strategies=("varlen", "containers"),
    ratio: float = 0.5,
    batch: int = 32,
    grid: int = 14,
    dim: int = 384,
    num_heads: int = 6,
    window: int = 7,
    shifts=(0,),
    spread: float = 0.3,
    mlp_on: str = "selected",
    reps: int = 21,
    warmup: int = 5,
    seed: int = 0,
    clock: str = "wall",
    log=None,
) -> list[dict]:
    """The SPA block with ``position_bias: swin`` against the same block (same weights, same selection)
    with ``none``, calls alternating: ``bias_share`` = (t_swin - t_none) / t_swin per pair, median and
    interquartile range; one row per (strategy, shift)."""
    N = grid * grid
    x = torch.randn(batch, grid, grid, dim, generator=torch.Generator().manual_seed(seed))  # (B, H, W, C)
    rows = []
    with bench_selection() as policy:
        policy.counts = counts_at(0, batch, N, ratio, spread, seed)
        for strategy in strategies:
            for shift in shifts if strategy == "containers" else (0,):
                torch.manual_seed(seed)
                kw = dict(dim=dim, num_heads=num_heads, grid=grid, window=window, shift=shift, mlp_on=mlp_on)
                _, with_bias = block_pair(strategy, position_bias="swin", **kw)
                _, without = block_pair(strategy, position_bias="none", **kw)
                missing, _ = without.load_state_dict(with_bias.state_dict(), strict=False)
                if missing:  # only the bias table may differ
                    raise RuntimeError(
                        f"the block without bias lacks weights of the block with it: {missing}"
                    )
                t = time_in_rotation({"swin": partial(with_bias, x), "none": partial(without, x)}, reps, warmup,
                                     CLOCKS[clock])  # fmt: skip
                q1, med, q3 = _quartiles([(a - b) / a for a, b in zip(t["swin"], t["none"])])
                row = {
                    "strategy": strategy, "ratio": ratio, "shift": shift,
                    "kept_fraction": round(float(policy.counts.sum()) / (batch * N), 4),
                    "bias_share": round(med, 4), "bias_share_q1": round(q1, 4), "bias_share_q3": round(q3, 4),
                    **_ms("swin", t["swin"]), **_ms("none", t["none"]), "mlp_on": mlp_on,
                    "impl": os.environ.get(ENV_VAR, "auto"), **_env(clock, reps),
                }  # fmt: skip
                rows.append(row)
                if log is not None:
                    log(
                        f"| {strategy} | {shift} | {ratio:.2f} | {row['kept_fraction']:.3f} | "
                        f"{100 * med:.1f}% ({100 * q1:.1f}-{100 * q3:.1f}) | "
                        f"{row['swin_ms']:.1f} ({row['swin_ms_q1']:.1f}-{row['swin_ms_q3']:.1f}) | "
                        f"{row['none_ms']:.1f} ({row['none_ms_q1']:.1f}-{row['none_ms_q3']:.1f}) |"
                    )
    return rows


# ----------------------------------------------------------------------------------------------------
# a training step of a whole backbone


def train_configs(preset: str = "swin_t", *, ratio: float = 0.25, strategy: str = "containers",
                  mlp_on: str = "selected", **overrides):  # fmt: skip
    """The SPA backbone of the training step (stages 3-4 keep ``ratio`` of their tokens by top-k) and
    its dense twin (same config, ``variant: dense``). No stochastic depth: the two steps differ only
    in selection."""
    spa = SPAConfig(selection="topk", ratio=ratio, pack=strategy, mlp_on=mlp_on, supervision="none")
    cfg = backbone_preset(preset, spa=spa, drop_path_rate=0.0, **overrides)
    return cfg, dataclasses.replace(cfg, variant="dense")


def run_train_step(
    preset: str = "swin_t",
    image: int = 112,
    batch: int = 32,
    ratio: float = 0.25,
    strategy: str = "containers",
    mlp_on: str = "selected",
    depths: tuple[int, ...] | None = None,
    embed_dim: int | None = None,
    reps: int = 11,
    warmup: int = 2,
    seed: int = 0,
    clock: str = "wall",
) -> dict:
    """One training step (forward, backward of a loss on the four stage maps, AdamW step) of the SPA
    backbone and of its dense twin (same initial weights), alternating; the speedup (dense / SPA time)
    per pair, its median and interquartile range, the fvcore FLOP ratio of the two forwards and
    efficiency = speedup / FLOP ratio. ``dense_spa_stage_share``: the share of the dense forward's
    multiply-adds in the SPA stages (how much selection can save at most).

    The default size, Swin-T (the paper's backbone) at 112 px, batch 32: stages 3-4 hold 64% of the
    dense forward's multiply-adds (the ``tiny`` preset at 128 px: 52%, at channel widths where per-op
    overhead rules), so keeping 25% there gives a FLOP ratio near 2. The batch is 32, not 16, because
    AdamW's step costs the same in both models (it scales with the 28M parameters, not the tokens) and
    at batch 16 it is about a tenth of the dense step, a cost the forwards' FLOP ratio does not see."""
    overrides = {k: v for k, v in (("depths", depths), ("embed_dim", embed_dim)) if v is not None}
    cfg, dense_cfg = train_configs(preset, ratio=ratio, strategy=strategy, mlp_on=mlp_on, **overrides)
    torch.manual_seed(seed)
    dense = build_backbone(dense_cfg)
    spa = build_backbone(cfg)
    missing, unexpected = spa.load_state_dict(dense.state_dict(), strict=False)
    if unexpected or not all(".gate." in k for k in missing):
        raise RuntimeError(f"SPA backbone does not hold its dense twin's weights: {missing}, {unexpected}")
    images = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(seed))
    macs, stage_share = {}, 0.0
    for name, model in (("dense", dense), ("spa", spa)):
        model.eval()
        macs[name], by_module = _fvcore_by_module(BackboneFeatures(model), (images,))
        if name == "dense":
            stage_share = (
                sum(by_module.get(f"backbone.stages.{s - 1}", 0) for s in cfg.spa_stages) / macs[name]
            )
        model.train()
    with torch.no_grad():
        kept = [float(b.kept_fraction) for b in spa(images).blocks]
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in (("dense", dense), ("spa", spa))}

    def step(name: str, model: nn.Module) -> None:
        opts[name].zero_grad(set_to_none=True)
        loss = sum(f.pow(2).mean() for f in model(images).features)
        loss.backward()
        opts[name].step()

    t = time_in_rotation({"dense": partial(step, "dense", dense), "spa": partial(step, "spa", spa)}, reps, warmup,
                         CLOCKS[clock], inference=False)  # fmt: skip
    q1, med, q3 = _quartiles([a / b for a, b in zip(t["dense"], t["spa"])])
    flop_ratio = macs["dense"] / macs["spa"]
    return {
        "preset": preset, "image": image, "batch": batch, "depths": list(cfg.depths), "embed_dim": cfg.embed_dim,
        "window": cfg.window_size, "spa_stages": list(cfg.spa_stages), "strategy": strategy, "mlp_on": mlp_on,
        "ratio": ratio, "kept_fraction": round(statistics.fmean(kept), 4),
        "speedup": round(med, 4), "speedup_q1": round(q1, 4), "speedup_q3": round(q3, 4),
        "flop_ratio": round(flop_ratio, 4), "efficiency": round(med / flop_ratio, 4),
        "efficiency_q1": round(q1 / flop_ratio, 4), "efficiency_q3": round(q3 / flop_ratio, 4),
        "dense_fwd_gmacs": round(macs["dense"] / 1e9, 4), "spa_fwd_gmacs": round(macs["spa"] / 1e9, 4),
        "dense_spa_stage_share": round(stage_share, 4),
        **_ms("dense", t["dense"]), **_ms("spa", t["spa"]),
        "impl": os.environ.get(ENV_VAR, "auto"), **_env(clock, reps),
    }  # fmt: skip


def _fvcore_by_module(module: nn.Module, inputs: tuple) -> tuple[int, dict[str, int]]:
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(module, inputs).set_op_handle(**FVCORE_HANDLES)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(fca.total()), {k: int(v) for k, v in fca.by_module().items()}


def _format_train(r: dict) -> str:
    return (
        "| model | kept | step ms (IQR) | speedup (IQR) | FLOP ratio | efficiency (IQR) | SPA stages' share |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| dense | 1.000 | {r['dense_ms']:.1f} ({r['dense_ms_q1']:.1f}-{r['dense_ms_q3']:.1f}) | 1.00 | 1.00 | - | "
        f"{r['dense_spa_stage_share']:.3f} |\n"
        f"| SPA {r['strategy']} | {r['kept_fraction']:.3f} | "
        f"{r['spa_ms']:.1f} ({r['spa_ms_q1']:.1f}-{r['spa_ms_q3']:.1f}) | "
        f"{r['speedup']:.2f} ({r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}) | {r['flop_ratio']:.2f} | "
        f"{r['efficiency']:.2f} ({r['efficiency_q1']:.2f}-{r['efficiency_q3']:.2f}) | - |"
    )


# ----------------------------------------------------------------------------------------------------
# the attention op alone, per CPU implementation; profiles of the blocks


def run_ops(
    ratios=(0.25, 0.5),
    impls=("torch", "cpp"),
    batch: int = 32,
    grid: int = 14,
    dim: int = 384,
    num_heads: int = 6,
    window: int = 7,
    shift: int = 0,
    spread: float = 0.3,
    position_bias: str = "swin",
    reps: int = 21,
    warmup: int = 5,
    seed: int = 0,
    clock: str = "wall",
    log=None,
) -> list[dict]:
    """``kernels.varlen_attention`` alone on the packs an SPA block makes (``spa_core.pack.pack`` in its
    window order): ``varlen`` (one sequence per image, a window covering the grid) and ``containers``
    (L = window^2, window order with ``shift``), with Swin's bias from the tokens' places when
    ``position_bias`` is ``swin``; and the gate's ``token_scores`` over the whole batch (layout
    ``gate``), the implementations called in rotation in one process. One row per (layout, ratio,
    impl): median and interquartile range of the per-call times, GMAC/s, and the speedup over the
    first impl's median."""
    N, D = grid * grid, dim // num_heads
    rows = []

    def emit(layout, ratio, macs, times):
        base = statistics.median(times[impls[0]])
        for name in impls:
            q1, med, q3 = _quartiles(times[name])
            row = {
                "layout": layout, "ratio": ratio, "impl": name, "mmacs": round(macs / 1e6, 3),
                "position_bias": position_bias if layout != "gate" else "none",
                "ms": round(1e3 * med, 3), "ms_q1": round(1e3 * q1, 3), "ms_q3": round(1e3 * q3, 3),
                "gmacs_per_s": round(macs / med / 1e9, 2), "speedup": round(base / med, 3), **_env(clock, reps),
            }  # fmt: skip
            rows.append(row)
            if log is not None:
                r = "-" if ratio is None else f"{ratio:.2f}"
                log(
                    f"| {layout} | {r} | {row['position_bias']} | {row['mmacs']:.0f} | {name} | {row['ms']:.2f} "
                    f"({row['ms_q1']:.2f}-{row['ms_q3']:.2f}) | {row['gmacs_per_s']:.1f} | {row['speedup']:.2f}x |"
                )

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, N, dim, generator=g)
    for i, ratio in enumerate(ratios):
        counts = counts_at(i, batch, N, ratio, spread, seed)
        mask = torch.arange(N)[None, :] < counts[:, None]  # (B, N): which tokens does not matter to the op
        for layout in ("varlen", "containers"):
            M = dense_window(layout, grid, window)
            sft = shift if layout == "containers" else 0
            cfg = SPAConfig(pack=layout, container_len=window * window)
            packed = pack(x, mask, layout, cfg=cfg, order=window_order((grid, grid), M, sft))
            T = packed.tokens.shape[0]
            q, k, v = torch.randn(T, 3, num_heads, D, generator=g).unbind(1)
            kw = {}
            if position_bias == "swin":
                pos = token_places((grid, grid), M, sft).index_select(0, packed.indices % N)  # (T, 3)
                table = torch.randn((2 * M - 1) ** 2, num_heads, generator=g) * 0.02  # Swin's table for M
                kw["bias"] = PositionBias(pos, table, M)
            lengths = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).tolist()
            macs = varlen_attention_macs(num_heads, D, sum(n * n for n in lengths))
            calls = {
                name: partial(
                    varlen_attention, q, k, v, packed.cu_seqlens, packed.max_seqlen, impl=name, **kw
                )
                for name in impls
            }
            emit(layout, ratio, macs, time_in_rotation(calls, reps, warmup, CLOCKS[clock]))
    gate = nn.Linear(dim, 1)
    calls = {name: partial(token_scores, x, gate.weight, gate.bias, impl=name) for name in impls}
    emit("gate", None, batch * N * dim, time_in_rotation(calls, reps, warmup, CLOCKS[clock]))
    return rows


def profile(strategies, ratios, batch=32, grid=14, dim=384, num_heads=6, window=7, shift=0, spread=0.3,
            position_bias="swin", mlp_on="selected", reps=10, seed=0, impl=None, rows: int = 12) -> str:  # fmt: skip
    """torch.profiler's per-op table (self CPU time, sorted) of each dense block and SPA block, run
    ``reps`` times after warmup: where each block's time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    N = grid * grid
    x = torch.randn(batch, grid, grid, dim, generator=torch.Generator().manual_seed(seed))
    out = []
    with bench_selection() as policy:
        for strategy in strategies:
            sft = shift if strategy == "containers" else 0
            dense, spa = block_pair(strategy, dim=dim, num_heads=num_heads, grid=grid, window=window, shift=sft,
                                    position_bias=position_bias, mlp_on=mlp_on, impl=impl)  # fmt: skip
            dense_name = "window" if strategy == "containers" else "global"
            for i, ratio in enumerate(ratios):
                policy.counts = counts_at(i, batch, N, ratio, spread, seed)
                spa_call = _with_impl(partial(spa, x), impl)
                with torch.inference_mode():
                    for _ in range(5):
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
                    out.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------
# every model of a grid


def time_grid(path: str, rounds: int = 40, warmup: int = 5, clock: str = "cpu") -> list[dict]:
    """The forward SPA changes (``harness.task.measure.InferenceForward``: backbone and head, without the
    score threshold and NMS, whose cost follows how many boxes an untrained head lets through) of every
    model of the grid at ``path`` in one process, the models called in rotation, so that dense and SPA
    are timed under the same load (a grid's own ``forward_ms`` is timed per trial, while other trials
    share the machine). The models are untrained: top-k and random keep their ratio exactly, a gate
    keeps what an untrained gate keeps. The batch is the grid's fixed evaluation batch
    (``bench.batch_size`` val images), as in a trial."""

    grid = load_grid(path)
    cfg0 = grid.trials[0]
    _, val_ds = build_datasets(cfg0.data, trial_seed=cfg0.seed, progress=False)
    images, _ = fixed_batch(val_ds, cfg0.bench.batch_size)
    models = {}
    for cfg in grid.trials:
        torch.manual_seed(cfg.seed)
        models[cfg.name] = build_detector(cfg).eval()
    kept = {}
    with torch.inference_mode():
        for name, m in models.items():
            blocks = m(images)["backbone"].blocks
            kept[name] = statistics.fmean(float(b.kept_fraction) for b in blocks) if blocks else 1.0
    times = time_in_rotation(
        {n: partial(InferenceForward(m), images) for n, m in models.items()}, rounds, warmup, CLOCKS[clock]
    )
    base = statistics.median(times["dense"]) if "dense" in times else None
    rows = []
    for name in models:
        q1, med, q3 = _quartiles(times[name])
        rows.append({
            "grid": grid.name, "model": name, "kept_fraction": round(kept[name], 4), "batch": int(images.shape[0]),
            "ms": round(1e3 * med, 3), "ms_q1": round(1e3 * q1, 3), "ms_q3": round(1e3 * q3, 3),
            "speedup": round(base / med, 4) if base else None, **_env(clock, rounds),
        })  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------------------------
# command line


def _csv(text: str, cast=str) -> list:
    return [cast(t.strip()) for t in text.split(",") if t.strip()]


def _emit(rows, as_json: bool) -> None:
    if as_json:
        json.dump(rows, sys.stdout)
        print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON list (--train-step: one object)")
    p.add_argument("--strategies", default=None, help=f"comma list of {', '.join(STRATEGIES)} (default: all; "
                   "--bias-cost: varlen,containers)")  # fmt: skip
    p.add_argument("--ratios", default=None, help="kept ratios (default 0.1,0.25,0.5,0.75,1.0; --ops 0.25,0.5; "
                   "--bias-cost 0.5; --train-step 0.25)")  # fmt: skip
    p.add_argument("--batch", type=int, default=None, help="images per batch (default 32)")
    p.add_argument("--grid", type=int, default=14, help="tokens per side (N = grid^2)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--window", type=int, default=7, help="Swin's window M of containers (L = M^2)")
    p.add_argument(
        "--shifts", default="0", help="containers: comma list of shifts (0,3: unshifted and shifted)"
    )
    p.add_argument("--spread", type=float, default=0.3, help="relative spread of per-image counts")
    p.add_argument("--position-bias", choices=("swin", "none"), default="swin")
    p.add_argument("--mlp-on", choices=config_rules(SPAConfig)["mlp_on"]["choices"], default="selected")
    p.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed pairs per row (default 21; --train-step: steps per model, 11)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed pairs first (default 5; --train-step 2): the allocator's first calls page-fault "
        "fresh memory",
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
        "--bias-cost", action="store_true", help="time the SPA block with position_bias swin against none"
    )
    p.add_argument(
        "--train-step", action="store_true", help="time a training step of an SPA backbone against dense"
    )
    p.add_argument("--preset", default="swin_t", help="--train-step: backbone preset")
    p.add_argument("--image", type=int, default=112, help="--train-step: image side, pixels")
    p.add_argument("--depths", default=None, help="--train-step: override the preset's depths, e.g. 2,2,6,2")
    p.add_argument(
        "--embed-dim", type=int, default=None, help="--train-step: override the preset's embed_dim"
    )
    p.add_argument("--ops", action="store_true", help="time the varlen attention op alone per CPU implementation "
                   "(--impls) on the varlen and container packs, with the bias, and the gate's token scores")  # fmt: skip
    p.add_argument(
        "--impls", default="torch,cpp", help="with --ops: implementations, the first is the baseline"
    )
    p.add_argument("--profile", action="store_true", help="print torch.profiler's per-op table of each block")
    p.add_argument("--grid-file", default=None, metavar="GRID",
                   help="time the backbone and head forward (no NMS) of every model of this grid file, in rotation")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    modes = [m for m in ("bias_cost", "train_step", "ops", "profile", "grid_file") if getattr(a, m)]
    if len(modes) > 1:
        p.error(f"one mode at a time, got {', '.join('--' + m.replace('_', '-') for m in modes)}")
    mode = modes[0] if modes else "blocks"
    strategies = _csv(a.strategies) if a.strategies else list(STRATEGIES)
    if mode == "bias_cost" and not a.strategies:
        strategies = ["varlen", "containers"]
    for s in strategies:
        if s not in STRATEGIES:
            p.error(f"unknown strategy {s!r}; known: {', '.join(STRATEGIES)}")
    default_ratios = {"ops": "0.25,0.5", "bias_cost": "0.5", "train_step": "0.25"}.get(
        mode, "0.1,0.25,0.5,0.75,1.0"
    )
    ratios = _csv(a.ratios or default_ratios, float)
    shifts = _csv(a.shifts, int)
    impls = tuple(_csv(a.impl or "")) or (None,)
    for i in impls:
        if i is not None and i.lower() not in IMPLS:
            p.error(f"unknown implementation {i!r}; known: {', '.join(IMPLS)}")
    if len(impls) > 1 and mode != "blocks":
        p.error("--impl takes one implementation outside the block rows (--ops: use --impls)")
    if impls[0] is not None and mode not in ("blocks", "profile"):
        os.environ[ENV_VAR] = impls[0]
    batch = a.batch or 32
    a.reps = a.reps or (11 if mode == "train_step" else 21)
    warmup = a.warmup if a.warmup is not None else (2 if mode == "train_step" else 5)
    size = dict(batch=batch, grid=a.grid, dim=a.dim, num_heads=a.heads, window=a.window, spread=a.spread)
    log = None if a.json else print
    threads = (
        f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads (SPA_CPU_OP_THREADS: "
        f"{cpu_op_thread_count(single_region=True)} for one-region kernels, {cpu_op_thread_count()} for many-call "
        f"torch paths), impl {a.impl or os.environ.get(ENV_VAR, 'auto')}"
    )
    shape = f"B={batch}, N={a.grid}x{a.grid}, C={a.dim}, heads={a.heads}, M={a.window}"

    if mode == "profile":
        print(profile(strategies, ratios, reps=a.reps, seed=a.seed, impl=impls[0], shift=shifts[0],
                      position_bias=a.position_bias, mlp_on=a.mlp_on, **size))  # fmt: skip
        return 0
    if mode == "grid_file":
        rows = time_grid(a.grid_file, rounds=a.reps, warmup=warmup, clock=a.clock)
        if log:
            print(f"{rows[0]['grid']}: backbone and head forward (no score threshold, no NMS), batch {rows[0]['batch']}, {threads}, {a.clock} clock, "
                  f"{a.reps} rounds, untrained models; median (interquartile range)")  # fmt: skip
            print("| model | kept | ms (IQR) | dense / model |\n|---|---|---|---|")
            for r in rows:
                ratio = f"{r['speedup']:.2f}x" if r["speedup"] else "n/a"
                print(f"| {r['model']} | {r['kept_fraction']:.3f} | {r['ms']:.1f} ({r['ms_q1']:.1f}-{r['ms_q3']:.1f}) "
                      f"| {ratio} |")  # fmt: skip
        _emit(rows, a.json)
        return 0
    if mode == "ops":
        if log:
            print(f"varlen attention op on SPA's packs, and the gate's token scores, alone: {threads}; {shape}, "
                  f"shift {shifts[0]}, reps={a.reps}, {a.clock} clock; median (interquartile range) per call")  # fmt: skip
            print(
                "| layout | ratio | bias | MMAC | impl | ms (IQR) | GMAC/s | speedup |\n|---|---|---|---|---|---|---|---|"
            )
        rows = run_ops(ratios, tuple(_csv(a.impls)), reps=a.reps, warmup=warmup, seed=a.seed, clock=a.clock,
                       shift=shifts[0], position_bias=a.position_bias, log=log, **size)  # fmt: skip
        _emit(rows, a.json)
        return 0
    if mode == "bias_cost":
        if log:
            print(f"SPA block, position_bias swin vs none (same weights and selection), mlp_on {a.mlp_on}: {threads}; "
                  f"{shape}, reps={a.reps}, {a.clock} clock; bias share = (swin - none) / swin per pair, "
                  "median (interquartile range)")  # fmt: skip
            print("| strategy | shift | ratio | kept | bias share (IQR) | swin ms (IQR) | none ms (IQR) |\n"
                  "|---|---|---|---|---|---|---|")  # fmt: skip
        rows = run_bias_cost(strategies, ratios[0], shifts=shifts, mlp_on=a.mlp_on, reps=a.reps, warmup=warmup,
                             seed=a.seed, clock=a.clock, log=log, **size)  # fmt: skip
        _emit(rows, a.json)
        return 0
    if mode == "train_step":
        depths = tuple(_csv(a.depths, int)) if a.depths else None
        strategy = strategies[0] if a.strategies else "containers"
        row = run_train_step(a.preset, a.image, batch, ratios[0], strategy, a.mlp_on, depths, a.embed_dim,
                             a.reps, warmup, a.seed, a.clock)  # fmt: skip
        if a.json:
            json.dump(row, sys.stdout)
            print()
        else:
            print(f"training step (forward, backward, AdamW) of the {a.preset} backbone (depths {row['depths']}, "
                  f"embed_dim {row['embed_dim']}, window {row['window']}), {a.image}px, batch {batch}; stages "
                  f"{row['spa_stages']} SPA ({strategy}, top-k {ratios[0]}, mlp_on {a.mlp_on}) vs dense: {threads}; "
                  f"{a.reps} alternating steps each, {a.clock} clock; speedup = dense / SPA time per pair, median "
                  "(interquartile range); FLOP ratio: fvcore, forwards")  # fmt: skip
            print(_format_train(row))
        return 0
    if log:
        print(f"SPA block vs Swin block (position_bias {a.position_bias}, mlp_on {a.mlp_on}): {threads}; {shape}, "
              f"L={a.window}^2, reps={a.reps}, {a.clock} clock; medians (interquartile range) of per-pair ratios")  # fmt: skip
        print(_header(with_impl=len(impls) > 1))
    rows = run(strategies, ratios, shifts=shifts, position_bias=a.position_bias, mlp_on=a.mlp_on, reps=a.reps,
               warmup=warmup, seed=a.seed, impl=impls if len(impls) > 1 else impls[0], clock=a.clock, log=log,
               **size)  # fmt: skip
    _emit(rows, a.json)
    return 0
