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
from harness.task.checkpoint import Checkpointer, TrainState, capture_rng, restore_rng
from harness.task.coco import CocoDetection
from harness.task.data import build_datasets, collate_fn, image_sizes
from harness.task.detector import Detector, build_detector, pretrained_columns, rank_seed
from harness.task.evaluate import GateMeter, coco_map, to_coco_detections
from harness.task.optim import resolve_schedule
from harness.task.transforms import AugmentedSampler
from spa_core import contracts

__all__ = ["train_variant", "evaluate_variant", "NonFiniteLossError", "seed_everything", "to_device"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the message names the step and the loss parts."""


def seed_everything(seed: int, rank: int = 0) -> None:
    """Python's and torch's global RNGs from ``rank_seed(seed, rank)``: ``seed`` on rank 0, another
    stream on each other data-parallel rank (stochastic depth must differ between ranks)."""
    s = rank_seed(seed, rank)
    random.seed(s)
    torch.manual_seed(s)


def to_device(targets: list[dict[str, Any]], device: torch.device) -> list[dict[str, Any]]:
    return [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]


class _EpochBatches(torch.utils.data.Sampler[list[int]]):
    """The batches of ``sampler``'s epochs (``BatchSampler``), the first ``skip`` of the next epoch
    left out once: where a resumed run starts, without loading the batches it skips."""

    def __init__(self, sampler: torch.utils.data.Sampler, batch_size: int, drop_last: bool) -> None:
        self.sampler = sampler
        self.batches = torch.utils.data.BatchSampler(sampler, batch_size, drop_last)
        self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        it = iter(self.batches)
        for _ in range(self.skip):
            next(it, None)
        self.skip = 0
        yield from it

    def __len__(self) -> int:
        return len(self.batches)


def _batches(
    loader: torch.utils.data.DataLoader, batches: _EpochBatches, start: int = 0
) -> Iterator[tuple[torch.Tensor, list[dict[str, Any]]]]:
    """Batches from micro-step ``start`` on, epoch after epoch (``set_epoch`` before each)."""
    per_epoch = max(1, len(batches))
    epoch, batches.skip = divmod(start, per_epoch)
    while True:
        batches.set_epoch(epoch)
        yield from loader
        epoch += 1


def train_variant(
    cfg: TrialConfig,
    *,
    backend: TrainBackend | None = None,
    progress: bool = True,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    checkpoints: Checkpointer | None = None,
) -> dict[str, Any]:
    """Train the variant of ``cfg`` on ``cfg.data`` and evaluate it on the val split.

    ``checkpoints``: saves the training state every ``checkpoints.every`` optimizer steps and at the
    last one (``harness.task.checkpoint``); training resumes from the last checkpoint it holds, and
    gives the metrics the uninterrupted run gives.

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
    (``harness.task.detector.pretrained_columns``), ``train_boxes_dropped`` / ``val_boxes_dropped``
    (degenerate boxes the loader dropped), ``resumed_step`` (the optimizer step training resumed from;
    0 for a fresh start) and ``checkpoint_s`` (time spent saving checkpoints, not in ``train_time_s``)."""
    backend = backend or TorchBackend()
    seed_everything(cfg.seed, backend.rank)
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
    model = build_detector(cfg, rank=backend.rank)
    pretrained = pretrained_columns(model)
    num_params = sum(p.numel() for p in model.parameters())
    if backend.world_size > 1:
        # FCOS's positives over every rank's batch (a tensor in, a tensor out: no host sync)
        model.count_mean = lambda count: torch.as_tensor(backend.all_reduce_mean(count))
    module = backend.setup(model, cfg)

    tc = cfg.train
    order = backend.sampler(train_ds, True, cfg.seed)  # the same permutation on every rank, sharded
    if order is None:
        order = torch.utils.data.RandomSampler(train_ds, generator=torch.Generator().manual_seed(cfg.seed))
    sampler = AugmentedSampler(order, cfg.seed, backend.rank)  # each index with its augmentation key
    epoch_batches = _EpochBatches(sampler, tc.batch_size, drop_last=len(train_ds) >= tc.batch_size)
    # seeds the loader's workers (what a dataset draws beside the keyed augmentation): one stream per rank
    generator = torch.Generator().manual_seed(rank_seed(cfg.seed, backend.rank))
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_sampler=epoch_batches,
        generator=generator,
        collate_fn=collate_fn(cfg),
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
    )
    accum = max(1, tc.grad_accum)
    micro_steps = tc.steps * accum
    tail = max(1, micro_steps // 10)
    state = (checkpoints.restore(backend) if checkpoints is not None else None) or TrainState()
    resumed_step = state.micro_step // accum
    if state.rng:
        restore_rng(model, backend.device, state.rng)
    history, window = state.history, state.window  # window: (task, gate, loss, kept) since on_log's last call
    bar = _Progress(micro_steps, f"train {cfg.name}", progress and backend.is_main)
    model.train()
    t0 = time.perf_counter()
    batches = _batches(loader, epoch_batches, state.micro_step)
    on_log = on_log if backend.is_main else None
    for step in range(state.micro_step, micro_steps):
        images, targets = next(batches)
        images, targets = images.to(backend.device), to_device(targets, backend.device)
        with backend.autocast():
            out = module(images, targets, image_sizes(images, targets))
        loss = out["loss"]
        # The step's numbers in one read from the device (one host sync per step, not one per number);
        # float64 holds the float32 losses and the kept share exactly
        numbers = (out["task_loss"], out["gate_loss"], loss, _kept_fraction(out["backbone"].blocks, loss))
        task, gate, total, kept = torch.stack([n.detach().double() for n in numbers]).tolist()
        if not math.isfinite(total):
            parts = {k: round(float(v), 4) for k, v in out.get("loss_parts", {}).items()}
            raise NonFiniteLossError(
                f"trial {cfg.name!r}: non-finite loss at step {step + 1}/{micro_steps}: "
                f"task_loss={task}, gate_loss={gate}, parts={parts}"
            )
        backend.backward(loss)
        backend.step()
        state.samples += images.shape[0]
        history.append((task, gate))
        logged_step = (step + 1) % max(1, tc.log_every) == 0 or step + 1 == micro_steps
        if on_log is not None:
            window.append((task, gate, total, kept))
            if logged_step:
                means = np.array(window, dtype=np.float64).mean(0)
                on_log(
                    step + 1,
                    dict(zip(("task_loss", "gate_loss", "loss", "kept_fraction"), map(float, means))),
                )
                window.clear()
        if bar.enabled and logged_step:
            bar.update(step + 1, f"task {task:.3f} gate {gate:.4f}")
        if (
            checkpoints is not None
            and (step + 1) % accum == 0
            and checkpoints.due((step + 1) // accum, tc.steps)
        ):
            state.micro_step = step + 1
            state.train_time += time.perf_counter() - t0
            state.rng = capture_rng(model, backend.device)
            checkpoints.save(backend, (step + 1) // accum, state)
            t0 = time.perf_counter()  # saving is not training
    state.train_time += time.perf_counter() - t0
    train_time, samples = state.train_time, state.samples
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
        resumed_step=resumed_step,
        checkpoint_s=checkpoints.save_s if checkpoints is not None else 0.0,
        # degenerate boxes the loader dropped (harness.task.coco): real COCO train2017 has two
        train_boxes_dropped=sum(train_ds.dropped.values()),
        val_boxes_dropped=sum(val_ds.dropped.values()),
        **pretrained,
    )
    return metrics


def _kept_fraction(blocks: list[Any], like: torch.Tensor) -> torch.Tensor:
    """Kept share of the real SPA-block tokens of a batch (``mask (B, N)`` per block, ``valid (B, N)``
    its real tokens: batch padding is neither kept nor dropped), a float64 0-dim tensor on ``like``'s
    device (read with the step's other numbers); 1 without blocks."""
    if not blocks:
        return torch.ones((), dtype=torch.float64, device=like.device)
    kept = torch.stack([b.mask.detach().sum() for b in blocks]).sum().double()
    valid = [getattr(b, "valid", None) for b in blocks]
    unpadded = sum(b.mask.numel() for b, v in zip(blocks, valid) if v is None)  # every token is real
    padded = [v.detach().sum() for v in valid if v is not None]
    real = torch.stack(padded).sum().double() + unpadded if padded else torch.tensor(float(unpadded))
    return kept / real.to(kept.device).clamp(min=1)


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
    ``dataset`` (the first ``cfg.train.eval_images`` images, or all), in batches of
    ``cfg.train.batch_size``.

    Sharded over the data-parallel ranks: batch ``k`` (images ``k*b .. (k+1)*b - 1``) runs on rank
    ``k mod world``, so every batch holds the images a one-process evaluation gives it; rank 0
    gathers the detections and gate counts, puts them back in batch order, scores them once
    (COCOeval) and hands the numbers to every rank, which all return them. A policy that draws at
    inference (``random``) draws from its rank's stream, so only such a policy's numbers depend on
    the number of ranks. Under ZeRO-3, whose forward is collective, a rank with fewer batches runs
    its last one again (discarded) until every rank has run as many."""
    backend = backend or TorchBackend()
    rank, world = backend.rank, backend.world_size
    was_training = getattr(module, "training", False)
    module.eval()
    n = len(dataset) if cfg.train.eval_images is None else min(len(dataset), cfg.train.eval_images)
    bs = cfg.train.batch_size
    n_batches = math.ceil(n / bs)
    mine = list(range(rank, n_batches, world))  # this rank's batches, by global index
    indices = [i for k in mine for i in range(k * bs, min((k + 1) * bs, n))]
    # The generator seeds the workers (the loader would draw that seed from the global RNG otherwise).
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=bs,
        shuffle=False,
        collate_fn=collate_fn(cfg),
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    shard: list[tuple[int, list[dict[str, Any]], list[int], GateMeter, bool]] = []
    bar = _Progress(n, f"eval {cfg.name}", progress and backend.is_main)
    batch: tuple[torch.Tensor, list[dict[str, Any]]] | None = None
    for k, (images, targets) in zip(mine, loader):
        images, targets = images.to(backend.device), to_device(targets, backend.device)
        batch = (images, targets)
        with backend.autocast():
            out = module(images, targets, image_sizes(images, targets))
        gate = GateMeter()
        blocks = out["backbone"].blocks
        gate.update(blocks, out.get("selection_labels"))
        detections = to_coco_detections(out["detections"], targets, dataset.label_to_cat)
        shard.append((k, detections, [t["image_id"] for t in targets], gate, bool(blocks)))
        bar.update(min(n, (len(shard) * world) * bs), "")
    bar.close()
    if getattr(backend, "lockstep_forward", False):
        _lockstep(module, backend, batch, dataset, cfg, len(mine), math.ceil(n_batches / world))
    if was_training:
        module.train()
    parts = _gather_to_main(shard, backend)
    metrics: dict[str, float] | None = None
    if backend.is_main:
        parts.sort(key=lambda p: p[0])  # batch order: what one process would have seen
        detections = [d for p in parts for d in p[1]]
        image_ids = [i for p in parts for i in p[2]]
        metrics = coco_map(dataset.coco_gt(), detections, image_ids)
        if any(p[4] for p in parts):
            metrics.update(GateMeter.merged([p[3] for p in parts]).summary())
        else:  # the dense baseline keeps every token and has no gate
            keys = ("gate_precision", "gate_recall", "gate_f1", "label_fraction")
            metrics.update({k: math.nan for k in keys})
            metrics.update({f"{k}_std": math.nan for k in keys})
            metrics.update(kept_fraction=1.0, kept_fraction_std=0.0)
        metrics["eval_images"] = n
    return _from_main(metrics, backend)


def _lockstep(module, backend, batch, dataset, cfg: TrialConfig, done: int, needed: int) -> None:
    """Extra forwards (results discarded) until this rank has run ``needed``: a collective forward
    (ZeRO-3 gathers parameters in it) must run as often on every rank."""
    if done >= needed:
        return
    if batch is None:  # this rank had no batch of its own: any image will do
        images, targets = collate_fn(cfg)([dataset[0]])
        batch = images.to(backend.device), to_device(targets, backend.device)
    images, targets = batch
    for _ in range(needed - done):
        with backend.autocast():
            module(images, targets, image_sizes(images, targets))


def _gather_to_main(shard: list[Any], backend: TrainBackend) -> list[Any]:
    """Every rank's ``shard`` items, concatenated on rank 0 (the others get an empty list)."""
    if backend.world_size == 1:
        return list(shard)
    import torch.distributed as dist

    gathered: list[Any] | None = [None] * backend.world_size if backend.is_main else None
    dist.gather_object(shard, gathered, dst=0)
    return [item for part in gathered for item in part] if gathered is not None else []


def _from_main(value: Any, backend: TrainBackend) -> Any:
    """Rank 0's ``value`` on every rank."""
    if backend.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
