"""harness/task/train.py: train_variant end to end.

The slow tests are the issue's evidence on the built-in set (CPU, a few minutes): the dense
baseline's AP50 far above a random-box baseline, and a label-supervised gate whose recall of
labelled tokens is far above chance at its kept fraction, with the ``random`` policy at that
fraction as the control and the kept fraction without supervision reported.
"""

from __future__ import annotations

import math

import pytest
import torch

from harness.config import trial_from_dict
from harness.task import detector as task_detector
from harness.task.data import build_datasets
from harness.task.evaluate import MAP_KEYS, coco_map, random_detections
from harness.task.train import NonFiniteLossError, train_variant


def _cfg(cache, **over):
    base = {"preset": "micro", "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1},
            "data": {"num_train": 16, "num_val": 8, "image_size": 64, "cache_dir": str(cache)}}
    for k, v in over.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return trial_from_dict(base)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("task-cache")


def test_train_variant_returns_flat_metrics_deterministically(cache):
    cfg = _cfg(cache)
    a = train_variant(cfg, progress=False)
    for key in ("task_loss", "gate_loss", *MAP_KEYS, "gate_precision", "gate_recall", "gate_f1",
                "gate_recall_std", "kept_fraction", "kept_fraction_std", "steps", "train_samples_per_s",
                "train_time_s", "eval_time_s"):
        assert key in a, key
    assert all(isinstance(v, int | float) for v in a.values())
    assert a["steps"] == 2 and any(k.startswith("kept_fraction_s3b") for k in a)
    b = train_variant(cfg, progress=False)
    for key in ("task_loss", "gate_loss", "map", "gate_recall", "kept_fraction"):
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key
    dense = train_variant(_cfg(cache, model={"variant": "dense"}), progress=False)
    assert dense["kept_fraction"] == 1.0 and math.isnan(dense["gate_recall"]) and dense["gate_loss"] == 0.0


def test_nan_loss_raises(cache, monkeypatch):
    real = task_detector.fcos_loss

    def poisoned(*args, **kwargs):
        parts = real(*args, **kwargs)
        parts["cls"] = parts["cls"] * math.nan
        return parts

    monkeypatch.setattr(task_detector, "fcos_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 1/2"):
        train_variant(_cfg(cache), progress=False)
