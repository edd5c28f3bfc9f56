"""harness/task/evaluate.py: COCO mAP through pycocotools and the gate metrics."""

from __future__ import annotations

import contextlib
import io
import math
from types import SimpleNamespace

import pytest
import torch

from harness.task.coco import CocoDetection
from harness.task.evaluate import (
    MAP_KEYS,
    GateMeter,
    coco_map,
    ground_truth_detections,
    random_detections,
    to_coco_detections,
)


@pytest.fixture
def ds(two_image_coco):
    return CocoDetection(*two_image_coco, image_size=80)


def test_ground_truth_scores_one_and_shifted_boxes_less(ds):
    gt = ds.coco_gt()
    perfect = coco_map(gt, ground_truth_detections(gt))
    assert list(perfect) == list(MAP_KEYS)
    # boxes: 60 and 200 px^2 (small), 450 px^2 (small); no medium or large ground truth -> NaN
    assert perfect["map"] == pytest.approx(1.0) and perfect["map_50"] == pytest.approx(1.0)
    assert perfect["map_small"] == pytest.approx(1.0)
    assert math.isnan(perfect["map_medium"]) and math.isnan(perfect["map_large"])
    shifted = coco_map(gt, ground_truth_detections(gt, shift=0.3))  # IoU 0.54: counts at 0.5, not at 0.75
    assert shifted["map"] < 1.0 and shifted["map_50"] == pytest.approx(1.0) and shifted["map_75"] == 0.0
    far = coco_map(gt, ground_truth_detections(gt, shift=1.5))
    assert far["map"] == 0.0


def test_empty_detections_and_random_baseline(ds):
    gt = ds.coco_gt()
    empty = coco_map(gt, [])
    assert empty["map"] == 0.0 and empty["map_50"] == 0.0 and math.isnan(empty["map_large"])
    rnd = coco_map(gt, random_detections(gt, per_image=10, seed=0))
    assert rnd["map_50"] < 0.5


def test_detections_round_trip_to_original_pixels(ds):
    """Targets of the resized images, given back as detections, land on the original boxes."""
    dets, targets = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        targets.append(t)
        dets.append({"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]})
    results = to_coco_detections(dets, targets, ds.label_to_cat)
    assert {(r["image_id"], r["category_id"]) for r in results} == {(11, 7), (11, 3), (12, 3)}
    first = next(r for r in results if r["image_id"] == 11 and r["category_id"] == 7)
    assert first["bbox"] == pytest.approx([4, 2, 10, 6])
    assert coco_map(ds.coco_gt(), results)["map"] == pytest.approx(1.0)


def _block(stage, index, mask):
    mask = torch.tensor(mask, dtype=torch.bool)
    return SimpleNamespace(
        stage=stage, index=index, mask=mask.reshape(mask.shape[0], -1), grid=tuple(mask.shape[1:])
    )


def test_gate_meter_counts():
    # image 0: 2x2 grid, labels [1,1,0,0]; keeps [1,0,1,0] -> tp 1, sel 2, pos 2.
    # image 1: labels none; keeps nothing -> precision and recall undefined, kept 0.
    labels = {(2, 2): torch.tensor([[[1.0, 1], [0, 0]], [[0, 0], [0, 0]]])}
    blk = _block(3, 0, [[[1, 0], [1, 0]], [[0, 0], [0, 0]]])
    meter = GateMeter()
    meter.update([blk], labels)
    s = meter.summary()
    assert s["gate_precision"] == pytest.approx(0.5) and s["gate_recall"] == pytest.approx(0.5)
    assert s["gate_f1"] == pytest.approx(0.5)  # image 1 has neither: left out
    assert s["kept_fraction"] == pytest.approx(0.25) and s["kept_fraction_std"] == pytest.approx(0.25)
    assert s["kept_fraction_s3b0"] == pytest.approx(0.25)
    assert s["label_fraction"] == pytest.approx(0.25)
    # a second block at another grid pools into the same per-image counts
    labels[(1, 1)] = torch.tensor([[[1.0]], [[0.0]]])
    meter = GateMeter()
    meter.update([blk, _block(4, 0, [[[1]], [[1]]])], labels)
    s = meter.summary()
    assert s["gate_recall"] == pytest.approx(2 / 3)  # image 0: tp 2 of pos 3
    assert s["gate_precision"] == pytest.approx((2 / 3 + 0.0) / 2)  # image 1 keeps 1 unlabelled token
    assert s["kept_fraction_s4b0"] == pytest.approx(1.0)


def test_input_that_would_score_silently_wrong_is_refused(ds):
    gt = ds.coco_gt()
    good = ground_truth_detections(gt)
    for bad in ({"image_id": 999}, {"category_id": 999}, {"score": math.nan}, {"bbox": [0, 0, math.inf, 1]}):
        with pytest.raises(ValueError, match="detection .* (lacks|non-finite)"):
            coco_map(gt, good[:1] + [{**good[1], **bad}])
    from pycocotools.coco import COCO

    raw = COCO()
    raw.dataset = {
        **gt.dataset,
        "annotations": [*gt.dataset["annotations"], dict(gt.dataset["annotations"][0])],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        raw.createIndex()
    with pytest.raises(ValueError, match=r"ground truth annotation ids repeat \(1\)"):
        coco_map(raw, good)
