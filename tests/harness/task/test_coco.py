"""harness/task/coco.py: a COCO set loads into the right targets, and every rule of the format is
checked: an error naming the file and the id, or with ``skip_bad`` a skip counted by reason; a
degenerate box (real COCO has two) is dropped and counted; a file is parsed once per process and
kept as arrays."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from harness.task.coco import CocoDetection, DatasetError
from harness.task.data import build_datasets, collate, fixed_batch
from harness.task.evaluate import coco_map, ground_truth_detections


def _img(i=11, name="a.png", w=40, h=20, array=True):
    return {
        "id": i,
        "file_name": name,
        "width": w,
        "height": h,
        "array": np.zeros((h, w, 3), np.uint8) if array else None,
    }


def _anns(**changes):
    base = [
        {"id": 1, "image_id": 11, "category_id": 3, "bbox": [1, 1, 5, 5]},
        {"id": 2, "image_id": 11, "category_id": 7, "bbox": [2, 2, 4, 4]},
    ]
    base[1].update(changes)
    return base


def test_two_image_coco_loads_boxes_and_labels(two_image_coco):
    images_dir, ann = two_image_coco
    ds = CocoDetection(images_dir, ann, image_size=80)
    assert len(ds) == 2 and ds.label_to_cat == [3, 7] and ds.num_classes == 2 and not ds.skipped
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


# One bad second annotation per rule: (the change, the words the error carries).
BAD_ANNOTATION = {
    "box_outside_image": (dict(bbox=[30, 2, 20, 5]), "lies outside its image a.png (40x20)"),
    "malformed_box": (dict(bbox=[2, 2, "w", 5]), "is not 4 finite numbers"),
    "unknown_category": (dict(category_id=99), "category_id 99 is not in 'categories'"),
    "unknown_image": (dict(image_id=555), "image_id 555 is not in 'images'"),
    "bad_area": (dict(area="16"), "area '16' is not a finite non-negative number"),
    "bad_iscrowd": (dict(iscrowd=True), "iscrowd True is not the integer 0 or 1"),
}
NON_FINITE_BOXES = [[2, 2, math.inf, 5], [math.nan, 2, 4, 4]]


@pytest.mark.parametrize("reason", sorted(BAD_ANNOTATION))
def test_bad_annotation_raises_or_is_skipped(tmp_path, write_coco, reason, caplog):
    change, words = BAD_ANNOTATION[reason]
    ann = write_coco(tmp_path, [_img()], _anns(**change))
    with pytest.raises(DatasetError) as err:
        CocoDetection(tmp_path / "images", ann, 40)
    msg = str(err.value)
    assert msg.startswith(f"{ann}: annotation id 2: ") and words in msg and "skip_bad_annotations" in msg
    with caplog.at_level(logging.WARNING, logger="harness.task.coco"):
        ds = CocoDetection(tmp_path / "images", ann, 40, skip_bad=True)
    assert ds.skipped == {reason: 1}
    assert f"{ann}: skipped 1 {reason}" in caplog.text  # the counts in one log line
    assert ds[0][1]["labels"].tolist() == [0]  # the good box is kept ...
    assert ds.coco_gt().getAnnIds() == [1]  # ... and is all that evaluation compares against


@pytest.mark.parametrize("bbox", NON_FINITE_BOXES, ids=["inf", "nan"])
def test_non_finite_boxes_are_refused(tmp_path, write_coco, bbox):
    ann = tmp_path / "instances.json"
    write_coco(tmp_path, [_img()], [])
    data = json.loads(ann.read_text())
    data["annotations"] = _anns(bbox=bbox)
    ann.write_text(json.dumps(data))  # Python's json writes Infinity / NaN, as some tools do
    with pytest.raises(DatasetError, match="annotation id 2: bbox .* is not 4 finite numbers"):
        CocoDetection(tmp_path / "images", ann, 40)


def test_duplicate_annotation_ids_are_refused_not_half_scored(tmp_path, write_coco):
    """The reported case: annotation ids repeat across images. pycocotools indexes annotations by
    id, so exact detections of every object score far below 1; the loader refuses the file, and the
    same file with unique ids scores them at exactly 1."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [_img(1, "a.png", 100, 100), _img(2, "b.png", 100, 100)]
    cats = [{"id": 1, "name": "x"}]
    boxes = [(1, [10, 10, 30, 30]), (1, [50, 10, 30, 40]), (2, [50, 50, 30, 30]), (2, [10, 50, 20, 30])]
    anns = [
        {
            "id": [1, 2, 1, 3][i],
            "image_id": img,
            "category_id": 1,
            "bbox": b,
            "area": b[2] * b[3],
            "iscrowd": 0,
        }
        for i, (img, b) in enumerate(boxes)
    ]
    ann = write_coco(tmp_path, images, anns, cats)
    exact = [{"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0} for a in anns]
    with contextlib.redirect_stdout(io.StringIO()):
        raw = COCO(str(ann))
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(raw, raw.loadRes([dict(d) for d in exact]), iouType="bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] < 0.9  # what pycocotools makes of the raw file: a silent wrong number
    with pytest.raises(ValueError, match="annotation ids repeat"):
        coco_map(raw, exact)  # which coco_map refuses

    with pytest.raises(
        DatasetError, match=r"instances.json: annotation id 1 appears 2 times in 'annotations'"
    ):
        CocoDetection(tmp_path / "images", ann, 64)
    ds = CocoDetection(tmp_path / "images", ann, 64, skip_bad=True)
    assert ds.skipped == {"duplicate_annotation_id": 2} and ds.coco_gt().getAnnIds() == [2, 3]

    for i, a in enumerate(anns):
        a["id"] = i + 1
    ann = write_coco(tmp_path, images, anns, cats)
    ds = CocoDetection(tmp_path / "images", ann, 64)
    gt = ds.coco_gt()
    assert coco_map(gt, exact)["map"] == pytest.approx(1.0)
    assert coco_map(gt, ground_truth_detections(gt))["map"] == pytest.approx(1.0)


def test_duplicate_image_ids_and_file_names(tmp_path, write_coco):
    anns = [
        {"id": 1, "image_id": 11, "category_id": 3, "bbox": [1, 1, 5, 5]},
        {"id": 2, "image_id": 12, "category_id": 3, "bbox": [1, 1, 5, 5]},
        {"id": 3, "image_id": 13, "category_id": 3, "bbox": [1, 1, 5, 5]},
    ]
    ann = write_coco(tmp_path, [_img(11, "a.png"), _img(11, "b.png"), _img(13, "c.png")], anns)
    with pytest.raises(DatasetError, match=r"instances.json: image id 11 appears 2 times in 'images'"):
        CocoDetection(tmp_path / "images", ann, 40)
    ds = CocoDetection(tmp_path / "images", ann, 40, skip_bad=True)
    assert ds.ids == [13] and ds.skipped == {
        "duplicate_image_id": 2,
        "annotation_of_skipped_image": 1,
        "unknown_image": 1,
    }

    ann = write_coco(tmp_path, [_img(11, "a.png"), _img(12, "a.png"), _img(13, "c.png")], anns)
    with pytest.raises(DatasetError, match=r"instances.json: file_name 'a.png' appears 2 times in 'images'"):
        CocoDetection(tmp_path / "images", ann, 40)
    ds = CocoDetection(tmp_path / "images", ann, 40, skip_bad=True)
    assert ds.ids == [13] and ds.skipped == {"duplicate_file_name": 2, "annotation_of_skipped_image": 2}
    assert [a["id"] for a in ds.coco_gt().dataset["annotations"]] == [3]


@pytest.mark.parametrize(
    "entry",
    [
        {"id": "11", "file_name": "a.png", "width": 40, "height": 20},
        {"id": 11, "file_name": "", "width": 40, "height": 20},
        {"id": 11, "file_name": "a.png", "width": 0, "height": 20},
        {"id": 11, "file_name": "a.png", "width": 40.5, "height": 20},
        {"id": 11, "file_name": "a.png", "width": 40},
        [11, "a.png"],
    ],
)
def test_malformed_image_entries(tmp_path, write_coco, entry):
    ann = write_coco(tmp_path, [_img()], [])
    data = json.loads(ann.read_text())
    data["images"].append(entry)
    ann.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"instances.json: image .* positive integer width/height"):
        CocoDetection(tmp_path / "images", ann, 40)
    ds = CocoDetection(tmp_path / "images", ann, 40, skip_bad=True)
    assert ds.skipped["malformed_image"] == 1


def test_categories_are_checked_whatever_skip_bad_says(tmp_path, write_coco):
    ann = write_coco(tmp_path, [_img()], [], [{"id": 3, "name": "a"}, {"id": 3, "name": "b"}])
    for skip in (False, True):
        with pytest.raises(DatasetError, match=r"instances.json: category id 3 appears twice"):
            CocoDetection(tmp_path / "images", ann, 40, skip_bad=skip)
    ann = write_coco(tmp_path, [_img()], [], [{"id": 3.0, "name": "a"}])
    with pytest.raises(DatasetError, match=r"category .* is not an object with an integer id"):
        CocoDetection(tmp_path / "images", ann, 40, skip_bad=True)


def test_annotation_without_an_integer_id(tmp_path, write_coco):
    anns = _anns()
    del anns[1]["id"]
    ann = write_coco(tmp_path, [_img()], anns)
    with pytest.raises(DatasetError, match=r"annotation .*: not an object with an integer id"):
        CocoDetection(tmp_path / "images", ann, 40)
    assert CocoDetection(tmp_path / "images", ann, 40, skip_bad=True).skipped == {"malformed_annotation": 1}


def test_missing_image(tmp_path, write_coco):
    imgs = [_img(), _img(12, "gone.png", array=False)]
    ann = write_coco(tmp_path, imgs, _anns(image_id=12))
    with pytest.raises(DatasetError, match="image id 12: file .*gone.png does not exist"):
        CocoDetection(tmp_path / "images", ann, 40)
    ds = CocoDetection(tmp_path / "images", ann, 40, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == {"missing_image": 1, "annotation_of_skipped_image": 1}


def test_malformed_json_and_wrong_image_size(tmp_path, write_coco):
    bad = tmp_path / "broken.json"
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match="broken.json: malformed JSON"):
        CocoDetection(tmp_path, bad, 40)
    with pytest.raises(DatasetError, match="missing or non-list 'annotations'"):
        bad.write_text('{"images": [], "categories": []}')
        CocoDetection(tmp_path, bad, 40)
    with pytest.raises(DatasetError, match="expected a JSON object"):
        bad.write_text("[]")
        CocoDetection(tmp_path, bad, 40)
    img = {**_img(), "width": 50}
    ann = write_coco(tmp_path, [img], _anns())
    ds = CocoDetection(tmp_path / "images", ann, 40)
    with pytest.raises(DatasetError, match=r"a.png: image is 40x20 but .* says 50x20"):
        ds[0]


def test_box_overhang_within_a_pixel_is_clipped_more_by_option(tmp_path, write_coco):
    ann = write_coco(tmp_path, [_img()], _anns(bbox=[30, 10, 10.5, 10.4]))
    _, t = CocoDetection(tmp_path / "images", ann, 40)[0]
    torch.testing.assert_close(t["boxes"][1], torch.tensor([30.0, 10, 40, 20]))
    ann = write_coco(tmp_path, [_img()], _anns(bbox=[30, 2, 20, 5]))
    ds = CocoDetection(tmp_path / "images", ann, 40, clip_boxes=True)
    torch.testing.assert_close(ds[0][1]["boxes"][1], torch.tensor([30.0, 2, 40, 7]))
    assert ds.coco_gt().loadAnns([2])[0]["bbox"] == [30.0, 2.0, 10.0, 5.0]  # evaluation sees the clipped box
    ann = write_coco(tmp_path, [_img()], _anns(bbox=[45, 2, 20, 5]))  # nothing of it inside
    with pytest.raises(DatasetError, match="does not overlap its image"):
        CocoDetection(tmp_path / "images", ann, 40, clip_boxes=True)


def test_files_without_annotations_load(tmp_path, write_coco):
    ann = write_coco(tmp_path, [_img(), _img(12, "b.png")], [])
    ds = CocoDetection(tmp_path / "images", ann, 40)
    assert len(ds) == 2 and ds[1][1]["boxes"].shape == (0, 4) and ds.coco_gt().getAnnIds() == []
    ann = write_coco(tmp_path, [_img(), _img(12, "b.png")], _anns()[:1])  # image 12 has none
    ds = CocoDetection(tmp_path / "images", ann, 40)
    assert ds[1][1]["labels"].tolist() == [] and not ds.skipped
    ann = write_coco(tmp_path, [], [])
    assert len(CocoDetection(tmp_path / "images", ann, 40)) == 0


def test_build_datasets_reads_a_coco_root(two_image_coco):
    from harness.config import DataConfig

    images_dir, ann = two_image_coco
    cfg = DataConfig(
        dataset="coco",
        root=str(images_dir.parent),
        train_images="images",
        train_ann=ann.name,
        val_images="images",
        val_ann=ann.name,
        image_size=40,
    )
    train, val = build_datasets(cfg)
    assert len(train) == len(val) == 2
    with pytest.raises(DatasetError, match="data.root is not set"):
        build_datasets(DataConfig(dataset="coco"))


@pytest.mark.parametrize("bbox", [[2, 2, 4, 0], [2, 2, 0, 5], [2, 2, 0, 0], [2, 2, -3, 4]])
def test_a_degenerate_box_is_dropped_and_counted_not_refused(tmp_path, write_coco, bbox, caplog):
    """COCO train2017's annotations 918 and 2206849 have a zero-height box: the set loads, as
    mmdetection's and torchvision's loaders load it, and the log says what was dropped."""
    ann = write_coco(tmp_path, [_img()], _anns(bbox=bbox))
    for skip_bad in (False, True):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="harness.task.coco"):
            ds = CocoDetection(tmp_path / "images", ann, 40, skip_bad=skip_bad)
        assert ds.dropped == {"degenerate_box": 1} and not ds.skipped
        assert (
            f"{ann}: dropped 1 annotation(s) with a zero or negative width or height (ids 2)" in caplog.text
        )
        assert ds[0][1]["labels"].tolist() == [0] and ds.coco_gt().getAnnIds() == [1]


def test_the_task_reports_the_dropped_boxes_in_its_metrics(tmp_path, write_coco):
    from harness.config import trial_from_dict
    from harness.task.train import train_variant

    imgs = [_img(11, "a.png", 64, 64), _img(12, "b.png", 64, 48)]
    anns = [
        {"id": 1, "image_id": 11, "category_id": 3, "bbox": [4, 4, 20, 20]},
        {"id": 918, "image_id": 11, "category_id": 7, "bbox": [30, 30, 12, 0]},
        {"id": 3, "image_id": 12, "category_id": 7, "bbox": [10, 10, 30, 20]},
    ]
    ann = write_coco(tmp_path, imgs, anns)
    cfg = trial_from_dict(
        {
            "preset": "micro",
            "head": {"num_classes": 2},
            "train": {"steps": 1, "batch_size": 2, "warmup_steps": 1},
            "data": {
                "dataset": "coco",
                "root": str(tmp_path),
                "train_images": "images",
                "train_ann": ann.name,
                "val_images": "images",
                "val_ann": ann.name,
                "image_size": 64,
            },
        }
    )
    metrics = train_variant(cfg, progress=False)
    assert metrics["train_boxes_dropped"] == 1 and metrics["val_boxes_dropped"] == 1
    assert math.isfinite(metrics["map"])


def test_a_file_is_parsed_once_per_process_and_again_when_it_changes(tmp_path, write_coco, monkeypatch):
    from harness.task import coco as coco_mod

    parses = []
    real = json.loads
    monkeypatch.setattr(coco_mod.json, "loads", lambda raw: parses.append(1) or real(raw))
    ann = write_coco(tmp_path, [_img()], _anns())
    a = CocoDetection(tmp_path / "images", ann, 40)
    b = CocoDetection(tmp_path / "images", ann, 64)  # another image size: the same index
    assert len(parses) == 1 and a.index is b.index and b[0][0].shape == (3, 64, 64)
    CocoDetection(tmp_path / "images", ann, 40, clip_boxes=True)  # other options: parsed again
    assert len(parses) == 2
    write_coco(tmp_path, [_img()], _anns(bbox=[2, 2, 5, 4]))  # same path, same size, other bytes
    c = CocoDetection(tmp_path / "images", ann, 40)
    assert len(parses) == 3 and c[0][1]["boxes"][1].tolist() == [2.0, 2.0, 7.0, 6.0]


def test_the_index_is_arrays_without_polygons(tmp_path, write_coco):
    """What loader workers fork: arrays, not an object per annotation, and no segmentation."""
    import pickle

    polygon = [[float(v) for v in range(2000)]]
    anns = [
        {"id": i + 1, "image_id": 11, "category_id": 3, "bbox": [1, 1, 5, 5], "segmentation": polygon}
        for i in range(50)
    ]
    ann = write_coco(tmp_path, [_img()], anns)
    ds = CocoDetection(tmp_path / "images", ann, 40)
    arrays = [v for v in vars(ds.index).values() if isinstance(v, np.ndarray)]
    assert len(arrays) == 10 and all(a.dtype != object for a in arrays)
    assert len(pickle.dumps(ds)) < ann.stat().st_size / 50
    assert "segmentation" not in ds.coco_gt().loadAnns([1])[0]
    assert len(ds[0][1]["boxes"]) == 50


# --- structural corruptions: each one still refuses the file, naming it (and the id it concerns) ---
def _valid_coco() -> dict:
    return {
        "images": [
            {"id": 11, "file_name": "a.png", "width": 40, "height": 20},
            {"id": 12, "file_name": "b.png", "width": 40, "height": 20},
        ],
        "annotations": [
            {"id": 1, "image_id": 11, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
            {"id": 2, "image_id": 12, "category_id": 7, "bbox": [2, 2, 4, 4], "area": 16, "iscrowd": 0},
            {"id": 3, "image_id": 12, "category_id": 3, "bbox": [9, 3, 6, 7], "area": 42, "iscrowd": 0},
        ],
        "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
    }


_NOT_AN_ID = st.one_of(
    st.none(), st.text(max_size=3), st.floats(allow_nan=False), st.booleans(), st.just([1])
)


@st.composite
def _corruption(draw):
    """``(data or text, words the error must carry)`` for one random structural corruption."""
    data = _valid_coco()
    kind = draw(
        st.sampled_from(
            [
                "truncate",
                "not_list",
                "drop_key",
                "bad_id",
                "duplicate_id",
                "unknown_ref",
                "bad_box",
                "bad_image",
            ]
        )
    )
    section = draw(st.sampled_from(["images", "annotations", "categories"]))
    entries = data[section]
    i = draw(st.integers(0, len(entries) - 1))
    what = {"images": "image", "annotations": "annotation", "categories": "category"}[section]
    if kind == "truncate":
        text = json.dumps(data)
        return text[: draw(st.integers(0, len(text.rstrip()) - 2))], "malformed JSON"
    if kind == "not_list":
        data[section] = draw(st.one_of(st.none(), st.just({}), st.integers(), st.text(max_size=4)))
        return data, f"missing or non-list {section!r}"
    if kind == "drop_key":
        if section == "annotations":
            key = draw(st.sampled_from(["id", "image_id", "category_id", "bbox"]))
        elif section == "images":
            key = draw(st.sampled_from(["id", "file_name", "width", "height"]))
        else:
            key = "id"
        ident = entries[i]["id"]
        del entries[i][key]
        return data, what if key == "id" else f"{what} id {ident}"
    if kind == "bad_id":
        entries[i]["id"] = draw(_NOT_AN_ID)
        return data, what
    if kind == "duplicate_id":
        j = (i + 1) % len(entries)
        entries[j]["id"] = entries[i]["id"]
        return data, f"{what} id {entries[i]['id']} appears"
    if kind == "unknown_ref":
        a = draw(st.integers(0, 2))
        key = draw(st.sampled_from(["image_id", "category_id"]))
        data["annotations"][a][key] = draw(st.one_of(st.integers(100, 10**9), _NOT_AN_ID))
        return data, f"annotation id {data['annotations'][a]['id']}: {key}"
    if kind == "bad_box":
        a = draw(st.integers(0, 2))
        data["annotations"][a]["bbox"] = draw(
            st.one_of(
                st.lists(st.floats(-5, 50), min_size=0, max_size=3),
                st.lists(st.floats(-5, 50), min_size=5, max_size=6),
                st.just([1, 1, "w", 4]),
                st.just([1, 1, None, 4]),
                st.just("1 1 4 4"),
                st.just([30, 1, 30, 4]),  # 20 px outside its 40 px wide image
            )
        )
        return data, f"annotation id {data['annotations'][a]['id']}: bbox"
    img = data["images"][draw(st.integers(0, 1))]
    img[draw(st.sampled_from(["width", "height"]))] = draw(
        st.one_of(st.integers(-5, 0), st.just(4.5), st.just("40"))
    )
    return data, f"image id {img['id']}"


@given(corruption=_corruption())
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_structural_corruption_is_refused_with_the_file_and_id(tmp_path, corruption):
    data, words = corruption
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        if not (images / name).exists():
            Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(images / name)
    ann = tmp_path / "instances.json"
    ann.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(DatasetError) as err:
        CocoDetection(images, ann, 40)
    assert str(err.value).startswith(f"{ann}: ") and words in str(err.value), (str(err.value), words)
