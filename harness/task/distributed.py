"""DeepSpeed under the task's ``TrainBackend`` protocol, and the process group it runs on.

``deepspeed_config(cfg, device, world_size)`` turns a trial's ``train`` section into a DeepSpeed
config: micro-batch per worker, gradient accumulation, clipping, ZeRO stage, and the precision
(``train.precision``: ``auto`` is bf16 on a CUDA device that supports it and fp32 elsewhere; bf16
runs as DeepSpeed's ``torch_autocast`` with fp32 master weights; fp16 is refused on CPU).

``DeepSpeedBackend`` reuses the ``torch.distributed`` group that is already there (Ray Train's
``TorchConfig`` makes one per multi-worker trial; ``init_process_group()`` makes a one-process group
for a trial that runs in its Tune trial's own process) and builds the same AdamW and schedule as
``TorchBackend`` (``harness.task.optim``), handing both to ``deepspeed.initialize``. The
communication backend follows the device: gloo with ``DS_ACCELERATOR=cpu`` on CPU, nccl on CUDA (``comm_backend``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from harness.config import TrialConfig
from harness.task.optim import build_optimizer, build_scheduler

__all__ = [
    "DeepSpeedBackend",
    "deepspeed_config",
    "resolve_precision",
    "comm_backend",
    "prepare_accelerator",
    "init_process_group",
]


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``train.precision`` on ``device``; fp16 on CPU raises."""
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"  # CPU bf16 autocast is slower than fp32 on most CPUs
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("train.precision 'fp16' is not supported on CPU; use 'bf16', 'fp32' or 'auto'")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown train.precision {precision!r}; expected auto, fp32, bf16 or fp16")
    return precision


def deepspeed_config(cfg: TrialConfig, device: torch.device | str, world_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed config of a trial (a dict for ``deepspeed.initialize(config=...)``)."""
    tc = cfg.train
    if tc.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, got {tc.zero_stage}")
    if tc.batch_size < 1 or tc.grad_accum < 1 or world_size < 1:
        raise ValueError(
            f"batch_size, grad_accum and world_size must be >= 1, got "
            f"{tc.batch_size}, {tc.grad_accum}, {world_size}"
        )
    precision = resolve_precision(tc.precision, device)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.batch_size,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.batch_size * tc.grad_accum * world_size,
        "gradient_clipping": float(tc.grad_clip or 0.0),
        # memory_efficient_linear=False: otherwise ZeRO-3 replaces torch.nn.functional.linear for the
        # rest of the process, which hides every Linear from fvcore's trace (and from later trials
        # that reuse this process).
        "zero_optimization": {"stage": tc.zero_stage, "memory_efficient_linear": False},
        # The optimizer is the task's AdamW (the same as TorchBackend's), not a DeepSpeed one.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":  # CUDA only (refused on CPU above)
        config["fp16"] = {"enabled": True, "auto_cast": True}
    return config


def comm_backend(device: torch.device | str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def prepare_accelerator() -> torch.device:
    """The device of this worker; on a machine without CUDA, ``DS_ACCELERATOR=cpu`` so DeepSpeed
    (imported after this) picks its CPU accelerator. Call before the first ``import deepspeed``."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    os.environ["DS_ACCELERATOR"] = "cpu"
    return torch.device("cpu")


def init_process_group(device: torch.device) -> bool:
    """A one-process group (rank 0 of 1) over an in-memory store, unless one exists; returns
    whether it made one. No port, no rendezvous: what a trial run in its Tune trial's process needs."""
    if dist.is_initialized():
        return False
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    dist.init_process_group(comm_backend(device), store=dist.HashStore(), rank=0, world_size=1)
    return True


class DeepSpeedBackend:
    """``harness.task.backend.TrainBackend`` on a DeepSpeed engine (see the module docstring).

    ``setup_s`` is the time ``deepspeed.initialize`` took (setup, not training)."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "DeepSpeedBackend needs an initialized torch.distributed group "
                "(Ray Train's TorchConfig, or harness.task.distributed.init_process_group)"
            )
        self.device = torch.device(device) if device is not None else prepare_accelerator()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.engine: Any = None
        self.model: nn.Module | None = None
        self.ds_config: dict[str, Any] = {}
        self.setup_s = 0.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0] if self.engine is not None else float("nan")

    def setup(self, model: nn.Module, cfg: TrialConfig) -> Any:
        t0 = time.perf_counter()
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.model = model.to(self.device)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg.train)
        self.ds_config = deepspeed_config(cfg, self.device, self.world_size)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            dist_init_required=False,
        )
        self.setup_s = time.perf_counter() - t0
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # the engine divides by gradient_accumulation_steps

    def step(self) -> None:
        self.engine.step()  # steps optimizer + schedule and clips at accumulation boundaries only

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine's forward autocasts itself (torch_autocast)

    def all_reduce_mean(self, value: float | torch.Tensor) -> float | torch.Tensor:
        if self.world_size == 1:
            return value
        t = value.detach().clone().float() if torch.is_tensor(value) else torch.tensor(float(value))
        t = t.to(self.device)
        dist.all_reduce(t)
        t /= self.world_size
        return t if torch.is_tensor(value) else float(t)

    def sampler(
        self, dataset: torch.utils.data.Dataset, shuffle: bool, seed: int
    ) -> torch.utils.data.Sampler | None:
        if self.world_size == 1 and not shuffle:
            return None
        return torch.utils.data.DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.rank, shuffle=shuffle, seed=seed
        )

    def gathered_parameters(self) -> contextlib.AbstractContextManager:
        """Full parameters on every rank for the duration (ZeRO-3 partitions them; a no-op otherwise)."""
        if self.ds_config.get("zero_optimization", {}).get("stage") == 3 and self.model is not None:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None)
        return contextlib.nullcontext()
