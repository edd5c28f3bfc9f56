"""harness/task/transforms.py and the batches data.py builds from it: Swin's detection pipeline
(keep-ratio resize, flip, multi-scale, crop), batch padding to the backbone's stride with each image's
real extent, and the per-sample augmentation stream (paired across variants, per rank, independent of
the number of loader workers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from harness.config import ConfigError, trial_from_dict
from harness.task.coco import CocoDetection
from harness.task.data import collate, collate_fn, image_sizes, size_divisor
from harness.task.transforms import (
    AugmentedSampler,
    DetectionTransform,
    augment_rng,
    crop_boxes,
    hflip_boxes,
    keep_ratio_size,
    resize_boxes,
)


@st.composite
def boxes_in(draw, max_side: int = 300):
    """(width, height, boxes (n, 4) float64 xyxy inside the image with positive area)."""
    w = draw(st.integers(2, max_side))
    h = draw(st.integers(2, max_side))
    n = draw(st.integers(0, 6))
    rows = []
    for _ in range(n):
        x1 = draw(st.floats(0, w - 1, allow_nan=False))
        y1 = draw(st.floats(0, h - 1, allow_nan=False))
        x2 = draw(st.floats(x1 + 0.5, w, allow_nan=False))
        y2 = draw(st.floats(y1 + 0.5, h, allow_nan=False))
        rows.append([x1, y1, min(x2, w), min(y2, h)])
    return w, h, torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)


def _inside(boxes: torch.Tensor, w: float, h: float, tol: float = 1e-9) -> bool:
    return bool(
        ((boxes[:, 0] >= -tol) & (boxes[:, 1] >= -tol) & (boxes[:, 2] <= w + tol) & (boxes[:, 3] <= h + tol))
        .all()
        .item()
        and (boxes[:, 2] > boxes[:, 0]).all()
        and (boxes[:, 3] > boxes[:, 1]).all()
    )


# --- flip -------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(boxes_in())
def test_flipping_twice_is_identity_and_boxes_stay_inside(case):
    w, h, boxes = case
    once = hflip_boxes(boxes, w)
    assert _inside(once, w, h)
    assert torch.allclose(once[:, 2] - once[:, 0], boxes[:, 2] - boxes[:, 0])  # widths kept
    assert torch.equal(once[:, 1::2], boxes[:, 1::2])  # rows untouched
    assert torch.allclose(hflip_boxes(once, w), boxes, atol=1e-9)


def _painted(w: int, h: int, boxes: torch.Tensor) -> Image.Image:
    """A black image with each (integer) box painted white: where the boxes are, read back from pixels."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    for x1, y1, x2, y2 in boxes.round().long().tolist():
        arr[y1:y2, x1:x2] = 255
    return Image.fromarray(arr)


def _white_columns(image: torch.Tensor) -> torch.Tensor:
    return (image[0] > 0).any(0).nonzero().flatten()  # columns holding white pixels


@settings(max_examples=60, deadline=None)
@given(boxes_in(max_side=64), st.sampled_from(["square", "keep_ratio"]))
def test_a_flipped_sample_mirrors_its_pixels_boxes_and_keeps_its_labels(case, resize):
    w, h, boxes = case
    boxes = boxes.round().clamp(min=0)
    boxes = boxes[(boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])]
    image = _painted(w, h, boxes)
    # the same size out (no resize): flipping is the only change
    tf = DetectionTransform(resize, image_size=max(w, h), scale=(max(w, h), min(w, h)), flip=1.0)
    plain = tf(image, boxes, None)
    flipped = tf(image, boxes, augment_rng((0, 0, 0, 0)))
    assert flipped.flipped and not plain.flipped
    assert flipped.image_size == plain.image_size and torch.equal(flipped.keep, plain.keep)
    assert torch.equal(flipped.keep, torch.arange(len(boxes)))  # every box, so every label, in order
    assert torch.allclose(flipped.boxes, hflip_boxes(plain.boxes, w))
    real = flipped.image[:, :h, :w]
    assert torch.equal(real, plain.image[:, :h, :w].flip(-1))
    if len(boxes):
        cols = _white_columns(real)
        assert cols.min() == flipped.boxes[:, 0].min() and cols.max() + 1 == flipped.boxes[:, 2].max()


def test_the_dataset_flips_boxes_and_keeps_labels(two_image_coco):
    images_dir, ann = two_image_coco
    tf = DetectionTransform("keep_ratio", scale=(80, 48), flip=1.0)
    ds = CocoDetection(images_dir, ann, 80, transform=tf)
    for i in range(len(ds)):
        x, t = ds[i]
        xf, tf_ = ds[(i, (3, 0, 0, i))]
        assert tf_["flipped"] and not t["flipped"]
        assert torch.equal(tf_["labels"], t["labels"]) and tf_["image_id"] == t["image_id"]
        w = t["image_size"][1]
        assert torch.allclose(tf_["boxes"], hflip_boxes(t["boxes"], w))
        assert torch.equal(xf, x.flip(-1))


# --- resize -----------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 4000), st.integers(1, 4000), st.integers(8, 2000), st.integers(8, 2000))
def test_keep_ratio_fits_the_scale_and_keeps_the_ratio(h, w, a, b):
    long, short = max(a, b), min(a, b)
    nh, nw = keep_ratio_size((h, w), (long, short))
    assert max(nh, nw) <= long + 0.5 and min(nh, nw) <= short + 0.5  # fits, up to rounding
    f = min(long / max(h, w), short / min(h, w))
    # one factor for both sides (a side is at least 1 pixel)
    assert abs(nh - h * f) <= 0.5 + 1e-9 or nh == 1
    assert abs(nw - w * f) <= 0.5 + 1e-9 or nw == 1
    # one of the limits is reached (rounding aside): no smaller factor than needed
    assert max(nh, nw) >= long - 1 or min(nh, nw) >= short - 1 or min(nh, nw) == 1


@settings(max_examples=60, deadline=None)
@given(boxes_in(max_side=120), st.integers(24, 200), st.integers(16, 120))
def test_keep_ratio_resize_scales_boxes_with_the_image(case, a, b):
    w, h, boxes = case
    scale = (max(a, b), min(a, b))
    out = DetectionTransform("keep_ratio", scale=scale)(Image.new("RGB", (w, h)), boxes, None)
    nh, nw = keep_ratio_size((h, w), scale)
    assert tuple(out.image.shape) == (3, nh, nw) and out.image_size == (nh, nw)
    assert torch.allclose(out.boxes, resize_boxes(boxes, (h, w), (nh, nw)))
    assert torch.allclose(out.boxes[:, 0::2], boxes[:, 0::2] * nw / w)
    assert torch.allclose(out.boxes[:, 1::2], boxes[:, 1::2] * nh / h)
    assert _inside(out.boxes, nw, nh, tol=1e-6) or not len(boxes)
    assert out.scale == pytest.approx(min(scale[0] / max(h, w), scale[1] / min(h, w)))


def test_multi_scale_draws_each_short_side():
    tf = DetectionTransform("keep_ratio", scale=(1333, 800), train_short_sides=(480, 640, 800))
    image = Image.new("RGB", (640, 480))
    shorts = {tf(image, torch.zeros(0, 4), augment_rng((0, 0, 0, k))).image_size[0] for k in range(60)}
    assert shorts == {480, 640, 800}  # 640 x 480: the short side decides (long stays under 1333)
    assert tf(image, torch.zeros(0, 4), None).image_size == (800, 1067)  # evaluation: scale itself


@settings(max_examples=200, deadline=None)
@given(boxes_in(), st.data())
def test_crop_keeps_boxes_inside_and_drops_only_those_outside(case, data):
    w, h, boxes = case
    ch, cw = data.draw(st.integers(1, h)), data.draw(st.integers(1, w))
    top, left = data.draw(st.integers(0, h - ch)), data.draw(st.integers(0, w - cw))
    out, keep = crop_boxes(boxes, top, left, (ch, cw))
    assert _inside(out, cw, ch) and len(out) == len(keep)
    ix = (boxes[:, 2].clamp(max=left + cw) - boxes[:, 0].clamp(min=left)) > 0
    iy = (boxes[:, 3].clamp(max=top + ch) - boxes[:, 1].clamp(min=top)) > 0
    assert keep.tolist() == (ix & iy).nonzero().flatten().tolist()  # dropped: no area inside the crop


def test_the_crop_policy_gives_crops_within_swins_range_and_consistent_labels(two_image_coco):
    images_dir, ann = two_image_coco
    # scale 200 x 120: the policy's sizes are Swin's times 120 / 800 (crop sides 58-90)
    tf = DetectionTransform("keep_ratio", scale=(200, 120), crop_prob=1.0)
    ds = CocoDetection(images_dir, ann, 80, transform=tf)
    labels = {i: ds[i][1]["labels"] for i in range(len(ds))}
    for k in range(40):
        i = k % len(ds)
        x, t = ds[(i, (0, 0, 0, k))]
        h, w = t["image_size"]
        assert tuple(x.shape[-2:]) == (h, w) and max(h, w) <= 200 and min(h, w) <= 120
        assert _inside(t["boxes"].double(), w, h, tol=1e-4) or not len(t["boxes"])
        assert len(t["labels"]) == len(t["boxes"])
        assert set(t["labels"].tolist()) <= set(labels[i].tolist())


def test_keys_that_need_keep_ratio_are_refused_with_square():
    with pytest.raises(ConfigError, match="keep_ratio"):
        trial_from_dict({"data": {"train_short_sides": [480, 512]}})
    with pytest.raises(ConfigError, match="long >= short"):
        trial_from_dict({"data": {"resize": "keep_ratio", "scale": [800, 1333]}})


# --- batches ----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 70), st.integers(1, 70)), min_size=1, max_size=4), st.integers(1, 40)
)
def test_a_batch_is_padded_to_its_largest_image_rounded_to_the_divisor(sizes, divisor):
    batch = [(torch.rand(3, h, w) + 1, {"image_size": (h, w)}) for h, w in sizes]
    images, targets = collate(batch, divisor)
    H, W = images.shape[-2:]
    assert H % divisor == 0 and W % divisor == 0
    assert H - max(h for h, _ in sizes) < divisor and W - max(w for _, w in sizes) < divisor
    for img, (x, _) in zip(images, batch):
        h, w = x.shape[-2:]
        assert torch.equal(img[:, :h, :w], x)  # at the top left
        rest = img.clone()
        rest[:, :h, :w] = 0
        assert not rest.any()  # zeros elsewhere
    sizes_t = image_sizes(images, targets)
    if all((h, w) == (H, W) for h, w in sizes):
        assert sizes_t is None
    else:
        assert sizes_t.tolist() == [list(s) for s in sizes]


def test_the_divisor_is_the_backbones_total_stride_unless_set():
    cfg = trial_from_dict({"preset": "swin_t", "data": {"resize": "keep_ratio"}})
    assert size_divisor(cfg) == 32  # patch 4 x 2^3: every stage map whole
    cfg = trial_from_dict({"preset": "swin_t", "data": {"resize": "keep_ratio", "size_divisor": 64}})
    assert size_divisor(cfg) == 64
    assert size_divisor(trial_from_dict({"data": {"image_size": 100}})) == 1  # squares: no padding
    _, targets = collate_fn(cfg)([(torch.zeros(3, 33, 70), {"image_size": (33, 70)})])
    assert targets == [{"image_size": (33, 70)}]
    assert tuple(collate_fn(cfg)([(torch.zeros(3, 33, 70), {})])[0].shape) == (1, 3, 64, 128)


def test_square_batches_carry_no_padding_for_the_model(two_image_coco):
    images_dir, ann = two_image_coco
    ds = CocoDetection(images_dir, ann, 80)  # today's default: square, padding part of the image
    cfg = trial_from_dict({"data": {"image_size": 80}})
    images, targets = collate_fn(cfg)([ds[0], ds[1]])
    assert tuple(images.shape) == (2, 3, 80, 80) and image_sizes(images, targets) is None
    x, t = ds[1]  # 30 x 60 (w x h): resized to 40 x 80, the square's right half is the mean colour
    assert t["image_size"] == (80, 80) and (x[:, :, 40:] == 0).all() and (x[:, :, :40] != 0).any()
    # a divisor set by hand pads the squares, and the model then knows that padding
    images, targets = collate([ds[0], ds[1]], 32)
    assert tuple(images.shape) == (2, 3, 96, 96)
    assert image_sizes(images, targets).tolist() == [[80, 80], [80, 80]]


# --- the augmentation stream ------------------------------------------------------------------------


def _draws(tf: DetectionTransform, keys) -> list[tuple]:
    image = Image.new("RGB", (120, 90))
    return [(s.flipped, s.image_size) for s in (tf(image, torch.zeros(0, 4), augment_rng(k)) for k in keys)]


def test_the_stream_is_paired_by_seed_and_differs_across_ranks_and_epochs():
    tf = DetectionTransform("keep_ratio", scale=(200, 120), train_short_sides=(60, 80, 100, 120), flip=0.5)
    order = list(range(32))
    keys = {
        (seed, rank, epoch): [k for _, k in _keyed(order, seed, rank, epoch)]
        for seed in (0, 1)
        for rank in (0, 1)
        for epoch in (0, 1)
    }
    a = _draws(tf, keys[(0, 0, 0)])
    assert a == _draws(tf, keys[(0, 0, 0)])  # a variant of the same seed draws the same
    assert len(set(a)) > 4 and {f for f, _ in a} == {True, False}
    for other in [(1, 0, 0), (0, 1, 0), (0, 0, 1)]:  # another seed, rank or epoch draws otherwise
        assert _draws(tf, keys[other]) != a, other


def _keyed(order, seed, rank, epoch):
    sampler = AugmentedSampler(order, seed, rank)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_the_sampler_passes_its_order_and_epoch_on():
    class Order(torch.utils.data.Sampler):
        epoch = None

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter([5, 2, 7])

        def __len__(self):
            return 3

    inner = Order()
    sampler = AugmentedSampler(inner, seed=4, rank=2)
    sampler.set_epoch(3)
    assert inner.epoch == 3 and len(sampler) == 3
    assert list(sampler) == [(5, (4, 2, 3, 0)), (2, (4, 2, 3, 1)), (7, (4, 2, 3, 2))]


def test_loader_workers_do_not_change_the_augmented_batches(two_image_coco):
    images_dir, ann = two_image_coco
    tf = DetectionTransform("keep_ratio", scale=(80, 48), train_short_sides=(32, 40, 48), flip=0.5)
    ds = CocoDetection(images_dir, ann, 80, transform=tf)
    order = [0, 1] * 6

    def batches(workers):
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=2,
            sampler=AugmentedSampler(order, seed=0, rank=0),
            collate_fn=collate,
            num_workers=workers,
        )
        return [(x, [(t["flipped"], t["image_size"]) for t in ts]) for x, ts in loader]

    one, two = batches(0), batches(2)
    assert len(one) == len(two) == 6
    for (xa, ta), (xb, tb) in zip(one, two):
        assert ta == tb and torch.equal(xa, xb)
    seen = {t for _, ts in one for t in ts}
    assert len(seen) > 2  # the batches do differ from one another: the stream is per sample
