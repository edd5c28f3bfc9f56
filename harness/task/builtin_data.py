"""The built-in detection set: typeset digits among look-alike distractors on cluttered photographs,
generated once and cached.

It needs no download. Objects are the digits of ``LABELLED_DIGITS`` (0-4), typeset in one of ten
fonts that matplotlib ships (DejaVu and STIX: sans, serif, mono, bold, oblique), rotated up to 15
degrees, scaled to 12-45% of the canvas (15-58 px at 128) and pasted with their own ink as alpha
(so each box is tight), in a colour that contrasts with what lies under them. Digits 5-9 are pasted
the same way, in the same fonts, sizes and colours, and left unlabelled: a detector (and a gate)
must recognise a digit's shape, not find ink. Backgrounds are crops of real photographs that
scikit-image and scikit-learn ship in their wheels, zoomed, flipped and tinted, with procedural
clutter (strokes, arcs, blobs in random colours) drawn over them. The photographs are split
between training and validation, so validation backgrounds are scenes that training never saw.
``glyphs: handwritten`` (``_GLYPHS``) pastes scikit-learn's 8x8 handwritten digits instead.

Every image comes from its own generator, seeded by (seed, split, index): the first images of a
larger set are a smaller set's. Each image entry records its photograph (``background``) and its
unlabelled digits' boxes (``distractors``), as provenance that no loader reads. The set is written
once as PNG images + COCO instances JSON under a folder named by a content hash of the generation
parameters (the generator's version among them), and reused; the task reads it with the same loader
as any COCO set on disk (``harness.task.coco.CocoDetection``).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from harness.config import DataConfig

__all__ = ["builtin_dataset", "builtin_params", "background_names", "LABELLED_DIGITS"]

# Generation parameters beyond DataConfig; all of them go into the cache folder's content hash, so
# changing any (or the generator itself: bump the version) makes a new folder instead of reusing.
_BUILTIN_VERSION = 2
_CANVAS = 128  # every image is _CANVAS x _CANVAS: no padding wasted at data.image_size 128
LABELLED_DIGITS = (0, 1, 2, 3, 4)  # the classes that are objects; digits 5-9 are unlabelled distractors
_OBJECTS = (1, 3)  # labelled digits per image (inclusive range)
_DISTRACTORS = (1, 3)  # unlabelled digits per image
_DIGIT_SCALE = (0.12, 0.45)  # digit height as a fraction of the canvas: 15-58 px at 128
_MAX_OVERLAP = 0.1  # a pasted digit covers at most this fraction of the smaller box: none is hidden
_INK = 0.2  # alpha above this is the digit; its extent is the box
_FRINGE = 0.25  # scaled ink below this is transparent, above 1 - this opaque
_VAL_DIGIT_FRACTION = 0.2  # val digits are other writers' digits than train's
_STROKES = (4, 12)  # procedural clutter items per image
_GLYPHS = "fonts"  # "fonts": digits typeset in matplotlib's fonts; "handwritten": scikit-learn's 8x8 digits
_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif-Italic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
)
_ROTATION = 15.0  # degrees, either way
# Photographs by split: (package, name). Validation scenes are never cropped for training.
_TRAIN_BACKGROUNDS = (
    ("skimage", "astronaut"),
    ("skimage", "brick"),
    ("skimage", "camera"),
    ("skimage", "chelsea"),
    ("skimage", "coffee"),
    ("skimage", "grass"),
    ("skimage", "hubble_deep_field"),
    ("skimage", "immunohistochemistry"),
    ("skimage", "rocket"),
    ("skimage", "page"),
    ("sklearn", "china.jpg"),
)
_VAL_BACKGROUNDS = (
    ("skimage", "coins"),
    ("skimage", "gravel"),
    ("skimage", "moon"),
    ("skimage", "retina"),
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
        "labelled": list(LABELLED_DIGITS),
        "objects": list(_OBJECTS),
        "distractors": list(_DISTRACTORS),
        "digit_scale": list(_DIGIT_SCALE),
        "max_overlap": _MAX_OVERLAP,
        "ink": _INK,
        "fringe": _FRINGE,
        "val_digit_fraction": _VAL_DIGIT_FRACTION,
        "strokes": list(_STROKES),
        "glyphs": _GLYPHS,
        "fonts": list(_FONTS),
        "rotation": _ROTATION,
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
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = (digits.images / 16.0).astype(np.float32)  # (1797, 8, 8) in [0, 1]
    seed = params["seed"]
    seed_words = list(seed) if isinstance(seed, list) else [seed]
    order = np.random.default_rng([*seed_words, 0]).permutation(len(ink))
    n_val_digits = int(round(len(ink) * params["val_digit_fraction"]))
    writers = {"val": order[:n_val_digits], "train": order[n_val_digits:]}
    labelled = set(params["labelled"])
    pools = {
        split: {
            "objects": np.array([k for k in idx if int(digits.target[k]) in labelled]),
            "distractors": np.array([k for k in idx if int(digits.target[k]) not in labelled]),
        }
        for split, idx in writers.items()
    }
    photos = {
        split: [_load_photo(*name.split(":", 1)) for name in params["backgrounds"][split]]
        for split in ("train", "val")
    }
    label_of = {d: i + 1 for i, d in enumerate(params["labelled"])}  # digit -> COCO category id
    categories = [{"id": label_of[d], "name": str(d), "supercategory": "digit"} for d in params["labelled"]]

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
        rng = np.random.default_rng([*seed_words, split_code, i])
        image, boxes, distractors, background = _compose(
            rng, ink, digits.target, pools[split], photos[split], params
        )
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
                # digits' boxes ``[x, y, w, h, digit]`` (a loader reads only the four keys above).
                "background": params["backgrounds"][split][background],
                "distractors": [list(d) for d in distractors],
            }
        )
        anns = coco[split]["annotations"]
        for x, y, bw, bh, digit in boxes:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": label_of[digit],
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
    of the photograph (zoomed, flipped, tinted), then random strokes, arcs and blobs in random colours
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
    image = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR))
    image = image.astype(np.float32) * rng.uniform(0.7, 1.3, size=3)  # a colour cast per image
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(strokes[0], strokes[1] + 1))):
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = int(rng.integers(3))
        x, y = rng.uniform(-0.1, 1.1, size=2) * size
        r = rng.uniform(0.03, 0.2) * size
        if kind == 0:  # a straight stroke of digit-like width
            a = rng.uniform(0, np.pi)
            draw.line(
                [(x - r * np.cos(a), y - r * np.sin(a)), (x + r * np.cos(a), y + r * np.sin(a))],
                fill=color,
                width=int(rng.integers(2, 8)),
            )
        elif kind == 1:  # an arc: a piece of a ring, digit-like curvature
            start = rng.uniform(0, 360)
            draw.arc(
                [x - r, y - r, x + r, y + r],
                start,
                start + rng.uniform(60, 270),
                fill=color,
                width=int(rng.integers(2, 8)),
            )
        else:  # a filled blob
            draw.ellipse([x - r / 2, y - r / 3, x + r / 2, y + r / 3], fill=color)
    return np.asarray(canvas, dtype=np.float32).copy(), which


def _compose(
    rng: np.random.Generator,
    ink: np.ndarray,
    classes: np.ndarray,
    pool: dict[str, np.ndarray],
    photos: list[np.ndarray],
    params: dict[str, Any],
) -> tuple[np.ndarray, list[tuple[int, ...]], list[tuple[int, ...]], int]:
    """One image (H, W, 3) uint8, its labelled boxes ``(x, y, w, h, digit)``, the distractors' boxes
    (same form, unlabelled) and the index of its background photograph."""
    size = params["canvas"]
    image, background = _background(rng, photos, size, params["strokes"])
    n_obj = int(rng.integers(params["objects"][0], params["objects"][1] + 1))
    n_dis = int(rng.integers(params["distractors"][0], params["distractors"][1] + 1))
    # Objects and distractors in a random order, so neither is pasted on top of the other by rule.
    kinds = rng.permutation(np.array(["objects"] * n_obj + ["distractors"] * n_dis))
    placed: list[tuple[int, int, int, int]] = []
    boxes: list[tuple[int, int, int, int, int]] = []
    distractors: list[tuple[int, int, int, int, int]] = []
    for kind in kinds:
        k = int(pool[kind][int(rng.integers(len(pool[kind])))])
        ph = int(round(rng.uniform(*params["digit_scale"]) * size))
        if params["glyphs"] == "fonts":
            alpha = _typeset(rng, int(classes[k]), ph, params)
            ph, pw = alpha.shape
        else:
            pw = int(round(ph * rng.uniform(0.7, 1.0)))  # the digits are taller than wide, as written
            alpha = np.asarray(
                Image.fromarray(ink[k], mode="F").resize((pw, ph), Image.BICUBIC), dtype=np.float32
            )
            # Faint ink (the scan's grey fringe, bicubic's ringing) is dropped, strokes saturate: the
            # digit has a crisp edge and nothing of its rectangular patch shows.
            alpha = np.clip((alpha - params["fringe"]) / (1.0 - 2 * params["fringe"]), 0.0, 1.0)
        rows, cols = np.nonzero(alpha > params["ink"])
        if rows.size == 0:
            continue
        by0, by1, bx0, bx1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        for _attempt in range(30):
            py = int(rng.integers(-int(by0), size - int(by1) + 1))
            px = int(rng.integers(-int(bx0), size - int(bx1) + 1))
            box = (px + int(bx0), py + int(by0), int(bx1 - bx0), int(by1 - by0))
            if all(_overlap_xywh(box, b) <= params["max_overlap"] for b in placed):
                break
        else:
            continue
        # The part of the digit's patch inside the canvas (the box itself always is).
        ya, yb, xa, xb = max(py, 0), min(py + ph, size), max(px, 0), min(px + pw, size)
        a = alpha[ya - py : yb - py, xa - px : xb - px, None]
        patch = image[ya:yb, xa:xb]
        # Ink that contrasts with what is under it: light digits on dark ground and vice versa.
        light = patch[a[..., 0] > params["ink"]].mean() < 110
        color = rng.uniform(190, 255, size=3) if light else rng.uniform(0, 60, size=3)
        image[ya:yb, xa:xb] = patch * (1 - a) + color.astype(np.float32) * a
        placed.append(box)
        (boxes if kind == "objects" else distractors).append((*box, int(classes[k])))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), boxes, distractors, background


@functools.cache
def _font(name: str, px: int):
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), px)


def _typeset(rng: np.random.Generator, digit: int, height: int, params: dict[str, Any]) -> np.ndarray:
    """Alpha (h, w) float32 of ``digit`` in a random font of ``params['fonts']``, rotated, its ink
    ``height`` px tall."""
    name = params["fonts"][int(rng.integers(len(params["fonts"])))]
    font = _font(name, 96)
    canvas = Image.new("L", (160, 160), 0)
    ImageDraw.Draw(canvas).text((80, 80), str(digit), fill=255, font=font, anchor="mm")
    canvas = canvas.rotate(rng.uniform(-params["rotation"], params["rotation"]), Image.BICUBIC)
    ink = np.asarray(canvas)
    rows, cols = np.nonzero(ink > 127)
    glyph = canvas.crop((cols.min(), rows.min(), cols.max() + 1, rows.max() + 1))
    scale = height / glyph.height
    width = max(2, int(round(glyph.width * scale * rng.uniform(0.85, 1.15))))
    return np.asarray(glyph.resize((width, height), Image.BILINEAR), dtype=np.float32) / 255.0


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
