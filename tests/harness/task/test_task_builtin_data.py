"""harness/task/builtin_data.py: the built-in set is deterministic, versioned in its cache key, cached,
atomic and loads strictly; distractors are unlabelled, validation backgrounds are never seen in
training, and ``data.seed_with_trial`` gives every trial seed its own set."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from harness.config import DataConfig, config_hash, trial_from_dict
from harness.task import builtin_data
from harness.task.builtin_data import (
    DISTRACTOR_SHAPES,
    LABELLED_SHAPES,
    background_names,
    builtin_dataset,
    builtin_params,
)
from harness.task.coco import CocoDetection


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _small(tmp: Path, seed: int = 0, **kw) -> DataConfig:
    return DataConfig(cache_dir=str(tmp), num_train=6, num_val=3, data_seed=seed, **kw)


def _coco(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


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


def test_the_generators_version_is_in_the_cache_key(tmp_path, monkeypatch):
    """A changed generator bumps ``_BUILTIN_VERSION``: the set then lives in a new folder, never
    reusing a folder of the old generator's bytes."""
    cfg = _small(tmp_path)
    old = builtin_dataset(cfg, progress=False)
    assert builtin_params(cfg)["version"] == builtin_data._BUILTIN_VERSION
    monkeypatch.setattr(builtin_data, "_BUILTIN_VERSION", builtin_data._BUILTIN_VERSION + 1)
    new = builtin_dataset(cfg, progress=False)
    assert new != old and old.is_dir() and new.is_dir()


def test_a_prefix_of_a_larger_set_is_the_smaller_set(tmp_path):
    """Every image is drawn from its own generator (seed, split, index): the first images of a larger
    set are the smaller set's, so a test can check the default set's statistics on a prefix of it."""
    small = builtin_dataset(_small(tmp_path), progress=False)
    large = builtin_dataset(
        DataConfig(cache_dir=str(tmp_path), num_train=9, num_val=4, data_seed=0), progress=False
    )
    for split, n in (("train", 6), ("val", 3)):
        for i in range(n):
            name = f"{split}/{i:06d}.png"
            assert (small / name).read_bytes() == (large / name).read_bytes()
        small_anns = _coco(small, split)["annotations"]
        large_anns = [a for a in _coco(large, split)["annotations"] if a["image_id"] <= n]
        assert small_anns == large_anns


def test_seed_with_trial_gives_each_trial_seed_its_own_set(tmp_path):
    cfg = _small(tmp_path, seed_with_trial=True)
    a0 = builtin_dataset(cfg, trial_seed=0, progress=False)
    a1 = builtin_dataset(cfg, trial_seed=1, progress=False)
    assert a0 != a1 and _digest(a0) != _digest(a1)
    assert builtin_dataset(cfg, trial_seed=0, progress=False) == a0
    with pytest.raises(ValueError, match="seed_with_trial"):
        builtin_dataset(cfg, progress=False)
    fixed = _small(tmp_path)  # without the option the trial seed does not matter
    assert builtin_dataset(fixed, trial_seed=0, progress=False) == builtin_dataset(
        fixed, trial_seed=5, progress=False
    )


def test_builtin_is_reused_and_well_formed(tmp_path):
    cfg = _small(tmp_path)
    root = builtin_dataset(cfg, progress=False)
    stamp = (root / "train" / "000000.png").stat().st_mtime_ns
    assert builtin_dataset(cfg, progress=False) == root
    assert (root / "train" / "000000.png").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temp folder left behind
    coco = _coco(root, "train")
    assert [c["name"] for c in coco["categories"]] == list(LABELLED_SHAPES)
    for img in coco["images"]:
        assert img["width"] == img["height"] == builtin_data._CANVAS
    ds = CocoDetection(root / "train", root / "annotations" / "instances_train.json", 128)  # strict
    assert len(ds) == 6 and ds.num_classes == len(LABELLED_SHAPES)


def test_validation_backgrounds_are_never_seen_in_training(tmp_path):
    assert not set(background_names("train")) & set(background_names("val"))
    root = builtin_dataset(DataConfig(cache_dir=str(tmp_path), num_train=40, num_val=20), progress=False)
    for split in ("train", "val"):
        used = {img["background"] for img in _coco(root, split)["images"]}
        assert used <= set(background_names(split))
        assert len(used) > 1  # more than one photograph per split
    with pytest.raises(ValueError, match="unknown split"):
        background_names("test")


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_every_image_has_labelled_shapes_and_unlabelled_distractors(tmp_path_factory, seed):
    """Any seed: boxes lie inside the canvas and cover something drawn; labelled boxes are shapes of the
    labelled classes, distractors shapes of the others, and none is in the annotations; no two shapes
    overlap by more than ``_MAX_OVERLAP`` of the smaller box."""
    root = builtin_dataset(
        DataConfig(cache_dir=str(tmp_path_factory.mktemp("prop")), num_train=4, num_val=2, data_seed=seed),
        progress=False,
    )
    size = builtin_data._CANVAS
    for split in ("train", "val"):
        coco = _coco(root, split)
        cat_shape = {c["id"]: c["name"] for c in coco["categories"]}
        n_distractors = 0
        for img in coco["images"]:
            anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
            labelled = [(*a["bbox"], cat_shape[a["category_id"]]) for a in anns]
            distractors = [tuple(d) for d in img["distractors"]]
            n_distractors += len(distractors)
            assert all(d[4] in LABELLED_SHAPES for d in labelled)
            assert all(d[4] in DISTRACTOR_SHAPES for d in distractors)
            pixels = np.asarray(Image.open(root / split / img["file_name"]), dtype=np.int16)
            boxes = labelled + distractors
            for x, y, w, h, _ in boxes:
                assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= size and y + h <= size
                assert pixels[y : y + h, x : x + w].std() > 0  # something is drawn there
            for i, a in enumerate(boxes):
                for b in boxes[:i]:
                    assert builtin_data._overlap_xywh(a[:4], b[:4]) <= builtin_data._MAX_OVERLAP
        assert n_distractors > 0 or len(coco["images"]) < 3


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


def test_the_generators_version_is_part_of_a_builtin_trials_hash(monkeypatch):
    """Rows computed on an older built-in set are never reused as the current one's: the version is
    hashed for built-in trials, and a COCO trial's hash does not depend on it."""
    import harness.config as config

    builtin, coco = trial_from_dict({}), trial_from_dict({"data": {"dataset": "coco", "root": "/data/coco"}})
    before = config_hash(builtin), config_hash(coco)
    monkeypatch.setattr(config, "BUILTIN_DATA_VERSION", config.BUILTIN_DATA_VERSION + 1)
    assert config_hash(builtin) != before[0]
    assert config_hash(coco) == before[1]
