"""Detection data for the task: the built-in digits-on-photos set and a COCO-format loader.

The built-in set needs no download: scikit-learn's 1,797 real handwritten digits (``load_digits``,
8x8) are scaled and pasted, 1-6 per image, onto crops of its two real photographs
(``load_sample_images``), with the digit's own ink as alpha so each box is tight. It is written once
as PNG images + COCO instances JSON under a folder named by a content hash of the generation
parameters, and reused (../shared/DESIGN.md, Data).

``CocoDetection`` reads any COCO-format set on disk (images folder + instances JSON), resizes each
image keeping its aspect ratio and pads it to a square, and moves the boxes with it. A malformed
file, a missing image or a bad box raises ``DatasetError`` naming the file and the annotation id,
or (``skip_bad=True``) is skipped and counted in ``dataset.skipped``; never a silent wrong label.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from harness.config import DataConfig
from spa_core import selection_labels_from_boxes

__all__ = [
    "DatasetError",
    "builtin_dataset",
    "builtin_params",
    "CocoDetection",
    "collate",
    "build_datasets",
    "fixed_batch",
    "selection_labels",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Generation parameters beyond DataConfig; all of them go into the cache folder's content hash, so
# changing any (or the generator itself: bump the version) makes a new folder instead of reusing.
_BUILTIN_VERSION = 1
_MIN_SIDE, _MAX_SIDE = 64, 224  # image height and width, drawn independently
_MIN_OBJECTS, _MAX_OBJECTS = 1, 6
_DIGIT_SCALE = (0.12, 0.4)  # digit side as a fraction of the image's shorter side
_MIN_DIGIT_PX = 12
_MAX_OVERLAP = 0.1  # a pasted digit covers at most this fraction of the smaller box: none is hidden
_INK = 0.2  # alpha above this is the digit; its extent is the box
_VAL_DIGIT_FRACTION = 0.2  # val digits are other writers' digits than train's


class DatasetError(ValueError):
    """Bad dataset input; the message names the file and, for an annotation, its id."""


# --------------------------------------------------------------------------------------------
# Built-in dataset
# --------------------------------------------------------------------------------------------


def builtin_params(cfg: DataConfig) -> dict[str, Any]:
    """What determines the built-in set's bytes (hashed into its cache folder's name)."""
    return {
        "version": _BUILTIN_VERSION,
        "num_train": cfg.num_train,
        "num_val": cfg.num_val,
        "seed": cfg.data_seed,
        "sides": [_MIN_SIDE, _MAX_SIDE],
        "objects": [_MIN_OBJECTS, _MAX_OBJECTS],
        "digit_scale": list(_DIGIT_SCALE),
        "min_digit_px": _MIN_DIGIT_PX,
        "max_overlap": _MAX_OVERLAP,
        "ink": _INK,
        "val_digit_fraction": _VAL_DIGIT_FRACTION,
    }


def _cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("SPA_HARNESS_CACHE") or "~/.cache/spa-harness"
    return Path(root).expanduser()


def builtin_dataset(cfg: DataConfig, *, progress: bool = True) -> Path:
    """The built-in set's folder (generated on first use): ``train/``, ``val/`` PNGs and
    ``annotations/instances_{train,val}.json``, the layout ``DataConfig``'s defaults point at.

    Written to a temporary folder and renamed into place, so a crash never leaves half a set and
    concurrent trials that race to generate it end with one complete copy."""
    params = builtin_params(cfg)
    blob = json.dumps(params, sort_keys=True).encode()
    root = _cache_root(cfg)
    final = root / f"builtin-{hashlib.sha256(blob).hexdigest()[:12]}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-builtin-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would follow the folder through the rename
    try:
        _generate(tmp, params, progress=progress)
        (tmp / "params.json").write_text(json.dumps(params, indent=1, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _generate(out: Path, params: dict[str, Any], *, progress: bool) -> None:
    from sklearn.datasets import load_digits, load_sample_images

    digits = load_digits()
    ink = (digits.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    photos = [np.asarray(p, dtype=np.uint8) for p in load_sample_images().images]
    seed = params["seed"]
    order = np.random.default_rng([seed, 0]).permutation(len(ink))
    n_val_digits = int(round(len(ink) * params["val_digit_fraction"]))
    pools = {"val": order[:n_val_digits], "train": order[n_val_digits:]}
    categories = [{"id": d + 1, "name": str(d), "supercategory": "digit"} for d in range(10)]

    jobs = [("train", i) for i in range(params["num_train"])] + [("val", i) for i in range(params["num_val"])]
    coco: dict[str, dict[str, Any]] = {
        split: {"info": {"description": "spa-harness built-in digits", "params": params},
                "images": [], "annotations": [], "categories": categories}
        for split in ("train", "val")
    }
    (out / "annotations").mkdir()
    for split in ("train", "val"):
        (out / split).mkdir()
    for split, i in _track(jobs, "generating the built-in dataset", progress and len(jobs) >= 200):
        split_code = 1 if split == "train" else 2
        rng = np.random.default_rng([seed, split_code, i])
        image, boxes = _compose(rng, ink, digits.target, pools[split], photos)
        name = f"{i:06d}.png"
        Image.fromarray(image).save(out / split / name, format="PNG")
        image_id = i + 1
        h, w = image.shape[:2]
        coco[split]["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
        anns = coco[split]["annotations"]
        for x, y, bw, bh, digit in boxes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": digit + 1,
                         "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
    for split in ("train", "val"):
        with open(out / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(coco[split], f, sort_keys=True)


def _compose(rng: np.random.Generator, ink: np.ndarray, classes: np.ndarray, pool: np.ndarray,
             photos: list[np.ndarray]) -> tuple[np.ndarray, list[tuple[int, int, int, int, int]]]:
    """One image (H, W, 3) uint8 and its boxes ``(x, y, w, h, digit)``."""
    h, w = (int(v) for v in rng.integers(_MIN_SIDE, _MAX_SIDE + 1, size=2))
    photo = photos[int(rng.integers(len(photos)))]
    zoom = rng.uniform(1.0, 2.0)  # crop a larger region and shrink it: varied texture scale
    ch, cw = min(photo.shape[0], int(h * zoom)), min(photo.shape[1], int(w * zoom))
    y0 = int(rng.integers(0, photo.shape[0] - ch + 1))
    x0 = int(rng.integers(0, photo.shape[1] - cw + 1))
    crop = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.BILINEAR)
    image = np.asarray(crop, dtype=np.float32).copy()

    boxes: list[tuple[int, int, int, int, int]] = []
    for _ in range(int(rng.integers(_MIN_OBJECTS, _MAX_OBJECTS + 1))):
        k = int(pool[int(rng.integers(len(pool)))])
        side = max(_MIN_DIGIT_PX, rng.uniform(*_DIGIT_SCALE) * min(h, w))
        pw = int(round(side * rng.uniform(0.8, 1.2)))
        ph = int(round(side))
        alpha = np.asarray(Image.fromarray(ink[k], mode="F").resize((pw, ph), Image.BILINEAR), dtype=np.float32)
        alpha = np.clip(alpha * 1.5, 0.0, 1.0)
        rows, cols = np.nonzero(alpha > _INK)
        if rows.size == 0:
            continue
        by0, by1, bx0, bx1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        for _attempt in range(20):
            py = int(rng.integers(0, h - ph + 1))
            px = int(rng.integers(0, w - pw + 1))
            box = (px + int(bx0), py + int(by0), int(bx1 - bx0), int(by1 - by0))
            if all(_overlap_xywh(box, b[:4]) <= _MAX_OVERLAP for b in boxes):
                break
        else:
            continue
        patch = image[py:py + ph, px:px + pw]
        # Ink that contrasts with what is under it: light digits on dark ground and vice versa.
        light = patch.mean() < 110
        color = rng.uniform(190, 255, size=3) if light else rng.uniform(0, 60, size=3)
        a = alpha[..., None]
        image[py:py + ph, px:px + pw] = patch * (1 - a) + color.astype(np.float32) * a
        boxes.append((*box, int(classes[k])))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), boxes


def _overlap_xywh(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Intersection over the smaller box's area."""
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / min(a[2] * a[3], b[2] * b[3])


def _track(items: list, description: str, enabled: bool):
    if not enabled:
        return items
    from rich.progress import track

    return track(items, description=description, transient=True)


# --------------------------------------------------------------------------------------------
# COCO-format loader
# --------------------------------------------------------------------------------------------


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection set: ``dataset[i] -> (image (3, S, S) float, target)``.

    Each image is resized so its longer side is ``image_size`` (aspect kept), normalised with the
    ImageNet mean/std and padded to ``S x S`` at the bottom/right (padding is 0 after normalising).
    ``target``: ``boxes (n, 4)`` float32 xyxy pixels of the resized image, ``labels (n,)`` int64
    (0-based contiguous over the sorted category ids: ``label_to_cat[label]`` is the COCO id),
    ``image_id`` int, ``scale`` float (resized / original), ``orig_size`` (h, w).

    Crowd annotations (``iscrowd=1``) are not training targets but stay in ``coco_gt()`` for
    evaluation, as COCO intends. ``skipped`` counts what ``skip_bad=True`` dropped, by reason.
    """

    def __init__(self, images_dir: str | Path, ann_file: str | Path, image_size: int, skip_bad: bool = False):
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        self.image_size = int(image_size)
        self.skip_bad = skip_bad
        self.skipped: Counter[str] = Counter()
        data = self._read(self.ann_file)

        cats = data["categories"]
        self.label_to_cat: list[int] = sorted(int(c["id"]) for c in cats)
        self.cat_to_label = {c: i for i, c in enumerate(self.label_to_cat)}
        self.class_names = {int(c["id"]): str(c.get("name", c["id"])) for c in cats}

        images: dict[int, dict[str, Any]] = {}
        for img in data["images"]:
            try:
                image_id, name = int(img["id"]), str(img["file_name"])
                width, height = int(img["width"]), int(img["height"])
            except (KeyError, TypeError, ValueError) as e:
                raise DatasetError(f"{self.ann_file}: image entry {img!r} lacks id/file_name/width/height ({e})") from None
            if not (self.images_dir / name).is_file():
                self._bad("missing_image", f"{self.ann_file}: image id {image_id}: file {self.images_dir / name} does not exist")
                continue
            images[image_id] = {"id": image_id, "file_name": name, "width": width, "height": height}

        anns_by_image: dict[int, list[dict[str, Any]]] = {i: [] for i in images}
        kept_anns = []
        missing = {int(img["id"]) for img in data["images"]} - set(images)
        for ann in data["annotations"]:
            ok = self._check_annotation(ann, images, missing)
            if ok is None:
                continue
            kept_anns.append(ok)
            anns_by_image[ok["image_id"]].append(ok)

        self.ids: list[int] = list(images)
        self._images = images
        self._anns = anns_by_image
        # What evaluation compares against: the same cleaned annotations the model was trained on.
        self._coco_dict = {"info": data.get("info", {}), "images": list(images.values()),
                           "annotations": kept_anns, "categories": cats}
        self._coco = None
        if self.skipped:
            summary = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            warnings.warn(f"{self.ann_file}: skipped {summary}", stacklevel=2)

    @property
    def num_classes(self) -> int:
        return len(self.label_to_cat)

    def _read(self, path: Path) -> dict[str, Any]:
        try:
            with open(path) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DatasetError(f"{path}: annotation file does not exist") from None
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}: malformed JSON: {e}") from None
        if not isinstance(data, dict):
            raise DatasetError(f"{path}: expected a JSON object with images/annotations/categories")
        for key in ("images", "annotations", "categories"):
            if not isinstance(data.get(key), list):
                raise DatasetError(f"{path}: missing or non-list {key!r}")
        return data

    def _bad(self, reason: str, message: str) -> None:
        if not self.skip_bad:
            raise DatasetError(message + " (skip_bad=True skips and counts such input)")
        self.skipped[reason] += 1

    def _check_annotation(self, ann: Any, images: dict[int, dict[str, Any]], missing: set[int]) -> dict[str, Any] | None:
        where = f"{self.ann_file}: annotation id {ann.get('id') if isinstance(ann, dict) else ann!r}"
        if not isinstance(ann, dict) or "id" not in ann:
            self._bad("malformed_annotation", f"{where}: not an object with an id")
            return None
        image_id = ann.get("image_id")
        if not isinstance(image_id, int) or image_id not in images:
            if isinstance(image_id, int) and image_id in missing:  # its image was skipped (skip_bad) as missing
                self.skipped["annotation_of_missing_image"] += 1
                return None
            self._bad("unknown_image", f"{where}: image_id {image_id!r} is not in 'images'")
            return None
        if ann.get("category_id") not in self.cat_to_label:
            self._bad("unknown_category", f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
            return None
        bbox = ann.get("bbox")
        if (not isinstance(bbox, list | tuple) or len(bbox) != 4
                or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
            self._bad("malformed_box", f"{where}: bbox {bbox!r} is not 4 finite numbers [x, y, w, h]")
            return None
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            self._bad("degenerate_box", f"{where}: bbox {bbox!r} has zero or negative width/height")
            return None
        img = images[image_id]
        tol = 1.0  # COCO's own boxes overhang by rounding; more than a pixel is a wrong label
        if x < -tol or y < -tol or x + w > img["width"] + tol or y + h > img["height"] + tol:
            self._bad("box_outside_image", f"{where}: bbox {bbox!r} lies outside its image "
                      f"{img['file_name']} ({img['width']}x{img['height']})")
            return None
        x0, y0 = max(0.0, x), max(0.0, y)
        x1, y1 = min(float(img["width"]), x + w), min(float(img["height"]), y + h)
        out = dict(ann)
        out["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        out.setdefault("area", (x1 - x0) * (y1 - y0))
        out.setdefault("iscrowd", 0)
        return out

    def coco_gt(self):
        """A pycocotools ``COCO`` of this set's (cleaned) ground truth, built quietly and cached."""
        if self._coco is None:
            from pycocotools.coco import COCO

            coco = COCO()
            coco.dataset = self._coco_dict
            with contextlib.redirect_stdout(io.StringIO()):
                coco.createIndex()
            self._coco = coco
        return self._coco

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
            raise DatasetError(f"{path}: image is {image.size[0]}x{image.size[1]} but {self.ann_file} says "
                               f"{info['width']}x{info['height']} (image id {info['id']}); its boxes would be wrong")
        return image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        info = self.image_info(index)
        image = self.load_image(index)
        s = self.image_size
        w, h = image.size
        scale = s / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        image = image.resize((nw, nh), Image.BILINEAR)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, nh, nw)
        x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
        out = torch.zeros(3, s, s)
        out[:, :nh, :nw] = x

        anns = [a for a in self._anns[info["id"]] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        # Scale by the actual resize factors (rounding makes them differ slightly per axis).
        boxes *= torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=torch.float64)
        labels = torch.tensor([self.cat_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        target = {"boxes": boxes.float(), "labels": labels, "image_id": info["id"], "scale": scale,
                  "orig_size": (h, w)}
        return out, target


def collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """``[(image, target)] -> (images (B, 3, S, S), [target])``."""
    images = torch.stack([b[0] for b in batch])
    return images, [b[1] for b in batch]


def selection_labels(targets: list[dict[str, Any]], image_hw: tuple[int, int], grids: list[tuple[int, int]],
                     coverage: float | None = None) -> dict[tuple[int, int], torch.Tensor]:
    """SPA selection labels of a batch, ``{(H, W): (B, H, W) float}``, at the grids the model asks for
    (``backbone.label_grids(image_hw)``), through ``spa_core.selection_labels_from_boxes``."""
    return selection_labels_from_boxes([t["boxes"] for t in targets], image_hw, grids, coverage=coverage)


def build_datasets(cfg: DataConfig, *, progress: bool = True) -> tuple[CocoDetection, CocoDetection]:
    """``(train, val)`` for ``cfg.dataset``: ``builtin`` (generated, cached) or ``coco`` (``cfg.root``)."""
    if cfg.dataset == "builtin":
        root = builtin_dataset(cfg, progress=progress)
    elif cfg.dataset == "coco":
        if not cfg.root:
            raise DatasetError("data.dataset is 'coco' but data.root is not set")
        root = Path(cfg.root).expanduser()
    else:
        raise DatasetError(f"unknown data.dataset {cfg.dataset!r}; expected 'builtin' or 'coco'")
    train = CocoDetection(root / cfg.train_images, root / cfg.train_ann, cfg.image_size, cfg.skip_bad_annotations)
    val = CocoDetection(root / cfg.val_images, root / cfg.val_ann, cfg.image_size, cfg.skip_bad_annotations)
    if train.label_to_cat != val.label_to_cat:
        raise DatasetError(f"{train.ann_file} and {val.ann_file} have different category ids")
    return train, val


def fixed_batch(dataset: CocoDetection, batch_size: int) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """The first ``batch_size`` images of ``dataset`` (cycled if it is smaller): the fixed batch that
    benchmarks time and count FLOPs on, the same for every variant."""
    if len(dataset) == 0:
        raise DatasetError(f"{dataset.ann_file}: no images to build a batch from")
    return collate([dataset[i % len(dataset)] for i in range(batch_size)])
