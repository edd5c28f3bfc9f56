"""The detection data pipeline: how an image and its boxes become a training or evaluation sample.

Two resize modes (``data.resize``):

- ``square`` (the built-in grids' default): the longer side is resized to ``image_size`` (ratio kept)
  and the image is padded to ``image_size x image_size`` inside the sample, so every image of a batch
  is the same square and the padding is part of the image (the model is not told about it).
- ``keep_ratio`` (Swin's detection pipeline, as mmdetection's Swin configs run it): the image is scaled
  by the largest factor that keeps it within ``scale = (long, short)`` (1333 x 800 for COCO) and is not
  padded here; ``harness.task.data.collate`` pads a batch to its largest image (rounded up to the
  backbone's stride) and each sample's real extent travels as ``image_size`` so the model treats the
  rest as padding.

Training augmentation (off for evaluation and for a sample fetched without a random stream):

- horizontal flip with probability ``flip`` (boxes mirrored: ``x1' = W - x2``, ``x2' = W - x1``);
- multi-scale (``keep_ratio``): the short side drawn per image from ``train_short_sides`` (the long
  side still capped at ``scale[0]``), Swin's 3x recipe uses 480, 512, ..., 800;
- Swin's 3x crop policy with probability ``crop_prob`` (``keep_ratio``; mmdetection's second
  AutoAugment branch): resize to a short side of 400, 500 or 600, crop a random box of 384-600 px per
  side, keep the boxes that still have area (clipped to the crop), then the multi-scale resize. The
  policy's sizes are Swin's at a short side of 800, scaled by ``scale[1] / 800``.

Every random number a sample uses comes from the ``numpy.random.Generator`` handed to
``DetectionTransform.__call__``, drawn in a fixed order (flip, policy, crop, scale), so two trials
that hand the same generator state get the same sample. ``augment_rng(stream)`` makes that generator
from a key ``(seed, rank, epoch, position)`` that ``AugmentedSampler`` attaches to each index: one
stream per sample, so the draws do not depend on the number of loader workers (no two workers share
a stream, and forked workers do not repeat one another's numbers), differ across data-parallel ranks,
and are the same for every variant of a seed (the sampler's order is the seed's).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SWIN_CROP_RANGE",
    "SWIN_CROP_SHORT_SIDES",
    "AugmentedSampler",
    "DetectionTransform",
    "Sample",
    "augment_rng",
    "crop_boxes",
    "hflip_boxes",
    "keep_ratio_size",
    "normalize",
    "resize_boxes",
    "square_size",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Swin's 3x crop policy at a short side of 800 (mmdetection's Swin configs): resize to one of these
# short sides, then crop each side to a length drawn from this range.
SWIN_CROP_SHORT_SIDES = (400, 500, 600)
SWIN_CROP_RANGE = (384, 600)
_SWIN_SHORT = 800


def keep_ratio_size(hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """(h, w) resized by the largest factor that keeps the long side <= ``scale[0]`` and the short side
    <= ``scale[1]`` (mmcv's ``rescale_size``: sides rounded half up, at least 1)."""
    h, w = hw
    long, short = scale
    factor = min(long / max(h, w), short / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def square_size(hw: tuple[int, int], side: int) -> tuple[int, int]:
    """(h, w) resized so the longer side is ``side`` (the ``square`` mode's resize)."""
    h, w = hw
    factor = side / max(h, w)
    return max(1, round(h * factor)), max(1, round(w * factor))


def resize_boxes(boxes: Tensor, hw: tuple[int, int], new_hw: tuple[int, int]) -> Tensor:
    """boxes (n, 4) xyxy pixels of an ``hw`` image -> the same boxes on the image resized to ``new_hw``
    (each axis by its own factor: rounding the sides makes them differ slightly)."""
    sy, sx = new_hw[0] / hw[0], new_hw[1] / hw[1]
    return boxes * boxes.new_tensor([sx, sy, sx, sy])


def hflip_boxes(boxes: Tensor, width: float) -> Tensor:
    """boxes (n, 4) xyxy pixels of an image ``width`` wide -> the boxes of the mirrored image."""
    out = boxes.clone()
    out[:, 0] = width - boxes[:, 2]
    out[:, 2] = width - boxes[:, 0]
    return out


def crop_boxes(boxes: Tensor, top: int, left: int, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """boxes (n, 4) xyxy pixels -> (boxes (m, 4) on the crop of size ``hw`` at (``top``, ``left``),
    clipped to it; keep (m,) int64 indices of the input boxes that still have area)."""
    h, w = hw
    out = boxes - boxes.new_tensor([left, top, left, top])
    out[:, 0::2] = out[:, 0::2].clamp(0, w)
    out[:, 1::2] = out[:, 1::2].clamp(0, h)
    keep = ((out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])).nonzero().flatten()
    return out[keep], keep


def normalize(image: Image.Image) -> Tensor:
    """RGB PIL image -> (3, h, w) float32, ImageNet mean/std normalised (so zero padding is the mean)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, h, w)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


@dataclass
class Sample:
    """A transformed sample: ``image (3, H, W)`` float (``square``: ``H = W = image_size``, padding
    included), ``boxes (m, 4)`` float64 xyxy pixels of it, ``keep (m,)`` int64 indices of the input
    boxes they come from (a crop drops some), ``scale`` (resized / original, for mapping detections
    back; each axis's rounding aside), ``image_size`` (h, w) the real extent (``square``: the whole
    square), ``flipped``."""

    image: Tensor
    boxes: Tensor
    keep: Tensor
    scale: float
    image_size: tuple[int, int]
    flipped: bool


@dataclass(frozen=True)
class DetectionTransform:
    """The pipeline of the module docstring. ``transform(image, boxes, rng) -> Sample``: ``image`` an
    RGB PIL image, ``boxes (n, 4)`` float64 xyxy pixels of it, ``rng`` a ``numpy.random.Generator``
    (augmentation on) or None (no augmentation: no flip, no crop, ``scale`` itself)."""

    resize: str = "square"
    image_size: int = 128
    scale: tuple[int, int] = (1333, 800)
    train_short_sides: tuple[int, ...] = ()
    flip: float = 0.0
    crop_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.resize not in ("square", "keep_ratio"):
            raise ValueError(f"resize must be 'square' or 'keep_ratio', got {self.resize!r}")
        if len(self.scale) != 2 or min(self.scale) < 1 or self.scale[0] < self.scale[1]:
            raise ValueError(f"scale must be (long, short) positive with long >= short, got {self.scale}")
        if any(s < 1 for s in self.train_short_sides):
            raise ValueError(f"train_short_sides must be positive, got {self.train_short_sides}")
        if self.resize == "square" and (self.train_short_sides or self.crop_prob):
            raise ValueError("train_short_sides and crop_prob need resize 'keep_ratio'")

    @property
    def augments(self) -> bool:
        """Whether a random stream changes anything (flip, multi-scale or crop)."""
        return self.flip > 0 or bool(self.train_short_sides) or self.crop_prob > 0

    def __call__(self, image: Image.Image, boxes: Tensor, rng: np.random.Generator | None) -> Sample:
        keep = torch.arange(len(boxes))
        flip = bool(rng.random() < self.flip) if rng is not None else False
        if self.resize == "square":
            hw = square_size((image.size[1], image.size[0]), self.image_size)
            scale = self.image_size / max(image.size)
        else:
            if rng is not None and self.crop_prob > 0 and rng.random() < self.crop_prob:
                image, boxes, keep = self._crop(image, boxes, rng)
            short = self.scale[1]
            if rng is not None and self.train_short_sides:
                short = int(self.train_short_sides[int(rng.integers(len(self.train_short_sides)))])
            w, h = image.size
            hw = keep_ratio_size((h, w), (self.scale[0], short))
            scale = min(self.scale[0] / max(h, w), short / min(h, w))  # of the crop when cropped
        if hw != (image.size[1], image.size[0]):
            boxes = resize_boxes(boxes, (image.size[1], image.size[0]), hw)
            image = image.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            boxes = hflip_boxes(boxes, hw[1])
        x = normalize(image)  # (3, h, w)
        size = hw
        if self.resize == "square":  # the padding is part of the sample (bottom/right)
            s = self.image_size
            x = torch.nn.functional.pad(x, (0, s - hw[1], 0, s - hw[0]))
            size = (s, s)
        return Sample(image=x, boxes=boxes, keep=keep, scale=scale, image_size=size, flipped=flip)

    def _crop(
        self, image: Image.Image, boxes: Tensor, rng: np.random.Generator
    ) -> tuple[Image.Image, Tensor, Tensor]:
        """Swin's crop policy: a short side from ``SWIN_CROP_SHORT_SIDES``, then a crop of each side's
        length drawn from ``SWIN_CROP_RANGE`` (both scaled by ``scale[1] / 800``)."""
        f = self.scale[1] / _SWIN_SHORT
        sides = [max(1, round(s * f)) for s in SWIN_CROP_SHORT_SIDES]
        short = sides[int(rng.integers(len(sides)))]
        w, h = image.size
        hw = keep_ratio_size((h, w), (self.scale[0], short))
        boxes = resize_boxes(boxes, (h, w), hw)
        image = image.resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
        lo, hi = (max(1, round(s * f)) for s in SWIN_CROP_RANGE)
        ch = int(rng.integers(min(hw[0], lo), min(hw[0], hi) + 1))
        cw = int(rng.integers(min(hw[1], lo), min(hw[1], hi) + 1))
        top = int(rng.integers(0, hw[0] - ch + 1))
        left = int(rng.integers(0, hw[1] - cw + 1))
        boxes, keep = crop_boxes(boxes, top, left, (ch, cw))
        return image.crop((left, top, left + cw, top + ch)), boxes, keep


def augment_rng(stream: tuple[int, ...]) -> np.random.Generator:
    """The generator of one sample's augmentation from its key (``AugmentedSampler``: seed, rank,
    epoch, position), through sha256 so any integers (negative seeds included) make a valid seed."""
    digest = hashlib.sha256(repr(("augment", *map(int, stream))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


class AugmentedSampler(torch.utils.data.Sampler):
    """Wraps the sampler that orders a rank's training samples so each index comes with its
    augmentation key: yields ``(index, (seed, rank, epoch, position))``, ``position`` the index's place
    in this rank's epoch. ``set_epoch`` is passed on to the wrapped sampler."""

    def __init__(self, sampler: torch.utils.data.Sampler, seed: int, rank: int) -> None:
        self.sampler, self.seed, self.rank, self.epoch = sampler, int(seed), int(rank), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, tuple[int, int, int, int]]]:
        for position, index in enumerate(self.sampler):
            yield int(index), (self.seed, self.rank, self.epoch, position)

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]  # the samplers here all have a length
