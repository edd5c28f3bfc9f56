"""The task's datasets: which source a trial reads (the built-in set or a COCO set on disk) and how
its images are batched.

``build_datasets(cfg.data)`` gives ``(train, val)`` ``CocoDetection`` sets (``harness.task.coco``) of
the built-in set (``harness.task.builtin_data``, generated and cached) or of ``cfg.root``, with the
transforms of ``cfg`` (``harness.task.transforms``: train augments, val does not); ``collate`` and
``fixed_batch`` make batches of them (padded to the batch's largest image, rounded up to
``size_divisor(cfg)``), ``image_sizes`` says which part of a batch is real, ``selection_labels`` gives
SPA's labels of a batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from harness.config import DataConfig, TrialConfig
from harness.task.builtin_data import builtin_dataset
from harness.task.coco import CocoDetection, DatasetError
from harness.task.transforms import DetectionTransform
from spa_core import selection_labels_from_boxes

__all__ = [
    "build_datasets",
    "build_transforms",
    "collate",
    "collate_fn",
    "fixed_batch",
    "image_sizes",
    "selection_labels",
    "size_divisor",
]

Batch = tuple[torch.Tensor, list[dict[str, Any]]]


def size_divisor(cfg: TrialConfig) -> int:
    """What a batch's height and width are rounded up to: ``data.size_divisor``, or for ``keep_ratio``
    the backbone's total stride (``patch_size * 2**3``: every stage map of the batch is then whole), for
    ``square`` 1 (every image is already the same square). The windows need no multiple: a block pads
    its own map to the window."""
    if cfg.data.size_divisor is not None:
        return cfg.data.size_divisor
    return cfg.model.patch_size * 2**3 if cfg.data.resize == "keep_ratio" else 1


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]], size_divisor: int = 1) -> Batch:
    """``[(image (3, h_i, w_i), target)] -> (images (B, 3, H, W), [target])``: ``H, W`` the largest
    ``h_i, w_i`` rounded up to ``size_divisor``, each image at the top left and zeros (the normalised
    mean) elsewhere; ``target["image_size"]`` (set by the dataset) is each image's real (h, w)."""
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
    H = max(b[0].shape[1] for b in batch)
    W = max(b[0].shape[2] for b in batch)
    H, W = -(-H // size_divisor) * size_divisor, -(-W // size_divisor) * size_divisor
    images = torch.stack([F.pad(b[0], (0, W - b[0].shape[2], 0, H - b[0].shape[1])) for b in batch])
    return images, [b[1] for b in batch]


def collate_fn(cfg: TrialConfig) -> Callable[[list], Batch]:
    """``collate`` with the trial's ``size_divisor`` (a picklable callable, for loader workers)."""
    return functools.partial(collate, size_divisor=size_divisor(cfg))


def image_sizes(images: torch.Tensor, targets: list[dict[str, Any]]) -> torch.Tensor | None:
    """images (B, 3, H, W), their targets -> ``(B, 2)`` int64 real (height, width) of each image (the
    rest is batch padding, at the bottom/right), on the images' device; None when no image of the
    batch is padded (every ``square`` batch), so the model runs as without padding."""
    sizes = [tuple(t.get("image_size", images.shape[-2:])) for t in targets]
    if all(s == tuple(images.shape[-2:]) for s in sizes):
        return None
    return torch.tensor(sizes, dtype=torch.int64, device=images.device)


def selection_labels(
    targets: list[dict[str, Any]],
    image_hw: tuple[int, int],
    grids: list[tuple[int, int]],
    coverage: float | None = None,
) -> dict[tuple[int, int], torch.Tensor]:
    """SPA selection labels of a batch, ``{(H, W): (B, H, W) float}``, at the grids the model asks for
    (``backbone.label_grids(image_hw)``), through ``spa_core.selection_labels_from_boxes``. Batch
    padding holds no box, so its labels are 0: negatives that the gate loss and the gate metrics leave
    out (they read each SPA block's ``valid``), never dropped tokens."""
    return selection_labels_from_boxes([t["boxes"] for t in targets], image_hw, grids, coverage=coverage)


def build_transforms(cfg: DataConfig) -> tuple[DetectionTransform, DetectionTransform]:
    """``(train, val)`` transforms of ``cfg``: train with the augmentation keys, val without."""
    scale = (int(cfg.scale[0]), int(cfg.scale[1]))
    train = DetectionTransform(
        resize=cfg.resize,
        image_size=cfg.image_size,
        scale=scale,
        train_short_sides=tuple(cfg.train_short_sides),
        flip=cfg.flip,
        crop_prob=cfg.crop_prob,
    )
    return train, DetectionTransform(resize=cfg.resize, image_size=cfg.image_size, scale=scale)


def build_datasets(
    cfg: DataConfig, *, trial_seed: int | None = None, progress: bool = True
) -> tuple[CocoDetection, CocoDetection]:
    """``(train, val)`` for ``cfg.dataset``: ``builtin`` (generated, cached; ``trial_seed`` seeds it
    with ``cfg.seed_with_trial``) or ``coco`` (``cfg.root``), with ``build_transforms(cfg)``."""
    if cfg.dataset == "builtin":
        root = builtin_dataset(cfg, trial_seed=trial_seed, progress=progress)
    elif cfg.dataset == "coco":
        if not cfg.root:
            raise DatasetError("data.dataset is 'coco' but data.root is not set")
        root = Path(cfg.root).expanduser()
    else:
        raise DatasetError(f"unknown data.dataset {cfg.dataset!r}; expected 'builtin' or 'coco'")
    train_tf, val_tf = build_transforms(cfg)
    train = CocoDetection(
        root / cfg.train_images,
        root / cfg.train_ann,
        cfg.image_size,
        cfg.skip_bad_annotations,
        transform=train_tf,
    )
    val = CocoDetection(
        root / cfg.val_images, root / cfg.val_ann, cfg.image_size, cfg.skip_bad_annotations, transform=val_tf
    )
    if train.label_to_cat != val.label_to_cat:
        raise DatasetError(f"{train.ann_file} and {val.ann_file} have different category ids")
    return train, val


def fixed_batch(dataset: CocoDetection, batch_size: int, size_divisor: int = 1) -> Batch:
    """The first ``batch_size`` images of ``dataset`` (cycled if it is smaller; never augmented): the
    fixed batch that benchmarks time and count FLOPs on, the same for every variant."""
    if len(dataset) == 0:
        raise DatasetError(f"{dataset.ann_file}: no images to build a batch from")
    return collate([dataset[i % len(dataset)] for i in range(batch_size)], size_divisor)
