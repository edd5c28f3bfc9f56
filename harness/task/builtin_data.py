"""The built-in detection set: filled shapes among look-alike distractors on cluttered photographs,
generated once and cached.

It needs no download. Objects are filled shapes of ``LABELLED_SHAPES`` (circle, triangle, square),
rotated at random, 22-62% of the canvas wide (28-80 px at 128), in a random colour with a thin
outline of the opposite colour. Shapes of ``DISTRACTOR_SHAPES`` (star, cross) are drawn the same way,
in the same sizes and colours, and left unlabelled: a detector (and a gate) must tell a shape by its
outline, not find a patch of colour. Its class is in the outline, which the patches of one window
see only in part once the shape is larger than a window at the SPA stages' strides: the blocks that
mix tokens across windows are what recognise it. Backgrounds are crops of real photographs that
scikit-image and scikit-learn ship in their wheels, zoomed, flipped and tinted, with procedural
clutter (strokes and arcs in random colours) drawn over them. The photographs are split between
training and validation, so validation backgrounds are scenes that training never saw.

Every image comes from its own generator, seeded by (seed, split, index): the first images of a
larger set are a smaller set's. Each image entry records its photograph (``background``) and its
unlabelled shapes' boxes (``distractors``), as provenance that no loader reads. The set is written
once as PNG images + COCO instances JSON under a folder named by a content hash of the generation
parameters (the generator's version among them), and reused; the task reads it with the same loader
as any COCO set on disk (``harness.task.coco.CocoDetection``).
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
from PIL import Image, ImageDraw

from harness.config import BUILTIN_DATA_VERSION, DataConfig

__all__ = ["builtin_dataset", "builtin_params", "background_names", "LABELLED_SHAPES", "DISTRACTOR_SHAPES"]

# Generation parameters beyond DataConfig; all of them go into the cache folder's content hash, so
# changing any (or the generator itself: bump the version) makes a new folder instead of reusing.
_BUILTIN_VERSION = BUILTIN_DATA_VERSION  # harness.config: part of every built-in trial's hash
_CANVAS = 128  # every image is _CANVAS x _CANVAS: no padding wasted at data.image_size 128
LABELLED_SHAPES = ("circle", "triangle", "square")  # the classes that are objects, in category order
DISTRACTOR_SHAPES = ("star", "cross")  # drawn like the objects, never labelled
_OBJECTS = (1, 3)  # labelled shapes per image (inclusive range)
_DISTRACTORS = (1, 3)  # unlabelled shapes per image
_SHAPE_SCALE = (0.22, 0.62)  # a shape's width across as a fraction of the canvas: 28-80 px at 128
_MAX_OVERLAP = 0.05  # a shape covers at most this fraction of the smaller box: none is hidden
_STROKES = (0, 3)  # procedural clutter items per image
# Photographs by split: (package, name). Validation scenes are never cropped for training.
_TRAIN_BACKGROUNDS = (
    ("skimage", "astronaut"),
    ("skimage", "brick"),
    ("skimage", "camera"),
    ("skimage", "chelsea"),
    ("skimage", "coins"),
    ("skimage", "grass"),
    ("skimage", "gravel"),
    ("skimage", "hubble_deep_field"),
    ("skimage", "immunohistochemistry"),
    ("skimage", "moon"),
    ("skimage", "page"),
    ("sklearn", "china.jpg"),
)
# Scenes of round things (coins, craters, pebbles) train the detector that a round patch of a photo
# is not a circle; validation scenes have none, as a test set should not hinge on one texture.
_VAL_BACKGROUNDS = (
    ("skimage", "coffee"),
    ("skimage", "retina"),
    ("skimage", "rocket"),
    ("skimage", "text"),
    ("sklearn", "flower.jpg"),
)


def background_names(split: str) -> list[str]:
    """The photographs ``split`` (``train`` or ``val``) crops its backgrounds from, as ``package:name``."""
    pools = {"train": _TRAIN_BACKGROUNDS, "val": _VAL_BACKGROUNDS}
    if split not in pools:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'val'")
    return [f"{pkg}:{name}" for pkg, name in pools[split]]


def builtin_params(cfg: DataConfig, trial_seed: int | None = None) -> dict[str, Any]:
    """What determines the built-in set's bytes (hashed into its cache folder's name).

    With ``cfg.seed_with_trial`` the generation seed is ``(data_seed, trial_seed)``: every trial seed
    of a grid samples its own set, so an interval over seeds includes data sampling."""
    if cfg.seed_with_trial:
        if trial_seed is None:
            raise ValueError("data.seed_with_trial is set but no trial seed was given to the built-in set")
        seed: int | list[int] = [int(cfg.data_seed), int(trial_seed)]
    else:
        seed = int(cfg.data_seed)
    return {
        "version": _BUILTIN_VERSION,
        "num_train": cfg.num_train,
        "num_val": cfg.num_val,
        "seed": seed,
        "canvas": _CANVAS,
        "labelled": list(LABELLED_SHAPES),
        "distractor_shapes": list(DISTRACTOR_SHAPES),
        "objects": list(_OBJECTS),
        "distractors": list(_DISTRACTORS),
        "shape_scale": list(_SHAPE_SCALE),
        "max_overlap": _MAX_OVERLAP,
        "strokes": list(_STROKES),
        "backgrounds": {"train": background_names("train"), "val": background_names("val")},
    }


def _cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("SPA_HARNESS_CACHE") or "~/.cache/spa-harness"
    return Path(root).expanduser()


def builtin_dataset(cfg: DataConfig, *, trial_seed: int | None = None, progress: bool = True) -> Path:
    """The built-in set's folder (generated on first use): ``train/``, ``val/`` PNGs and
    ``annotations/instances_{train,val}.json``, the layout ``DataConfig``'s defaults point at.
    ``trial_seed`` matters only with ``cfg.seed_with_trial`` (``builtin_params``).

    Written to a temporary folder and renamed into place, so a crash never leaves half a set and
    concurrent trials that race to generate it end with one complete copy."""
    params = builtin_params(cfg, trial_seed)
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


def _load_photo(package: str, name: str) -> np.ndarray:
    """A photograph shipped inside a package's wheel, as (H, W, 3) uint8 (grey ones repeated)."""
    if package == "skimage":
        import skimage.data

        photo = np.asarray(getattr(skimage.data, name)())
    elif package == "sklearn":
        from sklearn.datasets import load_sample_image

        photo = np.asarray(load_sample_image(name))
    else:
        raise ValueError(f"unknown background package {package!r}")
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    return np.ascontiguousarray(photo[..., :3]).astype(np.uint8)


def _generate(out: Path, params: dict[str, Any], *, progress: bool) -> None:
    seed = params["seed"]
    seed_words = list(seed) if isinstance(seed, list) else [seed]
    photos = {
        split: [_load_photo(*name.split(":", 1)) for name in params["backgrounds"][split]]
        for split in ("train", "val")
    }
    label_of = {name: i + 1 for i, name in enumerate(params["labelled"])}  # shape -> COCO category id
    categories = [{"id": i, "name": name, "supercategory": "shape"} for name, i in label_of.items()]

    jobs = [("train", i) for i in range(params["num_train"])] + [("val", i) for i in range(params["num_val"])]
    coco: dict[str, dict[str, Any]] = {
        split: {
            "info": {"description": "spa-harness built-in shapes", "params": params},
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
        rng = np.random.default_rng([*seed_words, split_code, i])
        image, boxes, distractors, background = _compose(rng, photos[split], params)
        name = f"{i:06d}.png"
        Image.fromarray(image).save(out / split / name, format="PNG")
        image_id = i + 1
        h, w = image.shape[:2]
        coco[split]["images"].append(
            {
                "id": image_id,
                "file_name": name,
                "width": w,
                "height": h,
                # Provenance, not ground truth: the photograph under the clutter and the unlabelled
                # shapes' boxes ``[x, y, w, h, shape]`` (a loader reads only the four keys above).
                "background": params["backgrounds"][split][background],
                "distractors": [list(d) for d in distractors],
            }
        )
        anns = coco[split]["annotations"]
        for x, y, bw, bh, shape in boxes:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": label_of[shape],
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    for split in ("train", "val"):
        with open(out / "annotations" / f"instances_{split}.json", "w") as f:
            json.dump(coco[split], f, sort_keys=True)


def _background(
    rng: np.random.Generator, photos: list[np.ndarray], size: int, strokes: list[int]
) -> tuple[np.ndarray, int]:
    """A cluttered (size, size, 3) float32 background and the index of its photograph: a random crop
    of the photograph (zoomed, flipped, tinted), then random strokes and arcs in random colours
    drawn over it."""
    which = int(rng.integers(len(photos)))
    photo = photos[which]
    zoom = rng.uniform(1.0, 3.0)  # crop a larger region and shrink it: varied texture scale
    side = min(photo.shape[0], photo.shape[1], int(size * zoom))
    y0 = int(rng.integers(0, photo.shape[0] - side + 1))
    x0 = int(rng.integers(0, photo.shape[1] - side + 1))
    crop = photo[y0 : y0 + side, x0 : x0 + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    image = np.asarray(
        Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.Resampling.BILINEAR)
    )
    image = image.astype(np.float32) * rng.uniform(0.7, 1.3, size=3)  # a colour cast per image
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(strokes[0], strokes[1] + 1))):
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = int(rng.integers(2))  # no filled blobs: one reads as a circle, a label it would not get
        x, y = rng.uniform(-0.1, 1.1, size=2) * size
        r = rng.uniform(0.03, 0.2) * size
        if kind == 0:  # a straight stroke
            a = rng.uniform(0, np.pi)
            draw.line(
                [(x - r * np.cos(a), y - r * np.sin(a)), (x + r * np.cos(a), y + r * np.sin(a))],
                fill=color,
                width=int(rng.integers(2, 8)),
            )
        else:  # an arc: a piece of a ring
            start = rng.uniform(0, 360)
            draw.arc(
                [x - r, y - r, x + r, y + r],
                start,
                start + rng.uniform(60, 270),
                fill=color,
                width=int(rng.integers(2, 8)),
            )
    return np.asarray(canvas, dtype=np.float32).copy(), which


def _compose(
    rng: np.random.Generator, photos: list[np.ndarray], params: dict[str, Any]
) -> tuple[np.ndarray, list[tuple[Any, ...]], list[tuple[Any, ...]], int]:
    """One image (H, W, 3) uint8, its labelled boxes ``(x, y, w, h, shape)``, the distractors' boxes
    (same form, unlabelled) and the index of its background photograph."""
    size = params["canvas"]
    background, which = _background(rng, photos, size, params["strokes"])
    canvas = Image.fromarray(np.clip(np.rint(background), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    n_obj = int(rng.integers(params["objects"][0], params["objects"][1] + 1))
    n_dis = int(rng.integers(params["distractors"][0], params["distractors"][1] + 1))
    # Objects and distractors in a random order, so neither is drawn on top of the other by rule.
    kinds = rng.permutation(np.array(["objects"] * n_obj + ["distractors"] * n_dis))
    placed: list[tuple[int, int, int, int]] = []
    boxes: list[tuple[Any, ...]] = []
    distractors: list[tuple[Any, ...]] = []
    for kind in kinds:
        names = params["labelled"] if kind == "objects" else params["distractor_shapes"]
        shape = names[int(rng.integers(len(names)))]
        for _attempt in range(30):
            r = rng.uniform(*params["shape_scale"]) * size / 2  # half the width across
            cx, cy = rng.uniform(r, size - r, size=2)
            points = _outline(shape, cx, cy, r, rng.uniform(0, 2 * np.pi))
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            x0, y0 = int(np.floor(max(0.0, min(xs)))), int(np.floor(max(0.0, min(ys))))
            x1, y1 = int(np.ceil(min(size, max(xs)))), int(np.ceil(min(size, max(ys))))
            box = (x0, y0, x1 - x0, y1 - y0)
            if (
                box[2] > 0
                and box[3] > 0
                and all(_overlap_xywh(box, b) <= params["max_overlap"] for b in placed)
            ):
                break
        else:
            continue
        fill = rng.integers(0, 256, size=3)
        draw.polygon(points, fill=tuple(int(c) for c in fill), outline=tuple(int(255 - c) for c in fill))
        placed.append(box)
        (boxes if kind == "objects" else distractors).append((*box, str(shape)))
    return np.asarray(canvas, dtype=np.uint8), boxes, distractors, which


def _outline(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """The polygon of ``shape`` centred at (cx, cy), ``r`` from the centre to its farthest point,
    rotated by ``rot`` radians."""
    if shape == "circle":
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        return [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
    corners = {"triangle": 3, "square": 4}
    if shape in corners:
        n = corners[shape]
        return [
            (cx + r * np.cos(rot + 2 * np.pi * k / n), cy + r * np.sin(rot + 2 * np.pi * k / n))
            for k in range(n)
        ]
    if shape == "star":  # five points, inner radius 0.45 r
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        return [
            (cx + q * np.cos(rot + np.pi * k / 5), cy + q * np.sin(rot + np.pi * k / 5))
            for k, q in enumerate(radii)
        ]
    if shape == "cross":  # arms 0.7 r wide
        w = 0.35 * r
        arms = [
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
        ]
        c, s = np.cos(rot), np.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in arms]
    raise ValueError(f"unknown shape {shape!r}")


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
