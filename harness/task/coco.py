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
  ``bbox`` is 4 finite numbers ``[x, y, w, h]`` with ``w, h > 0`` inside the image (a pixel of
  overhang is rounding and is clipped; more is an error, or clipped with ``clip_boxes=True``);
  ``area``, when given, a finite non-negative number; ``iscrowd``, when given, the integer 0 or 1.

Valid files with no annotations, or images without any, load. Evaluation's ground truth
(``coco_gt()``) is built from exactly the validated entries, never re-read from the raw file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from harness.task.transforms import DetectionTransform, augment_rng

__all__ = ["DatasetError", "CocoDetection"]

log = logging.getLogger(__name__)

_OVERHANG_PX = 1.0  # COCO's own boxes overhang their image by rounding; more than a pixel is a wrong label


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and, for an image or annotation, its id."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


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
    evaluation, as COCO intends. ``skipped`` counts what ``skip_bad=True`` dropped, by reason
    (see the module docstring); ``clip_boxes=True`` clips boxes that overhang their image instead.
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
        self.skipped: Counter[str] = Counter()
        data = self._read(self.ann_file)

        cats = self._categories(data["categories"])
        self.label_to_cat: list[int] = sorted(cats)
        self.cat_to_label = {c: i for i, c in enumerate(self.label_to_cat)}
        self.class_names = {c: str(cats[c].get("name", c)) for c in self.label_to_cat}

        images, dropped_images = self._valid_images(data["images"])
        anns_by_image: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
        kept_anns = []
        for ann in self._unique_annotations(data["annotations"]):
            ok = self._check_annotation(ann, images, dropped_images)
            if ok is not None:
                kept_anns.append(ok)
                anns_by_image[ok["image_id"]].append(ok)

        self.ids: list[int] = list(images)
        self._images = images
        self._anns = anns_by_image
        # What evaluation compares against: exactly the validated entries the model trains on.
        self._coco_dict = {
            "info": data.get("info", {}),
            "images": list(images.values()),
            "annotations": kept_anns,
            "categories": [cats[c] for c in self.label_to_cat],
        }
        self._coco = None
        if self.skipped:
            summary = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            log.warning("%s: skipped %s (data.skip_bad_annotations)", self.ann_file, summary)

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat)

    # --- reading and checking ------------------------------------------------------------------
    def _read(self, path: Path) -> dict[str, Any]:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DatasetError(f"{path}: annotation file does not exist") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{path}: malformed JSON: {e}") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{path}: expected a JSON object with images/annotations/categories")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DatasetError(f"{path}: missing or non-list {key!r}")
        return data

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

    def _valid_images(self, entries: list[Any]) -> tuple[dict[int, dict[str, Any]], set[int]]:
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
            images[img["id"]] = {
                "id": img["id"],
                "file_name": img["file_name"],
                "width": img["width"],
                "height": img["height"],
            }
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
    ) -> dict[str, Any] | None:
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
        if not _is_int(cat) or cat not in self.cat_to_label:
            self._bad("unknown_category", f"{where}: category_id {cat!r} is not in 'categories'")
            return None
        bbox = ann.get("bbox")
        if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
            self._bad("malformed_box", f"{where}: bbox {bbox!r} is not 4 finite numbers [x, y, w, h]")
            return None
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            self._bad("degenerate_box", f"{where}: bbox {list(bbox)!r} has zero or negative width/height")
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
        out = dict(ann)
        out.update(bbox=[x0, y0, x1 - x0, y1 - y0], area=area, iscrowd=iscrowd)
        return out

    # --- evaluation ground truth -----------------------------------------------------------------
    def coco_gt(self):
        """A pycocotools ``COCO`` of this set's validated ground truth, built quietly and cached."""
        if self._coco is None:
            from pycocotools.coco import COCO

            coco = COCO()
            coco.dataset = self._coco_dict
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

    # --- items -------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def image_info(self, index: int) -> dict[str, Any]:
        return self._images[self.ids[index]]

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
        anns = [a for a in self._anns[info["id"]] if not a["iscrowd"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
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
