"""The built-in detection set: handwritten digits pasted on photographs, generated once and cached.

It needs no download: scikit-learn's 1,797 real handwritten digits (``load_digits``, 8x8) are scaled
and pasted, 1-6 per image, onto crops of its two real photographs (``load_sample_images``), with the
digit's own ink as alpha so each box is tight. It is written once as PNG images + COCO instances
JSON under a folder named by a content hash of the generation parameters, and reused; the task
reads it with the same loader as any COCO set on disk (``harness.task.coco.CocoDetection``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.config import DataConfig

__all__ = ["builtin_dataset", "builtin_params"]

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
        split: {
            "info": {"description": "spa-harness built-in digits", "params": params},
            "images": [],
            "annotations": [],
            "categories": categories,
        }
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
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": digit + 1,
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    for split in ("train", "val"):
        with open(out / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(coco[split], f, sort_keys=True)


def _compose(
    rng: np.random.Generator, ink: np.ndarray, classes: np.ndarray, pool: np.ndarray, photos: list[np.ndarray]
) -> tuple[np.ndarray, list[tuple[int, int, int, int, int]]]:
    """One image (H, W, 3) uint8 and its boxes ``(x, y, w, h, digit)``."""
    h, w = (int(v) for v in rng.integers(_MIN_SIDE, _MAX_SIDE + 1, size=2))
    photo = photos[int(rng.integers(len(photos)))]
    zoom = rng.uniform(1.0, 2.0)  # crop a larger region and shrink it: varied texture scale
    ch, cw = min(photo.shape[0], int(h * zoom)), min(photo.shape[1], int(w * zoom))
    y0 = int(rng.integers(0, photo.shape[0] - ch + 1))
    x0 = int(rng.integers(0, photo.shape[1] - cw + 1))
    crop = Image.fromarray(photo[y0 : y0 + ch, x0 : x0 + cw]).resize((w, h), Image.Resampling.BILINEAR)
    image = np.asarray(crop, dtype=np.float32).copy()

    boxes: list[tuple[int, int, int, int, int]] = []
    for _ in range(int(rng.integers(_MIN_OBJECTS, _MAX_OBJECTS + 1))):
        k = int(pool[int(rng.integers(len(pool)))])
        side = max(_MIN_DIGIT_PX, rng.uniform(*_DIGIT_SCALE) * min(h, w))
        pw = int(round(side * rng.uniform(0.8, 1.2)))
        ph = int(round(side))
        alpha = np.asarray(
            Image.fromarray(ink[k], mode="F").resize((pw, ph), Image.Resampling.BILINEAR), dtype=np.float32
        )
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
        patch = image[py : py + ph, px : px + pw]
        # Ink that contrasts with what is under it: light digits on dark ground and vice versa.
        light = patch.mean() < 110
        color = rng.uniform(190, 255, size=3) if light else rng.uniform(0, 60, size=3)
        a = alpha[..., None]
        image[py : py + ph, px : px + pw] = patch * (1 - a) + color.astype(np.float32) * a
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
