"""Training checkpoints: a trial saves its whole training state every ``train.checkpoint_every``
optimizer steps, and a retried or re-run trial resumes from the last one.

A checkpoint is a folder ``<uri>/step<NNNNNNNN>/`` holding what the backend saves (a DeepSpeed
engine's checkpoint: model, optimizer shards of every rank, LR schedule, step counters; or the
``TorchBackend``'s state dicts) and, per rank, ``train_state.rank<r>.pt``: the micro-step reached
(the data order follows from it: the sampler's permutation is a function of the seed and the epoch),
the loss history the row's final losses are averaged over, the samples and training time so far, and
every RNG the next steps draw from (torch's CPU and CUDA generators, Python's, NumPy's, each SPA
block's selection generator). ``<uri>/latest.json`` names the last complete checkpoint: rank 0
writes it after every rank has written its files, and then removes the previous checkpoint, so an
interrupted save leaves the previous checkpoint in force.

``<uri>`` is a local folder or any pyarrow filesystem URI (``s3://...``): the backend writes to a
local folder (the checkpoint's own on a local filesystem, a temporary one otherwise, uploaded by
each rank and removed). A resumed run is the uninterrupted run, step for step, on the same machine
and thread count, except for draws made inside DataLoader worker processes (their generators
restart from the loader's seed). The training augmentation is not such a draw: it comes from a
generator keyed per sample by ``(seed, rank, epoch, position)`` (``harness.task.transforms``), which
the micro-step reached fixes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from torch import nn

from harness.results import filesystem, join_uri

__all__ = ["Checkpointer", "TrainState", "capture_rng", "restore_rng"]

log = logging.getLogger(__name__)

_LATEST = "latest.json"


@dataclass
class TrainState:
    """What ``train_variant`` resumes from, per rank (see the module docstring)."""

    micro_step: int = 0
    samples: int = 0
    train_time: float = 0.0
    history: list[tuple[float, float]] = field(default_factory=list)  # (task, gate) loss per micro-step
    window: list[tuple[float, float, float, float]] = field(default_factory=list)  # on_log's open window
    rng: dict[str, Any] = field(default_factory=dict)


def _selection_generators(model: nn.Module) -> dict[str, torch.Generator]:
    return {
        n: m.generator
        for n, m in model.named_modules()
        if isinstance(getattr(m, "generator", None), torch.Generator)
    }


def capture_rng(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """Every RNG state the next training steps draw from (see the module docstring)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (the legacy global state a dataset may draw from)
        "selection": {n: g.get_state() for n, g in _selection_generators(model).items()},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(model: nn.Module, device: torch.device, state: dict[str, Any]) -> None:
    """Put back what ``capture_rng`` captured (for the same model)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    generators = _selection_generators(model)
    if set(generators) != set(state["selection"]):
        raise ValueError(
            f"the checkpoint's selection generators {sorted(state['selection'])} are not the model's "
            f"{sorted(generators)}"
        )
    for name, g in generators.items():
        g.set_state(state["selection"][name])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _barrier(world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Saves and finds checkpoints under ``uri`` (see the module docstring).

    ``backend`` needs ``rank``, ``world_size``, ``save_state(folder, tag, client_state)`` and
    ``load_state(folder, tag) -> client_state`` (``DeepSpeedBackend``, ``TorchBackend``). Every rank
    calls ``save`` and ``restore`` (the backend's save is collective)."""

    def __init__(self, uri: str, every: int) -> None:
        if every < 1:
            raise ValueError(f"checkpoint interval must be at least 1 optimizer step, got {every}")
        self.uri, self.every = uri, int(every)
        self.fs, self.path = filesystem(uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.save_s = 0.0  # time spent saving, left out of the training time

    def due(self, optimizer_step: int, total_steps: int) -> bool:
        """Whether to save after ``optimizer_step`` (1-based): every ``every`` steps and at the end."""
        return optimizer_step % self.every == 0 or optimizer_step == total_steps

    def latest(self) -> dict[str, Any] | None:
        """``latest.json`` of the last complete checkpoint, or ``None``."""
        try:
            with self.fs.open_input_stream(f"{self.path}/{_LATEST}") as f:
                data = json.loads(f.read())
        except (FileNotFoundError, OSError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("tag"), str) else None

    def save(self, backend: Any, optimizer_step: int, state: TrainState) -> None:
        t0 = time.perf_counter()
        tag = f"step{optimizer_step:08d}"
        previous = self.latest() if backend.rank == 0 else None
        tmp = None if self.local else tempfile.mkdtemp(prefix="spa-ckpt-")
        folder = self.path if tmp is None else tmp
        try:
            if self.local:
                os.makedirs(folder, exist_ok=True)
            backend.save_state(folder, tag, {"micro_step": state.micro_step})
            os.makedirs(os.path.join(folder, tag), exist_ok=True)
            torch.save(vars(state), os.path.join(folder, tag, f"train_state.rank{backend.rank}.pt"))
            if not self.local:  # each rank uploads the files it wrote
                pafs.copy_files(
                    os.path.join(folder, tag), f"{self.path}/{tag}", destination_filesystem=self.fs
                )
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        _barrier(backend.world_size)
        if backend.rank == 0:
            marker = {"tag": tag, "optimizer_step": optimizer_step, "micro_step": state.micro_step,
                      "world_size": backend.world_size, "time": time.time()}  # fmt: skip
            # written then renamed on a local disk: a process killed mid-write leaves the previous
            # marker, not an empty one (a PUT to an object store is atomic already)
            target = f"{self.path}/{_LATEST}"
            partial = f"{target}.tmp-{os.getpid()}" if self.local else target
            with self.fs.open_output_stream(partial) as f:
                f.write(json.dumps(marker).encode())
            if partial != target:
                os.replace(partial, target)
            if previous is not None and previous["tag"] != tag:
                self._delete(f"{self.path}/{previous['tag']}")
        _barrier(backend.world_size)
        self.save_s += time.perf_counter() - t0
        log.info("checkpoint %s/%s saved (micro-step %d)", self.uri, tag, state.micro_step)

    def restore(self, backend: Any) -> TrainState | None:
        """Load the last checkpoint into ``backend``'s model, optimizer and schedule; this rank's
        ``TrainState``, or ``None`` when there is none to resume from."""
        marker = self.latest()
        if marker is None:
            return None
        if marker.get("world_size") != backend.world_size:
            log.warning("checkpoint %s was saved by %s ranks, not %d: training starts over",
                        join_uri(self.uri, marker["tag"]), marker.get("world_size"), backend.world_size)  # fmt: skip
            return None
        tag = marker["tag"]
        tmp = None if self.local else tempfile.mkdtemp(prefix="spa-ckpt-")
        folder = self.path if tmp is None else tmp
        try:
            if not self.local:
                self._download(f"{self.path}/{tag}", os.path.join(folder, tag))
            client = backend.load_state(folder, tag) or {}
            saved = torch.load(
                os.path.join(folder, tag, f"train_state.rank{backend.rank}.pt"), weights_only=False
            )
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        state = TrainState(**saved)
        if client.get("micro_step") != state.micro_step:
            raise RuntimeError(
                f"checkpoint {join_uri(self.uri, tag)}: the engine's micro-step {client.get('micro_step')} "
                f"is not rank {backend.rank}'s {state.micro_step}"
            )
        log.warning("resuming from checkpoint %s (micro-step %d)", join_uri(self.uri, tag), state.micro_step)
        return state

    def _download(self, remote: str, local: str) -> None:
        """The folder ``remote`` of the store into the local folder ``local`` (pyarrow's copy makes
        no local folders)."""
        os.makedirs(local, exist_ok=True)
        for info in self.fs.get_file_info(pafs.FileSelector(remote, recursive=True)):
            if info.type == pafs.FileType.Directory:
                os.makedirs(os.path.join(local, os.path.relpath(info.path, remote)), exist_ok=True)
        pafs.copy_files(
            remote, local, source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem()
        )

    def clear(self) -> None:
        """Remove every checkpoint under ``uri`` (a finished trial keeps none)."""
        self._delete(self.path)

    def _delete(self, path: str) -> None:
        try:
            self.fs.delete_dir(path)
        except (FileNotFoundError, OSError):
            pass
