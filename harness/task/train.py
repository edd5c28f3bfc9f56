"""Train one variant for ``cfg.train.steps`` optimizer steps and evaluate it: the task's single
entry point, independent of Ray and usable with or without DeepSpeed (through a ``TrainBackend``).

``train_variant(cfg)`` returns one flat dict of metrics (the harness adds config and environment
columns to make a result row): losses, COCO mAP, gate metrics, steps and throughput.

Trials of one seed are paired: the seed fixes the training batches (the sampler's permutation per
epoch and the loader's generator) and their augmentation (flips, scales, crops: drawn per sample from
``(seed, rank, epoch, position)``, ``harness.task.transforms.AugmentedSampler``), the evaluation
images (the first ``train.eval_images`` of the val split, in order), the initial weights a variant shares with the
dense model and selection's random streams (``harness.task.detector``). No loader draws from torch's
global RNG, which is left to what the variant itself consumes (stochastic depth).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from harness.config import TrialConfig
from harness.task.backend import TorchBackend, TrainBackend
from harness.task.coco import CocoDetection
from harness.task.data import build_datasets, collate_fn, image_sizes
from harness.task.detector import Detector, build_detector, pretrained_columns
from harness.task.evaluate import GateMeter, coco_map, to_coco_detections
from harness.task.optim import resolve_schedule
from harness.task.transforms import AugmentedSampler
from spa_core import contracts

__all__ = ["train_variant", "evaluate_variant", "NonFiniteLossError", "seed_everything", "to_device"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the message names the step and the loss parts."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def to_device(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]


def _batches(loader: torch.utils.data.DataLoader) -> Iterator[tuple[torch.Tensor, list[dict[str, Any]]]]:
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_variant(
    cfg: TrialConfig,
    *,
    backend: TrainBackend | None = None,
    progress: bool = True,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train the variant of ``cfg`` on ``cfg.data`` and evaluate it on the val split.

    ``on_log(step, metrics)`` (rank 0 only) is called every ``cfg.train.log_every`` micro-steps and
    at the last one with ``step`` (1-based micro-step) and the means over the steps since the
    previous call of ``task_loss``, ``gate_loss``, ``loss`` and ``kept_fraction`` (the kept share of
    the real SPA-block tokens of the batch, batch padding left out; 1 for the dense model).

    Deterministic from ``cfg.seed`` (and ``cfg.data.data_seed`` for the built-in set) on a given
    machine and thread count. Raises ``NonFiniteLossError`` if the loss is NaN/inf.

    Returns a flat dict: ``task_loss``, ``gate_loss`` (means over the last tenth of the steps), the
    ``MAP_KEYS`` (``map``, ``map_50``, ``map_75``, ``map_small``, ``map_medium``, ``map_large``),
    ``gate_precision``/``gate_recall``/``gate_f1``/``kept_fraction``/``label_fraction`` with ``*_std``
    (spread over val images) and ``kept_fraction_s{stage}b{index}`` per SPA block (dense: kept
    fraction 1, gate metrics NaN), ``steps`` (optimizer steps: ``train.epochs`` resolved),
    ``train_samples_per_s``, ``train_time_s``,
    ``eval_time_s``, ``num_params``, ``pretrained_missing`` and ``pretrained_sha256``
    (``harness.task.detector.pretrained_columns``)."""
    backend = backend or TorchBackend()
    seed_everything(cfg.seed)
    contracts.reset()  # value rules on this trial's first calls too (Ray reuses a worker's process)
    train_ds, val_ds = build_datasets(cfg.data, trial_seed=cfg.seed, progress=progress and backend.is_main)
    if train_ds.num_classes != cfg.head.num_classes:
        # More categories than outputs cannot be learnt; more outputs than categories would emit labels
        # that name no category of the set.
        raise ValueError(
            f"{train_ds.ann_file} has {train_ds.num_classes} categories but head.num_classes is "
            f"{cfg.head.num_classes}; set head.num_classes to {train_ds.num_classes}"
        )
    cfg = dataclasses.replace(cfg, train=resolve_schedule(cfg.train, len(train_ds), backend.world_size))
    model = build_detector(cfg)
    pretrained = pretrained_columns(model)
    num_params = sum(p.numel() for p in model.parameters())
    module = backend.setup(model, cfg)

    tc = cfg.train
    generator = torch.Generator().manual_seed(cfg.seed)
    order = backend.sampler(train_ds, True, cfg.seed)
    if order is None:
        order = torch.utils.data.RandomSampler(train_ds, generator=generator)
    sampler = AugmentedSampler(order, cfg.seed, backend.rank)
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=tc.batch_size,
        sampler=sampler,
        generator=generator,
        collate_fn=collate_fn(cfg),
        drop_last=len(train_ds) >= tc.batch_size,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
    )
    micro_steps = tc.steps * max(1, tc.grad_accum)
    tail = max(1, micro_steps // 10)
    history: list[tuple[float, float]] = []
    bar = _Progress(micro_steps, f"train {cfg.name}", progress and backend.is_main)
    model.train()
    samples = 0
    t0 = time.perf_counter()
    batches = _batches(loader)
    on_log = on_log if backend.is_main else None
    window: list[tuple[float, float, float, float]] = []  # (task, gate, loss, kept) since on_log's last call
    for step in range(micro_steps):
        images, targets = next(batches)
        images, targets = images.to(backend.device), to_device(targets, backend.device)
        with backend.autocast():
            out = module(images, targets, image_sizes(images, targets))
        loss = out["loss"]
        task, gate, total = (
            float(out["task_loss"].detach()),
            float(out["gate_loss"].detach()),
            float(loss.detach()),
        )
        if not math.isfinite(total):
            parts = {k: round(float(v), 4) for k, v in out.get("loss_parts", {}).items()}
            raise NonFiniteLossError(
                f"trial {cfg.name!r}: non-finite loss at step {step + 1}/{micro_steps}: "
                f"task_loss={task}, gate_loss={gate}, parts={parts}"
            )
        backend.backward(loss)
        backend.step()
        samples += images.shape[0]
        history.append((task, gate))
        logged_step = (step + 1) % max(1, tc.log_every) == 0 or step + 1 == micro_steps
        if on_log is not None:
            window.append((task, gate, total, _kept_fraction(out["backbone"].blocks)))
            if logged_step:
                means = np.array(window, dtype=np.float64).mean(0)
                on_log(
                    step + 1,
                    dict(zip(("task_loss", "gate_loss", "loss", "kept_fraction"), map(float, means))),
                )
                window.clear()
        if bar.enabled and logged_step:
            bar.update(step + 1, f"task {task:.3f} gate {gate:.4f}")
    train_time = time.perf_counter() - t0
    bar.close()

    recent = np.array(history[-tail:], dtype=np.float64).reshape(-1, 2)
    metrics: dict[str, Any] = {
        "task_loss": float(backend.all_reduce_mean(float(recent[:, 0].mean()))) if len(recent) else math.nan,
        "gate_loss": float(backend.all_reduce_mean(float(recent[:, 1].mean()))) if len(recent) else math.nan,
    }
    t1 = time.perf_counter()
    metrics.update(evaluate_variant(module, val_ds, cfg, backend=backend, progress=progress))
    metrics.update(
        steps=tc.steps,
        train_samples_per_s=samples * backend.world_size / train_time if train_time > 0 else math.nan,
        train_time_s=train_time,
        eval_time_s=time.perf_counter() - t1,
        num_params=num_params,
        **pretrained,
    )
    return metrics


def _kept_fraction(blocks: list[Any]) -> float:
    """Kept share of the real SPA-block tokens of a batch (``mask (B, N)`` per block, ``valid (B, N)``
    its real tokens: batch padding is neither kept nor dropped); 1 without blocks."""
    if not blocks:
        return 1.0
    kept = sum(int(b.mask.detach().sum()) for b in blocks)
    valid = [getattr(b, "valid", None) for b in blocks]
    real = sum(b.mask.numel() if v is None else int(v.sum()) for b, v in zip(blocks, valid))
    return kept / max(real, 1)


@torch.no_grad()
def evaluate_variant(
    module: Detector | Any,
    dataset: CocoDetection,
    cfg: TrialConfig,
    *,
    backend: TrainBackend | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """COCO mAP and gate metrics of ``module`` (a ``Detector`` or the backend's wrapper of one) on
    ``dataset`` (the first ``cfg.train.eval_images`` images, or all).

    Every rank evaluates the same images (so a ZeRO-3 engine's collective forward stays in step);
    the numbers are identical on every rank."""
    backend = backend or TorchBackend()
    was_training = getattr(module, "training", False)
    module.eval()
    n = len(dataset) if cfg.train.eval_images is None else min(len(dataset), cfg.train.eval_images)
    subset = torch.utils.data.Subset(dataset, range(n))
    # The generator seeds the workers (the loader would draw that seed from the global RNG otherwise).
    loader = torch.utils.data.DataLoader(
        subset,
        batch_size=cfg.train.batch_size,
        shuffle=False,
        collate_fn=collate_fn(cfg),
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    detections: list[dict[str, Any]] = []
    gate = GateMeter()
    has_blocks = False
    image_ids = []
    bar = _Progress(n, f"eval {cfg.name}", progress and backend.is_main)
    done = 0
    for images, targets in loader:
        images, targets = images.to(backend.device), to_device(targets, backend.device)
        with backend.autocast():
            out = module(images, targets, image_sizes(images, targets))
        detections += to_coco_detections(out["detections"], targets, dataset.label_to_cat)
        image_ids += [t["image_id"] for t in targets]
        blocks = out["backbone"].blocks
        has_blocks = has_blocks or bool(blocks)
        gate.update(blocks, out.get("selection_labels"))
        done += images.shape[0]
        bar.update(done, "")
    bar.close()
    if was_training:
        module.train()
    metrics = coco_map(dataset.coco_gt(), detections, image_ids)
    if has_blocks:
        metrics.update(gate.summary())
    else:  # the dense baseline keeps every token and has no gate
        metrics.update({k: math.nan for k in ("gate_precision", "gate_recall", "gate_f1", "label_fraction")})
        metrics.update(
            {f"{k}_std": math.nan for k in ("gate_precision", "gate_recall", "gate_f1", "label_fraction")}
        )
        metrics.update(kept_fraction=1.0, kept_fraction_std=0.0)
    metrics["eval_images"] = n
    return metrics


class _Progress:
    """A rich progress bar when enabled, silent otherwise."""

    def __init__(self, total: int, description: str, enabled: bool) -> None:
        self.enabled = enabled
        self._p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"),
                transient=True,
            )
            self._task = self._p.add_task(description, total=total, info="")
            self._p.start()

    def update(self, completed: int, info: str) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=completed, info=info)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None
