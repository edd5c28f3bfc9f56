"""What every bench mode shares: the size of the timed input, the timing settings, the runner interface,
and the columns every row carries (per-call times in ms, the threads and clock they were taken with)."""

from __future__ import annotations

import abc
import contextlib
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from harness.task.timing import quartiles, time_in_rotation
from kernels import ENV_VAR, cpu_op_thread_count
from spa_core.registry import PACK_STRATEGIES

__all__ = [
    "CLOCKS",
    "BlockSize",
    "Timing",
    "Runner",
    "ms_columns",
    "pack_strategies",
    "impl_in_env",
    "machine",
]

CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class BlockSize:
    """The timed input of the block modes: ``batch`` images of ``grid x grid`` tokens of ``dim``
    channels, ``num_heads`` heads, Swin's window ``window`` (containers of L = window^2 slots); the
    per-image kept counts spread +-``spread`` (relative) around a ratio."""

    batch: int = 32
    grid: int = 14
    dim: int = 384
    num_heads: int = 6
    window: int = 7
    spread: float = 0.3

    def __post_init__(self) -> None:
        for name in ("batch", "grid", "dim", "num_heads", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of num_heads {self.num_heads}")
        if not 0 <= self.spread < 1:
            raise ValueError(f"spread must be in [0, 1), got {self.spread}")

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def tokens(self, seed: int) -> Tensor:
        """The timed input ``x: (batch, grid, grid, dim)``, drawn from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch, self.grid, self.grid, self.dim, generator=g)

    def describe(self) -> str:
        return f"B={self.batch}, N={self.grid}x{self.grid}, C={self.dim}, heads={self.num_heads}, M={self.window}"


@dataclass(frozen=True)
class Timing:
    """How a mode times: ``warmup`` untimed and ``reps`` timed rounds of calls in rotation
    (``harness.task.timing.time_in_rotation``) on ``clock`` (``wall`` or ``cpu``: process CPU time,
    robust to other load on a shared machine with one thread); ``seed`` draws inputs and weights."""

    reps: int = 21
    warmup: int = 5
    clock: str = "wall"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reps < 1 or self.warmup < 0:
            raise ValueError(f"reps >= 1 and warmup >= 0, got reps={self.reps}, warmup={self.warmup}")
        if self.clock not in CLOCKS:
            raise ValueError(f"unknown clock {self.clock!r}; known: {', '.join(CLOCKS)}")

    def time(
        self, fns: Mapping[str, Callable[[], object]], *, inference: bool = True
    ) -> dict[str, list[float]]:
        """Per-call times (seconds) of ``fns`` in rotation; in ``torch.inference_mode`` unless
        ``inference`` is False (a training step)."""
        with torch.inference_mode() if inference else contextlib.nullcontext():
            return time_in_rotation(fns, self.reps, self.warmup, clock=CLOCKS[self.clock])

    def env(self) -> dict[str, Any]:
        """The columns every row ends with: repetitions, torch's threads, SPA's CPU op threads, clock."""
        return {
            "reps": self.reps,
            "threads": torch.get_num_threads(),
            "op_threads": cpu_op_thread_count(),
            "kernel_threads": cpu_op_thread_count(single_region=True),
            "clock": self.clock,
        }


class Runner(abc.ABC):
    """One bench mode (timm's benchmark runners): built with its settings, ``rows()`` measures and
    yields one flat dict per row as it goes (the JSON's rows), ``title``/``header``/``format_row``
    print them as a Markdown table."""

    json_object = False  # the JSON is the one row itself, not a list of rows

    @abc.abstractmethod
    def rows(self) -> Iterator[dict[str, Any]]: ...

    def run(self) -> list[dict[str, Any]]:
        return list(self.rows())

    @abc.abstractmethod
    def title(self, machine: str) -> str:
        """What the table shows and how it was timed; ``machine``: see ``machine()``."""

    @abc.abstractmethod
    def header(self) -> str: ...

    @abc.abstractmethod
    def format_row(self, row: dict[str, Any]) -> str: ...


def ms_columns(prefix: str, seconds: Sequence[float]) -> dict[str, float]:
    """``{prefix}_ms`` and its quartiles ``_ms_q1``, ``_ms_q3`` of per-call times given in seconds."""
    q1, med, q3 = (1e3 * t for t in quartiles(seconds))
    return {f"{prefix}_ms": round(med, 3), f"{prefix}_ms_q1": round(q1, 3), f"{prefix}_ms_q3": round(q3, 3)}


def pack_strategies() -> tuple[str, ...]:
    """Every pack strategy ``spa_core.registry.PACK_STRATEGIES`` holds (the built-ins and any plugin's)."""
    return tuple(PACK_STRATEGIES)


def impl_in_env() -> str:
    """The kernel implementation the environment picks (``SPA_ATTN_IMPL``, default ``auto``)."""
    return os.environ.get(ENV_VAR, "auto")


def machine(impl: str | None = None) -> str:
    """The table titles' description of what ran: torch, its threads, SPA's op threads, the impl."""
    return (
        f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads (SPA_CPU_OP_THREADS: "
        f"{cpu_op_thread_count(single_region=True)} for one-region kernels, {cpu_op_thread_count()} for "
        f"many-call torch paths), impl {impl or impl_in_env()}"
    )
