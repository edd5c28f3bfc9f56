"""How ``train_variant`` talks to the machinery that runs it: the ``TrainBackend`` protocol.

``TorchBackend`` is the single-process implementation (plain PyTorch, CPU or one GPU).
``harness.task.distributed.DeepSpeedBackend`` implements the same protocol on DeepSpeed; both build the
optimizer and schedule with ``harness.task.optim`` (``build_optimizer``, ``build_scheduler``) so they
train alike.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sized
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import nn

from harness.config import TrialConfig
from harness.task.optim import build_optimizer, build_scheduler

__all__ = ["TrainBackend", "TorchBackend", "autocast_dtype"]


@runtime_checkable
class TrainBackend(Protocol):
    """What ``train_variant`` needs from the process that trains.

    Attributes: ``device`` (``torch.device``: where batches go), ``rank`` and ``world_size`` (data
    parallel), ``is_main`` (rank 0: the one that reports).

    - ``setup(model, cfg) -> module``: move ``model`` to ``device``, build AdamW and its schedule
      (``harness.task.optim.build_optimizer`` / ``build_scheduler``; ``cfg.train`` resolved to steps:
      lr, weight_decay, warmup_steps, steps, schedule, grad_accum, grad_clip, precision) and return
      the callable to run forward with (the model
      itself, a DDP wrapper or a DeepSpeed engine); ``module(images, targets)`` returns the
      detector's output dict.
    - ``backward(loss)``: back-propagate one micro-batch's loss (unscaled: the backend divides by
      ``grad_accum`` if it needs to).
    - ``step()``: called after every micro-batch; at each ``grad_accum``-th call it clips gradients
      (``grad_clip``), steps the optimizer and the schedule and zeroes the gradients, as DeepSpeed's
      ``engine.step()`` does. ``cfg.train.steps`` counts these optimizer steps.
    - ``autocast()``: context manager for the forward pass (bf16 autocast or nothing).
    - ``all_reduce_mean(value)``: a float or tensor averaged over ranks (identity on one process).
    - ``sampler(dataset, shuffle, seed)``: a sampler giving this rank its share (or ``None`` for the
      default order); ``train_variant`` calls ``set_epoch`` on it when it has one.
    """

    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def setup(self, model: nn.Module, cfg: TrialConfig) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def all_reduce_mean(self, value: float | torch.Tensor) -> float | torch.Tensor: ...

    def sampler(
        self, dataset: torch.utils.data.Dataset, shuffle: bool, seed: int
    ) -> torch.utils.data.Sampler | None: ...


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision`` on ``device`` (None: fp32, no autocast).

    ``auto`` is bf16 on a CUDA device that supports it, fp32 elsewhere (CPU bf16 autocast is slow
    on most CPUs, and fp16 is never used on CPU)."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type == "cpu":
            raise ValueError("train.precision 'fp16' is not supported on CPU; use 'bf16', 'fp32' or 'auto'")
        return torch.float16
    raise ValueError(f"unknown train.precision {precision!r}; expected auto, fp32, bf16 or fp16")


class TorchBackend:
    """Single process, plain PyTorch: ``TrainBackend`` for a CPU or one GPU.

    fp16 uses a ``GradScaler``; bf16 and fp32 do not need one."""

    rank = 0
    world_size = 1

    def __init__(self, device: str | torch.device | None = None) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._model: nn.Module | None = None
        self._opt: torch.optim.Optimizer | None = None
        self._sched: torch.optim.lr_scheduler.LambdaLR | None = None
        self._dtype: torch.dtype | None = None
        self._scaler: torch.amp.GradScaler | None = None
        self._accum = 1
        self._clip = 0.0
        self._micro = 0

    @property
    def is_main(self) -> bool:
        return True

    @property
    def lr(self) -> float:
        """The current learning rate (first parameter group)."""
        return self._opt.param_groups[0]["lr"] if self._opt else math.nan

    def setup(self, model: nn.Module, cfg: TrialConfig) -> nn.Module:
        tc = cfg.train
        self._model = model.to(self.device)
        self._opt = build_optimizer(model, cfg)
        self._sched = build_scheduler(self._opt, tc)
        self._dtype = autocast_dtype(tc.precision, self.device)
        self._scaler = torch.amp.GradScaler(self.device.type) if self._dtype == torch.float16 else None
        self._accum = max(1, tc.grad_accum)
        self._clip = tc.grad_clip
        self._micro = 0
        return model

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self._accum
        (self._scaler.scale(loss) if self._scaler else loss).backward()

    def step(self) -> None:
        if self._model is None or self._opt is None or self._sched is None:
            raise RuntimeError("step() before setup(): the backend has no model and optimizer yet")
        self._micro += 1
        if self._micro % self._accum:
            return
        if self._scaler:
            self._scaler.unscale_(self._opt)
        if self._clip and self._clip > 0:
            torch.nn.utils.clip_grad_norm_(self._model.parameters(), self._clip)
        if self._scaler:
            self._scaler.step(self._opt)
            self._scaler.update()
        else:
            self._opt.step()
        self._sched.step()
        self._opt.zero_grad(set_to_none=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self._dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._dtype)

    def all_reduce_mean(self, value: float | torch.Tensor) -> float | torch.Tensor:
        return value

    def sampler(
        self, dataset: torch.utils.data.Dataset, shuffle: bool, seed: int
    ) -> torch.utils.data.Sampler | None:
        if not shuffle:
            return None
        return _SeededRandomSampler(len(cast(Sized, dataset)), seed)


class _SeededRandomSampler(torch.utils.data.Sampler[int]):
    """A fresh permutation per epoch from ``(seed, epoch)``: the same order in every run."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n
