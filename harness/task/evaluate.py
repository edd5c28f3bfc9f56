"""Evaluation: COCO box mAP through pycocotools, and the SPA gate's selection quality.

``coco_map`` runs the official COCOeval (bbox) quietly and returns AP, AP50, AP75 and AP by object
size. ``GateMeter`` accumulates, per image, how the selected token set of every SPA block compares
with the selection labels (precision, recall, F1) and how much each block keeps; ``summary()``
gives the mean and the spread (standard deviation) over images.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

__all__ = [
    "MAP_KEYS",
    "coco_map",
    "to_coco_detections",
    "ground_truth_detections",
    "random_detections",
    "GateMeter",
]

# COCOeval.stats[0:6] in order.
MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")
_AREA_RANGES = {"map_small": (0, 32**2), "map_medium": (32**2, 96**2), "map_large": (96**2, 1e10)}


def coco_map(
    coco_gt, detections: list[dict[str, Any]], image_ids: Iterable[int] | None = None
) -> dict[str, float]:
    """COCO bbox mAP of ``detections`` (COCO results: ``image_id``, ``category_id``, ``bbox`` xywh in
    original pixels, ``score``) against ``coco_gt`` (a pycocotools ``COCO``), over ``image_ids``
    (default: all). Returns ``MAP_KEYS`` in [0, 1]; a size range without ground truth is NaN
    (pycocotools' -1), and no detections at all score 0.

    Raises ``ValueError`` for input pycocotools would score silently wrong: ground truth whose
    annotation ids repeat (its index keeps one of each), or a detection naming an image or category
    the ground truth lacks, or with a non-finite box or score."""
    from pycocotools.cocoeval import COCOeval

    _check_gt(coco_gt)
    ids = sorted(coco_gt.getImgIds() if image_ids is None else set(image_ids))
    keep = set(ids)
    _check_detections(coco_gt, detections)
    dets = [dict(d) for d in detections if d["image_id"] in keep]  # loadRes writes into its input
    if not dets:  # loadRes cannot take an empty list
        return {
            k: (0.0 if k not in _AREA_RANGES or _has_gt(coco_gt, ids, *_AREA_RANGES[k]) else math.nan)
            for k in MAP_KEYS
        }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {k: (float(v) if v >= 0 else math.nan) for k, v in zip(MAP_KEYS, ev.stats[:6])}


def _check_gt(coco_gt) -> None:
    anns = coco_gt.dataset.get("annotations", [])
    if len(coco_gt.anns) != len(anns):
        counts = Counter(a.get("id") for a in anns)
        repeated = sorted((i for i, n in counts.items() if n > 1), key=str)[:5]
        raise ValueError(
            f"ground truth annotation ids repeat ({', '.join(map(str, repeated))}): pycocotools "
            "would score against one of each; load it with harness.task.coco.CocoDetection"
        )


def _check_detections(coco_gt, detections: list[dict[str, Any]]) -> None:
    images, cats = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    for d in detections:
        if d["image_id"] not in images or d["category_id"] not in cats:
            raise ValueError(f"detection {d!r} names an image or category the ground truth lacks")
        if not all(math.isfinite(v) for v in (*d["bbox"], d["score"])):
            raise ValueError(f"detection {d!r} has a non-finite box or score")


def _has_gt(coco_gt, ids: list[int], lo: float, hi: float) -> bool:
    anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=ids, iscrowd=False))
    return any(lo <= a["area"] < hi for a in anns)


def to_coco_detections(
    detections: list[dict[str, torch.Tensor]], targets: list[dict[str, Any]], label_to_cat: list[int]
) -> list[dict[str, Any]]:
    """Detector output in resized-image pixels -> COCO results in original-image pixels.

    ``detections[i]``: ``boxes (n, 4)`` xyxy, ``scores (n,)``, ``labels (n,)`` 0-based; ``targets[i]``
    carries ``image_id``, ``scale`` and ``orig_size`` (h, w); ``label_to_cat`` maps a label to its
    COCO category id."""
    out = []
    for det, tgt in zip(detections, targets):
        h, w = tgt["orig_size"]
        boxes = det["boxes"].detach().float().cpu() / tgt["scale"]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        wh = boxes[:, 2:] - boxes[:, :2]
        for box, size, score, label in zip(
            boxes.tolist(), wh.tolist(), det["scores"].tolist(), det["labels"].tolist()
        ):
            if size[0] <= 0 or size[1] <= 0:
                continue
            out.append(
                {
                    "image_id": int(tgt["image_id"]),
                    "category_id": int(label_to_cat[int(label)]),
                    "bbox": [box[0], box[1], size[0], size[1]],
                    "score": float(score),
                }
            )
    return out


def ground_truth_detections(coco_gt, *, shift: float = 0.0) -> list[dict[str, Any]]:
    """The ground truth as COCO results (score 1), optionally shifted right by ``shift`` box widths."""
    out = []
    for a in coco_gt.loadAnns(coco_gt.getAnnIds(iscrowd=False)):
        x, y, w, h = a["bbox"]
        out.append(
            {
                "image_id": a["image_id"],
                "category_id": a["category_id"],
                "bbox": [x + shift * w, y, w, h],
                "score": 1.0,
            }
        )
    return out


def random_detections(coco_gt, *, per_image: int = 20, seed: int = 0) -> list[dict[str, Any]]:
    """A chance baseline: ``per_image`` random boxes per image with random classes and scores, sized
    like the ground truth (box sides drawn from the range the set's boxes span)."""
    rng = np.random.default_rng(seed)
    anns = coco_gt.loadAnns(coco_gt.getAnnIds(iscrowd=False))
    sides = np.array([a["bbox"][2:] for a in anns], dtype=np.float64).reshape(-1, 2)
    lo, hi = (sides.min(0), sides.max(0)) if len(sides) else (np.array([4.0, 4.0]), np.array([32.0, 32.0]))
    cats = sorted(coco_gt.getCatIds())
    out = []
    for img in coco_gt.loadImgs(sorted(coco_gt.getImgIds())):
        for _ in range(per_image):
            w, h = (float(min(v, s)) for v, s in zip(rng.uniform(lo, hi), (img["width"], img["height"])))
            x = float(rng.uniform(0, img["width"] - w))
            y = float(rng.uniform(0, img["height"] - h))
            out.append(
                {
                    "image_id": img["id"],
                    "category_id": int(cats[rng.integers(len(cats))]),
                    "bbox": [x, y, w, h],
                    "score": float(rng.uniform()),
                }
            )
    return out


class GateMeter:
    """Per-image gate metrics over a dataset, fed batch by batch.

    ``update(blocks, labels)``: ``blocks`` are the backbone's ``SPABlockInfo`` (``stage``, ``index``,
    ``mask (B, N)`` bool, ``grid (H, W)``, ``valid (B, N)`` bool real tokens or None), ``labels``
    ``{(H, W): (B, H, W) float}`` selection labels. Batch padding (``valid`` False) counts nowhere: it
    is never selected and never labelled, and shares are of an image's real tokens.
    Per image, the counts of all SPA blocks are pooled: precision = |selected & labelled| / |selected|,
    recall = |selected & labelled| / |labelled|, F1 their harmonic mean (an image that selects
    nothing has no precision, one without labelled tokens no recall: left out of that mean).
    ``kept_fraction`` is the selected share of the real SPA-block tokens of an image; per block too.
    """

    def __init__(self) -> None:
        self._per_image: dict[str, list[float]] = defaultdict(list)
        self._per_block: dict[str, list[float]] = defaultdict(list)

    def update(self, blocks: list[Any], labels: dict[tuple[int, int], torch.Tensor] | None) -> None:
        if not blocks:
            return
        B = blocks[0].mask.shape[0]
        tp = sel = pos = torch.zeros(B, dtype=torch.long)  # per image, over all SPA blocks
        tokens: torch.Tensor | int = 0
        for blk in blocks:
            mask = blk.mask.detach().bool().cpu()  # (B, N)
            valid = getattr(blk, "valid", None)
            real = mask.shape[1] if valid is None else valid.detach().cpu().sum(1)  # (B,) or N
            kept = mask.sum(1) / torch.as_tensor(real).clamp(min=1)  # (B,)
            self._per_block[f"kept_fraction_s{blk.stage}b{blk.index}"].extend(kept.tolist())
            tokens = tokens + real
            sel = sel + mask.sum(1)
            if labels is not None:
                y = labels[tuple(blk.grid)].detach().cpu().reshape(mask.shape[0], -1) > 0.5  # (B, N)
                tp = tp + (mask & y).sum(1)
                pos = pos + y.sum(1)
        tokens = torch.as_tensor(tokens).clamp(min=1)  # (B,)
        self._per_image["kept_fraction"].extend((sel.float() / tokens).tolist())
        if labels is None:
            return
        tp, sel, pos = tp.double(), sel.double(), pos.double()
        nan = torch.full_like(tp, math.nan)
        precision = torch.where(sel > 0, tp / sel.clamp(min=1), nan)
        recall = torch.where(pos > 0, tp / pos.clamp(min=1), nan)
        f1 = torch.where((sel + pos) > 0, 2 * tp / (sel + pos).clamp(min=1), nan)
        self._per_image["gate_precision"].extend(precision.tolist())
        self._per_image["gate_recall"].extend(recall.tolist())
        self._per_image["gate_f1"].extend(f1.tolist())
        self._per_image["label_fraction"].extend((pos / tokens).tolist())

    def summary(self) -> dict[str, float]:
        """``gate_precision``, ``gate_recall``, ``gate_f1``, ``kept_fraction``, ``label_fraction`` (means
        over images) with ``*_std`` (spread over images), and ``kept_fraction_s{stage}b{index}``."""
        out: dict[str, float] = {}
        for key in ("gate_precision", "gate_recall", "gate_f1", "kept_fraction", "label_fraction"):
            vals = np.array([v for v in self._per_image.get(key, []) if not math.isnan(v)], dtype=np.float64)
            out[key] = float(vals.mean()) if vals.size else math.nan
            out[f"{key}_std"] = float(vals.std()) if vals.size else math.nan
        for key, per_image in sorted(self._per_block.items()):
            out[key] = float(np.mean(per_image))
        return out
