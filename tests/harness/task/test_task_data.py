"""harness/task/data.py: the built-in set (deterministic, cached, atomic) and the COCO loader."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.config import DataConfig
from harness.task import data as task_data
from harness.task.data import CocoDetection, DatasetError, builtin_dataset, collate, fixed_batch


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


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
    assert c.name != a.name and _digest(c)["annotations/instances_train.json"] != da["annotations/instances_train.json"]


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
    ds = CocoDetection(root / "train", root / "annotations" / "instances_train.json", 128)  # strict: no bad box
    assert len(ds) == 6 and ds.num_classes == 10


def test_builtin_crash_leaves_no_half_set(tmp_path, monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return original(*args, **kwargs)

    original = task_data._compose
    monkeypatch.setattr(task_data, "_compose", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        builtin_dataset(_small(tmp_path), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_two_image_coco_loads_boxes_and_labels(two_image_coco):
    images_dir, ann = two_image_coco
    ds = CocoDetection(images_dir, ann, image_size=80)
    assert len(ds) == 2 and ds.label_to_cat == [3, 7] and ds.num_classes == 2
    x, t = ds[0]  # 40x20 -> scale 2 -> 80x40, padded to 80x80
    assert x.shape == (3, 80, 80) and t["image_id"] == 11 and t["scale"] == 2.0 and t["orig_size"] == (20, 40)
    torch.testing.assert_close(t["boxes"], torch.tensor([[8.0, 4, 28, 16], [40, 20, 80, 40]]))
    assert t["labels"].tolist() == [1, 0] and t["labels"].dtype == torch.int64
    assert x[:, 40:].abs().max() == 0  # the padding
    x, t = ds[1]  # 30x60 -> scale 4/3 -> 40x80; the crowd region is not a target
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.0, 40, 20, 80]]))
    assert t["labels"].tolist() == [0]
    assert x[:, :, 40:].abs().max() == 0
    assert len(ds.coco_gt().getAnnIds(iscrowd=None)) == 4  # ...but stays in the evaluation ground truth
    images, targets = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 80, 80) and [t["image_id"] for t in targets] == [11, 12]
    images, targets = fixed_batch(ds, 3)
    assert images.shape[0] == 3 and [t["image_id"] for t in targets] == [11, 12, 11]


def _anns(**changes):
    base = [
        {"id": 1, "image_id": 11, "category_id": 3, "bbox": [1, 1, 5, 5]},
        {"id": 2, "image_id": 11, "category_id": 7, "bbox": [2, 2, 4, 4]},
    ]
    base[1].update(changes)
    return base


BAD = {
    "box_outside_image": dict(bbox=[30, 2, 20, 5]),
    "degenerate_box": dict(bbox=[2, 2, 0, 5]),
    "malformed_box": dict(bbox=[2, 2, "w", 5]),
    "unknown_category": dict(category_id=99),
    "unknown_image": dict(image_id=555),
}


@pytest.mark.parametrize("reason", sorted(BAD))
def test_bad_annotation_raises_or_is_skipped(tmp_path, write_coco, reason):
    img = {"id": 11, "file_name": "a.png", "width": 40, "height": 20, "array": np.zeros((20, 40, 3), np.uint8)}
    ann = write_coco(tmp_path, [img], _anns(**BAD[reason]))
    with pytest.raises(DatasetError) as err:
        CocoDetection(tmp_path / "images", ann, 40)
    assert str(ann) in str(err.value) and "annotation id 2" in str(err.value)
    with pytest.warns(UserWarning, match="skipped 1"):
        ds = CocoDetection(tmp_path / "images", ann, 40, skip_bad=True)
    assert ds.skipped == {reason: 1}
    assert ds[0][1]["labels"].tolist() == [0]  # the good box is kept


def test_missing_image(tmp_path, write_coco):
    imgs = [{"id": 11, "file_name": "a.png", "width": 40, "height": 20, "array": np.zeros((20, 40, 3), np.uint8)},
            {"id": 12, "file_name": "gone.png", "width": 40, "height": 20, "array": None}]
    anns = _anns(image_id=12)
    ann = write_coco(tmp_path, imgs, anns)
    with pytest.raises(DatasetError, match="gone.png"):
        CocoDetection(tmp_path / "images", ann, 40)
    with pytest.warns(UserWarning):
        ds = CocoDetection(tmp_path / "images", ann, 40, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == {"missing_image": 1, "annotation_of_missing_image": 1}


def test_malformed_json_and_wrong_image_size(tmp_path, write_coco):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match="broken.json: malformed JSON"):
        CocoDetection(tmp_path, bad, 40)
    with pytest.raises(DatasetError, match="missing or non-list 'annotations'"):
        bad.write_text('{"images": [], "categories": []}')
        CocoDetection(tmp_path, bad, 40)
    img = {"id": 11, "file_name": "a.png", "width": 50, "height": 20, "array": np.zeros((20, 40, 3), np.uint8)}
    ann = write_coco(tmp_path, [img], _anns())
    ds = CocoDetection(tmp_path / "images", ann, 40)
    with pytest.raises(DatasetError, match=r"a.png: image is 40x20 but .* says 50x20"):
        ds[0]


def test_box_overhang_within_a_pixel_is_clipped(tmp_path, write_coco):
    img = {"id": 11, "file_name": "a.png", "width": 40, "height": 20, "array": np.zeros((20, 40, 3), np.uint8)}
    ann = write_coco(tmp_path, [img], _anns(bbox=[30, 10, 10.5, 10.4]))
    _, t = CocoDetection(tmp_path / "images", ann, 40)[0]
    torch.testing.assert_close(t["boxes"][1], torch.tensor([30.0, 10, 40, 20]))
