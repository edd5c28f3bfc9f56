"""Fixtures of the task tests: a handmade two-image COCO set on disk."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _write_coco(
    root: Path, images: list[dict], annotations: list[dict], categories: list[dict] | None = None
) -> Path:
    """Write ``images`` (each with an ``array`` (H, W, 3) uint8 to save, unless ``array`` is None) and
    the instances JSON under ``root``; returns the JSON path."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for img in images:
        arr = img.get("array")
        if arr is not None:
            Image.fromarray(arr).save(root / "images" / img["file_name"])
        entries.append({k: v for k, v in img.items() if k != "array"})
    categories = categories or [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
    ann = root / "instances.json"
    ann.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return ann


@pytest.fixture
def write_coco():
    """``write_coco(root, images, annotations, categories=None) -> ann_file`` (see ``_write_coco``)."""
    return _write_coco


@pytest.fixture
def two_image_coco(tmp_path: Path) -> tuple[Path, Path]:
    """Two images (40x20 and 30x60, w x h), categories 3 and 7 (non-contiguous ids), three boxes and
    one crowd region. Returns ``(images_dir, ann_file)``."""
    rng = np.random.default_rng(0)
    images = [
        {
            "id": 11,
            "file_name": "a.png",
            "width": 40,
            "height": 20,
            "array": rng.integers(0, 255, (20, 40, 3), dtype=np.uint8),
        },
        {
            "id": 12,
            "file_name": "b.png",
            "width": 30,
            "height": 60,
            "array": rng.integers(0, 255, (60, 30, 3), dtype=np.uint8),
        },
    ]
    anns = [
        {"id": 1, "image_id": 11, "category_id": 7, "bbox": [4, 2, 10, 6], "area": 60, "iscrowd": 0},
        {"id": 2, "image_id": 11, "category_id": 3, "bbox": [20, 10, 20, 10], "area": 200, "iscrowd": 0},
        {"id": 3, "image_id": 12, "category_id": 3, "bbox": [0, 30, 15, 30], "area": 450, "iscrowd": 0},
        {"id": 4, "image_id": 12, "category_id": 7, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 1},
    ]
    ann = _write_coco(tmp_path, images, anns)
    return tmp_path / "images", ann
