"""COCO-format detection sets on disk (images folder + instances JSON), checked against every rule
of the format before anything trains or is scored on them.

``CocoDetection`` reads the instances file, validates it, and gives each image and its boxes through
a ``harness.task.transforms.DetectionTransform`` (resize, and in training flip, multi-scale, crop).
The rules (each one a ``DatasetError`` naming the file and the offending id, or with ``skip_bad=True``
a skip counted by reason in ``dataset.skipped`` and reported in one log line):

- the file is a JSON object whose ``images``, ``annotations`` and ``categories`` are lists;
- categories: objects with an integer ``id``, ids unique (always an error: the label space cannot
  be guessed);
- images: objects with an integer ``id``, a non-empty string ``file_name`` and positive integer
  ``width``/``height``; ids unique and file names unique (every entry sharing one is skipped);
  the file exists;
- annotations: objects with an integer ``id``, ids unique (every annotation sharing one is
  skipped: pycocotools indexes annotations by id, so a repeated id silently drops ground truth
  from the matching); ``image_id`` and ``category_id`` name an image / a category of the file;
  ``bbox`` is 4 finite numbers ``[x, y, w, h]`` inside the image (a pixel of overhang is rounding
  and is clipped; more is an error, or clipped with ``clip_boxes=True``); ``area``, when given, a
  finite non-negative number; ``iscrowd``, when given, the integer 0 or 1.

Degenerate boxes (zero or negative width or height: COCO train2017 has two, ids 918 and 2206849)
are not a broken file but a known defect of real datasets: they are dropped, whatever
``skip_bad`` says, counted in ``dataset.dropped`` and named in one log line, as mmdetection's and
torchvision's COCO loaders drop them. A structural error (broken JSON, unknown or repeated ids)
still refuses the file.

Valid files with no annotations, or images without any, load. Evaluation's ground truth
(``coco_gt()``) is built from exactly the validated entries, never re-read from the raw file.

The validated content is kept compact (``CocoIndex``: NumPy arrays, no per-annotation objects, no
polygons), so loader workers forked from the process share it instead of copying it page by page
as they touch Python objects' reference counts; and a file is parsed once per process
(``load_index``: keyed by its bytes' hash and the options), however many times a trial builds its
datasets (training, the probe, the measurements).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from harness.task.transforms import DetectionTransform, augment_rng

__all__ = ["DatasetError", "CocoDetection", "CocoIndex", "load_index"]

log = logging.getLogger(__name__)

_OVERHANG_PX = 1.0  # COCO's own boxes overhang their image by rounding; more than a pixel is a wrong label
_CACHED_INDEXES = 4  # parsed files kept per process (a trial reads two: train and val)
_NAMED_IDS = 10  # of dropped annotations, the ids a log line names


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and, for an image or annotation, its id."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True, eq=False)
class CocoIndex:
    """The validated content of one instances file as arrays (``I`` images, ``A`` annotations).

    Images in file order: ``image_ids (I,) int64``, ``widths``/``heights (I,) int64``,
    ``file_names (I,)`` bytes (UTF-8). Annotations grouped by image (those of image ``i`` are
    ``offsets[i]:offsets[i + 1]``, in file order): ``ann_ids (A,) int64``, ``boxes (A, 4) float64``
    xywh pixels (clipped to the image), ``category_ids (A,) int64``, ``areas (A,) float64``,
    ``iscrowd (A,) bool``. ``categories``: the category objects by sorted id; ``skipped`` /
    ``dropped``: what ``skip_bad`` skipped and what was dropped (degenerate boxes), by reason."""

    ann_file: Path
    categories: tuple[dict[str, Any], ...]
    info: dict[str, Any]
    image_ids: np.ndarray
    widths: np.ndarray
    heights: np.ndarray
    file_names: np.ndarray
    offsets: np.ndarray
    ann_ids: np.ndarray
    boxes: np.ndarray
    category_ids: np.ndarray
    areas: np.ndarray
    iscrowd: np.ndarray
    skipped: Counter[str] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)

    def coco_dict(self) -> dict[str, Any]:
        """The pycocotools dataset of this index (no segmentation: box evaluation reads none)."""
        images = [
            {"id": int(i), "file_name": n.decode(), "width": int(w), "height": int(h)}
            for i, n, w, h in zip(self.image_ids, self.file_names, self.widths, self.heights)
        ]
        image_of = np.repeat(self.image_ids, np.diff(self.offsets))
        annotations = [
            {
                "id": int(a),
                "image_id": int(i),
                "category_id": int(c),
                "bbox": [float(v) for v in box],
                "area": float(area),
                "iscrowd": int(crowd),
            }
            for a, i, c, box, area, crowd in zip(
                self.ann_ids, image_of, self.category_ids, self.boxes, self.areas, self.iscrowd
            )
        ]
        return {
            "info": self.info,
            "images": images,
            "annotations": annotations,
            "categories": list(self.categories),
        }


class _Reader:
    """Validation of one parsed instances file into a ``CocoIndex`` (see the module docstring)."""

    def __init__(self, ann_file: Path, images_dir: Path, skip_bad: bool, clip_boxes: bool) -> None:
        self.ann_file, self.images_dir = ann_file, images_dir
        self.skip_bad, self.clip_boxes = skip_bad, clip_boxes
        self.skipped: Counter[str] = Counter()
        self.dropped: Counter[str] = Counter()
        self.dropped_ids: list[int] = []

    def read(self, data: Any) -> CocoIndex:
        if not isinstance(data, dict):
            raise DatasetError(f"{self.ann_file}: expected a JSON object with images/annotations/categories")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DatasetError(f"{self.ann_file}: missing or non-list {key!r}")
        cats = self._categories(data["categories"])
        self.cat_ids = set(cats)
        images, dropped_images = self._images(data["images"])
        position = {img_id: k for k, img_id in enumerate(images)}
        # (image position, id, image_id, category_id, x, y, w, h, area, crowd) per valid annotation
        rows: list[tuple[Any, ...]] = []
        for ann in self._unique_annotations(data["annotations"]):
            ok = self._check_annotation(ann, images, dropped_images)
            if ok is not None:
                rows.append((position[ok[1]], *ok))
        rows.sort(key=lambda r: r[0])  # stable: file order within an image
        order = np.array([r[0] for r in rows], dtype=np.int64)
        info = data.get("info", {})
        return CocoIndex(
            ann_file=self.ann_file,
            categories=tuple(cats[c] for c in sorted(cats)),
            info=info if isinstance(info, dict) else {},
            image_ids=np.array(list(images), dtype=np.int64),
            widths=np.array([img["width"] for img in images.values()], dtype=np.int64),
            heights=np.array([img["height"] for img in images.values()], dtype=np.int64),
            file_names=np.array([img["file_name"].encode() for img in images.values()], dtype=np.bytes_),
            offsets=np.concatenate([[0], np.cumsum(np.bincount(order, minlength=len(images)))]).astype(
                np.int64
            ),
            ann_ids=np.array([r[1] for r in rows], dtype=np.int64),
            boxes=np.array([r[4:8] for r in rows], dtype=np.float64).reshape(-1, 4),
            category_ids=np.array([r[3] for r in rows], dtype=np.int64),
            areas=np.array([r[8] for r in rows], dtype=np.float64),
            iscrowd=np.array([r[9] for r in rows], dtype=bool),
            skipped=self.skipped,
            dropped=self.dropped,
        )

    def _bad(self, reason: str, message: str, count: int = 1) -> None:
        if not self.skip_bad:
            raise DatasetError(
                f"{self.ann_file}: {message} (data.skip_bad_annotations skips and counts such input)"
            )
        self.skipped[reason] += count

    def _categories(self, entries: list[Any]) -> dict[int, dict[str, Any]]:
        cats: dict[int, dict[str, Any]] = {}
        for c in entries:
            if not isinstance(c, dict) or not _is_int(c.get("id")):
                raise DatasetError(f"{self.ann_file}: category {c!r} is not an object with an integer id")
            if c["id"] in cats:
                raise DatasetError(f"{self.ann_file}: category id {c['id']} appears twice in 'categories'")
            cats[c["id"]] = c
        return cats

    def _images(self, entries: list[Any]) -> tuple[dict[int, dict[str, Any]], set[int]]:
        """The valid images by id, and the ids of image entries that were dropped (``skip_bad``)."""
        ok: list[dict[str, Any]] = []
        dropped: set[int] = set()
        for img in entries:
            where = f"image id {img.get('id')!r}" if isinstance(img, dict) else f"image entry {img!r}"
            if (
                not isinstance(img, dict)
                or not _is_int(img.get("id"))
                or not isinstance(img.get("file_name"), str)
                or not img["file_name"]
                or not all(_is_int(img.get(k)) and img[k] > 0 for k in ("width", "height"))
            ):
                self._bad(
                    "malformed_image",
                    f"{where}: expected an object with an integer id, a non-empty "
                    "string file_name and positive integer width/height",
                )
                if isinstance(img, dict) and _is_int(img.get("id")):
                    dropped.add(img["id"])
                continue
            ok.append(img)
        for key, reason, what in (
            ("id", "duplicate_image_id", "image id"),
            ("file_name", "duplicate_file_name", "file_name"),
        ):
            counts = Counter(img[key] for img in ok)
            for value, n in counts.items():
                if n > 1:
                    self._bad(reason, f"{what} {value!r} appears {n} times in 'images'", n)
            dropped |= {img["id"] for img in ok if counts[img[key]] > 1}
            ok = [img for img in ok if counts[img[key]] == 1]
        images: dict[int, dict[str, Any]] = {}
        for img in ok:
            path = self.images_dir / img["file_name"]
            if not path.is_file():
                self._bad("missing_image", f"image id {img['id']}: file {path} does not exist")
                dropped.add(img["id"])
                continue
            images[img["id"]] = {k: img[k] for k in ("id", "file_name", "width", "height")}
        return images, dropped

    def _unique_annotations(self, entries: list[Any]) -> list[Any]:
        counts = Counter(a["id"] for a in entries if isinstance(a, dict) and _is_int(a.get("id")))
        out = []
        for a in entries:
            n = counts.get(a["id"], 0) if isinstance(a, dict) and _is_int(a.get("id")) else 0
            if n > 1:
                self._bad(
                    "duplicate_annotation_id",
                    f"annotation id {a['id']} appears {n} times in 'annotations' "
                    "(pycocotools keeps one of them: the others' objects would count as misses)",
                )
                continue
            out.append(a)
        return out

    def _check_annotation(
        self, ann: Any, images: dict[int, dict[str, Any]], dropped_images: set[int]
    ) -> tuple[int, int, int, float, float, float, float, float, bool] | None:
        """``(id, image_id, category_id, x, y, w, h, area, iscrowd)`` of a valid annotation (box
        clipped to its image), ``None`` for one skipped or dropped."""
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            self._bad("malformed_annotation", f"annotation {ann!r}: not an object with an integer id")
            return None
        where = f"annotation id {ann['id']}"
        image_id = ann.get("image_id")
        if not _is_int(image_id) or image_id not in images:
            if _is_int(image_id) and image_id in dropped_images:  # its image was skipped (skip_bad)
                self.skipped["annotation_of_skipped_image"] += 1
                return None
            self._bad("unknown_image", f"{where}: image_id {image_id!r} is not in 'images'")
            return None
        cat = ann.get("category_id")
        if not _is_int(cat) or cat not in self.cat_ids:
            self._bad("unknown_category", f"{where}: category_id {cat!r} is not in 'categories'")
            return None
        bbox = ann.get("bbox")
        if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            self._bad("malformed_box", f"{where}: bbox {bbox!r} is not 4 finite numbers [x, y, w, h]")
            return None
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:  # a defect of real datasets, not a broken file: dropped and counted
            self.dropped["degenerate_box"] += 1
            self.dropped_ids.append(ann["id"])
            return None
        img = images[image_id]
        W, H = float(img["width"]), float(img["height"])
        tol = math.inf if self.clip_boxes else _OVERHANG_PX
        if x < -tol or y < -tol or x + w > W + tol or y + h > H + tol:
            self._bad(
                "box_outside_image",
                f"{where}: bbox {list(bbox)!r} lies outside its image "
                f"{img['file_name']} ({img['width']}x{img['height']}); clip_boxes clips it",
            )
            return None
        x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(W, x + w), min(H, y + h)
        if x1 <= x0 or y1 <= y0:
            self._bad(
                "box_outside_image",
                f"{where}: bbox {list(bbox)!r} does not overlap its image "
                f"{img['file_name']} ({img['width']}x{img['height']})",
            )
            return None
        area = ann.get("area", (x1 - x0) * (y1 - y0))
        if not _is_number(area) or area < 0:
            self._bad("bad_area", f"{where}: area {area!r} is not a finite non-negative number")
            return None
        iscrowd = ann.get("iscrowd", 0)
        if not _is_int(iscrowd) or iscrowd not in (0, 1):
            self._bad("bad_iscrowd", f"{where}: iscrowd {iscrowd!r} is not the integer 0 or 1")
            return None
        return ann["id"], image_id, cat, x0, y0, x1 - x0, y1 - y0, float(area), bool(iscrowd)


_INDEXES: OrderedDict[tuple[Any, ...], CocoIndex] = OrderedDict()
_INDEXES_LOCK = threading.Lock()


def load_index(
    ann_file: str | Path, images_dir: str | Path, *, skip_bad: bool = False, clip_boxes: bool = False
) -> CocoIndex:
    """The validated ``CocoIndex`` of ``ann_file`` (images under ``images_dir``), parsed once per
    process for the same bytes and options (the last few files are kept); raises ``DatasetError``."""
    ann_file, images_dir = Path(ann_file), Path(images_dir)
    try:
        raw = ann_file.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{ann_file}: annotation file does not exist") from None
    except OSError as e:
        raise DatasetError(f"{ann_file}: cannot read the annotation file: {e}") from None
    key = (
        str(ann_file.resolve()),
        str(images_dir.resolve()),
        skip_bad,
        clip_boxes,
        hashlib.blake2b(raw, digest_size=16).hexdigest(),
    )
    with _INDEXES_LOCK:
        if key in _INDEXES:
            _INDEXES.move_to_end(key)
            return _INDEXES[key]
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{ann_file}: malformed JSON: {e}") from None
    del raw
    reader = _Reader(ann_file, images_dir, skip_bad, clip_boxes)
    index = reader.read(data)
    del data
    if reader.skipped:
        summary = ", ".join(f"{n} {reason}" for reason, n in sorted(reader.skipped.items()))
        log.warning("%s: skipped %s (data.skip_bad_annotations)", ann_file, summary)
    if reader.dropped:
        ids = reader.dropped_ids
        named = ", ".join(map(str, ids[:_NAMED_IDS])) + (", ..." if len(ids) > _NAMED_IDS else "")
        log.warning(
            "%s: dropped %d annotation(s) with a zero or negative width or height (ids %s)",
            ann_file,
            len(ids),
            named,
        )
    with _INDEXES_LOCK:
        _INDEXES[key] = index
        while len(_INDEXES) > _CACHED_INDEXES:
            _INDEXES.popitem(last=False)
    return index


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection set: ``dataset[i] -> (image (3, h, w) float, target)``.

    ``transform`` (a ``DetectionTransform``; default: ``square`` at ``image_size``, no augmentation)
    resizes each image, normalises it with the ImageNet mean/std and moves the boxes with it; ``square``
    pads it to ``S x S`` at the bottom/right (0 after normalising), ``keep_ratio`` leaves the padding to
    the batch (``harness.task.data.collate``). ``dataset[i]`` (an int) is never augmented;
    ``dataset[(i, stream)]`` draws the augmentation from ``augment_rng(stream)`` (the keys
    ``AugmentedSampler`` yields). ``target``: ``boxes (n, 4)`` float32 xyxy pixels of the transformed
    image, ``labels (n,)`` int64 (0-based contiguous over the sorted category ids:
    ``label_to_cat[label]`` is the COCO id), ``image_id`` int, ``scale`` float (resized / original),
    ``orig_size`` (h, w), ``image_size`` (h, w) the image's real extent, ``flipped`` bool.

    Crowd annotations (``iscrowd=1``) are not training targets but stay in ``coco_gt()`` for
    evaluation, as COCO intends. ``skipped`` counts what ``skip_bad=True`` dropped, by reason, and
    ``dropped`` the degenerate boxes dropped whatever it says (see the module docstring);
    ``clip_boxes=True`` clips boxes that overhang their image instead.
    """

    def __init__(
        self,
        images_dir: str | Path,
        ann_file: str | Path,
        image_size: int,
        skip_bad: bool = False,
        *,
        clip_boxes: bool = False,
        transform: DetectionTransform | None = None,
    ):
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        self.image_size = int(image_size)
        self.transform = transform or DetectionTransform("square", self.image_size)
        self.skip_bad = skip_bad
        self.clip_boxes = clip_boxes
        self.index = load_index(self.ann_file, self.images_dir, skip_bad=skip_bad, clip_boxes=clip_boxes)
        self.label_to_cat: list[int] = [int(c["id"]) for c in self.index.categories]
        self.cat_to_label = {c: i for i, c in enumerate(self.label_to_cat)}
        self._cats = np.array(self.label_to_cat, dtype=np.int64)  # sorted: a label is a position in it
        self._coco = None

    @property
    def skipped(self) -> Counter[str]:
        return self.index.skipped

    @property
    def dropped(self) -> Counter[str]:
        return self.index.dropped

    @property
    def ids(self) -> list[int]:
        return self.index.image_ids.tolist()

    @property
    def class_names(self) -> dict[int, str]:
        return {int(c["id"]): str(c.get("name", c["id"])) for c in self.index.categories}

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat)

    # --- evaluation ground truth -----------------------------------------------------------------
    def coco_gt(self):
        """A pycocotools ``COCO`` of this set's validated ground truth, built quietly and cached."""
        if self._coco is None:
            from pycocotools.coco import COCO

            coco = COCO()
            coco.dataset = self.index.coco_dict()
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    # --- items -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.index.image_ids)

    def image_info(self, index: int) -> dict[str, Any]:
        ix = self.index
        return {
            "id": int(ix.image_ids[index]),
            "file_name": ix.file_names[index].decode(),
            "width": int(ix.widths[index]),
            "height": int(ix.heights[index]),
        }

    def load_image(self, index: int) -> Image.Image:
        info = self.image_info(index)
        path = self.images_dir / info["file_name"]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise DatasetError(f"{path}: cannot read image (image id {info['id']}): {e}") from None
        if image.size != (info["width"], info["height"]):
            raise DatasetError(
                f"{path}: image is {image.size[0]}x{image.size[1]} but {self.ann_file} says "
                f"{info['width']}x{info['height']} (image id {info['id']}); its boxes would be wrong"
            )
        return image

    def __getitem__(self, key: int | tuple[int, tuple[int, ...]]) -> tuple[torch.Tensor, dict[str, Any]]:
        index, rng = (int(key[0]), augment_rng(key[1])) if isinstance(key, tuple) else (int(key), None)
        info = self.image_info(index)
        image = self.load_image(index)
        w, h = image.size
        ix = self.index
        a, b = int(ix.offsets[index]), int(ix.offsets[index + 1])
        keep = ~ix.iscrowd[a:b]
        boxes = torch.from_numpy(ix.boxes[a:b][keep].copy()).reshape(-1, 4)  # (n, 4) xywh float64
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = torch.from_numpy(np.searchsorted(self._cats, ix.category_ids[a:b][keep]).astype(np.int64))
        sample = self.transform(image, boxes, rng)
        target = {
            "boxes": sample.boxes.float(),
            "labels": labels[sample.keep],
            "image_id": info["id"],
            "scale": sample.scale,
            "orig_size": (h, w),
            "image_size": sample.image_size,
            "flipped": sample.flipped,
        }
        return sample.image, target
