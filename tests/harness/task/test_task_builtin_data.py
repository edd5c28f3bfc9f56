"""harness/task/builtin_data.py: the built-in set is deterministic, cached, atomic and loads strictly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from harness.config import DataConfig
from harness.task import builtin_data
from harness.task.builtin_data import builtin_dataset
from harness.task.coco import CocoDetection


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _small(tmp: Path, seed: int = 0) -> DataConfig:
    return DataConfig(cache_dir=str(tmp), num_train=6, num_val=3, data_seed=seed)


def test_builtin_same_seed_same_bytes(tmp_path):
    a = builtin_dataset(_small(tmp_path / "a"), progress=False)
    b = builtin_dataset(_small(tmp_path / "b"), progress=False)
    assert a.name == b.name  # the folder is named by the content hash of the parameters
    da, db = _digest(a), _digest(b)
    assert len(da) == 6 + 3 + 3  # PNGs, two JSONs, params.json
    assert da == db
    c = builtin_dataset(_small(tmp_path / "c", seed=1), progress=False)
    assert (
        c.name != a.name
        and _digest(c)["annotations/instances_train.json"] != da["annotations/instances_train.json"]
    )


def test_builtin_is_reused_and_well_formed(tmp_path):
    cfg = _small(tmp_path)
    root = builtin_dataset(cfg, progress=False)
    stamp = (root / "train" / "000000.png").stat().st_mtime_ns
    assert builtin_dataset(cfg, progress=False) == root
    assert (root / "train" / "000000.png").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temp folder left behind
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
    for img in coco["images"]:
        assert 64 <= img["width"] <= 224 and 64 <= img["height"] <= 224
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=7)[1:]
    assert per_image.min() >= 1 and per_image.max() <= 6
    ds = CocoDetection(
        root / "train", root / "annotations" / "instances_train.json", 128
    )  # strict: no bad box
    assert len(ds) == 6 and ds.num_classes == 10


def test_builtin_crash_leaves_no_half_set(tmp_path, monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return original(*args, **kwargs)

    original = builtin_data._compose
    monkeypatch.setattr(builtin_data, "_compose", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        builtin_dataset(_small(tmp_path), progress=False)
    assert list(tmp_path.iterdir()) == []
