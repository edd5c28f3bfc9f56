"""The timed pair of the block modes: spa_core's ``SwinBlock`` and the ``SPABlock`` holding its weights
(no second implementation of either), and how a mode counts their multiply-adds and picks a kernel."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TypeVar

from fvcore.nn import FlopCountAnalysis
from torch import Tensor, nn

from harness.bench.selection import BENCH_SELECTION
from kernels import ENV_VAR, FVCORE_HANDLES
from spa_core.block import SPABlock, SwinBlock
from spa_core.config import SPAConfig

__all__ = ["BlockOutput", "dense_window", "block_pair", "fvcore_macs", "fvcore_by_module", "with_impl"]

T = TypeVar("T")


class BlockOutput(nn.Module):
    """An SPA block's forward without its info: x (B, H, W, C) -> (B, H, W, C), what fvcore traces."""

    def __init__(self, block: SPABlock) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)[0]


def dense_window(strategy: str, grid: int, window: int) -> int:
    """The dense counterpart's window: Swin's M for ``containers`` (the paper's containers hold one
    window's worth of tokens), the whole ``grid`` (global attention) for every other strategy (one
    sequence per image)."""
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
    own), both in eval mode, for inputs ``(B, grid, grid, dim)``. Containers: window ``window``,
    L = window^2; the other strategies: a window covering the map (``dense_window``)."""
    M = dense_window(strategy, grid, window)
    dense = SwinBlock(dim, num_heads, M, shift=shift).eval()
    cfg = SPAConfig(
        selection=selection,
        pack=strategy,
        container_len=window * window,
        position_bias=position_bias,
        mlp_on=mlp_on,
        gate_scaling=gate_scaling,
        attn_impl=impl or "auto",
    )
    spa = SPABlock(dim, num_heads, M, cfg, shift=shift).eval()
    missing, unexpected = spa.load_state_dict(dense.state_dict(), strict=False)
    own = [k for k in missing if not k.startswith("gate.")]
    dropped = [k for k in unexpected if position_bias == "swin" or "relative_position_bias_table" not in k]
    if own or dropped:
        raise RuntimeError(
            f"SPA block does not hold the Swin block's weights: missing {own}, unexpected {dropped}"
        )
    return dense, spa


def fvcore_by_module(module: nn.Module, inputs: tuple) -> tuple[int, dict[str, int]]:
    """fvcore's multiply-adds of ``module(*inputs)`` with ``kernels``' op handles: total, per module."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent shapes
        fca = FlopCountAnalysis(module, inputs).set_op_handle(**FVCORE_HANDLES)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(fca.total()), {k: int(v) for k, v in fca.by_module().items()}


def fvcore_macs(module: nn.Module, inputs: tuple) -> int:
    """fvcore's multiply-adds of ``module(*inputs)`` with ``kernels``' op handles."""
    return fvcore_by_module(module, inputs)[0]


def with_impl(fn: Callable[[], T], impl: str | None) -> Callable[[], T]:
    """``fn`` called with ``SPA_ATTN_IMPL`` set to ``impl`` (None: as the environment has it), so that
    the block's pack, unpack and gate ops take it too, not only its attention (``cfg.attn_impl``)."""
    if impl is None:
        return fn

    def call() -> T:
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
