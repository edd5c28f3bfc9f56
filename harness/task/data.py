"""The task's datasets: which source a trial reads (the built-in set or a COCO set on disk) and how
its images are batched.

``build_datasets(cfg.data)`` gives ``(train, val)`` ``CocoDetection`` sets (``harness.task.coco``) of
the built-in set (``harness.task.builtin_data``, generated and cached) or of ``cfg.root``;
``collate`` and ``fixed_batch`` make batches of them, ``selection_labels`` SPA's labels of a batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from harness.config import DataConfig
from harness.task.builtin_data import builtin_dataset
from harness.task.coco import CocoDetection, DatasetError
from spa_core import selection_labels_from_boxes

__all__ = ["build_datasets", "collate", "fixed_batch", "selection_labels"]


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """``[(image, target)] -> (images (B, 3, S, S), [target])``."""
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch]


def selection_labels(
    targets: list[dict[str, Any]],
    image_hw: tuple[int, int],
    grids: list[tuple[int, int]],
    coverage: float | None = None,
) -> dict[tuple[int, int], torch.Tensor]:
    """SPA selection labels of a batch, ``{(H, W): (B, H, W) float}``, at the grids the model asks for
    (``backbone.label_grids(image_hw)``), through ``spa_core.selection_labels_from_boxes``."""
    return selection_labels_from_boxes([t["boxes"] for t in targets], image_hw, grids, coverage=coverage)


def build_datasets(
    cfg: DataConfig, *, trial_seed: int | None = None, progress: bool = True
) -> tuple[CocoDetection, CocoDetection]:
    """``(train, val)`` for ``cfg.dataset``: ``builtin`` (generated, cached; ``trial_seed`` seeds it
    with ``cfg.seed_with_trial``) or ``coco`` (``cfg.root``)."""
    if cfg.dataset == "builtin":
        root = builtin_dataset(cfg, trial_seed=trial_seed, progress=progress)
    elif cfg.dataset == "coco":
        if not cfg.root:
            raise DatasetError("data.dataset is 'coco' but data.root is not set")
        root = Path(cfg.root).expanduser()
    else:
        raise DatasetError(f"unknown data.dataset {cfg.dataset!r}; expected 'builtin' or 'coco'")
    train = CocoDetection(
        root / cfg.train_images, root / cfg.train_ann, cfg.image_size, cfg.skip_bad_annotations
    )
    val = CocoDetection(root / cfg.val_images, root / cfg.val_ann, cfg.image_size, cfg.skip_bad_annotations)
    if train.label_to_cat != val.label_to_cat:
        raise DatasetError(f"{train.ann_file} and {val.ann_file} have different category ids")
    return train, val


def fixed_batch(dataset: CocoDetection, batch_size: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The first ``batch_size`` images of ``dataset`` (cycled if it is smaller): the fixed batch that
    benchmarks time and count FLOPs on, the same for every variant."""
    if len(dataset) == 0:
        raise DatasetError(f"{dataset.ann_file}: no images to build a batch from")
    return collate([dataset[i % len(dataset)] for i in range(batch_size)])
