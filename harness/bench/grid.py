"""``python -m harness.bench grid GRID``: the forward SPA changes (``harness.task.measure.InferenceForward``:
backbone and head, without the score threshold and NMS, whose cost follows how many boxes an untrained
head lets through) of every model of a grid file in one process, the models called in rotation, so that
dense and SPA are timed under the same load (a grid's own ``forward_ms`` is timed per trial, while other
trials share the machine)."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

from harness.bench.common import Runner, Timing
from harness.grid import load_grid
from harness.task.data import build_datasets, fixed_batch, image_sizes, size_divisor
from harness.task.detector import build_detector
from harness.task.measure import InferenceForward
from harness.task.timing import quartiles

__all__ = ["GridRunner"]


class GridRunner(Runner):
    """One row per model of the grid at ``path`` (one per variant: the first seed's trial of each
    name). The models are untrained: top-k and random keep their ratio exactly, a gate keeps what an
    untrained gate keeps. The batch is the grid's fixed evaluation batch (``bench.batch_size`` val
    images), as in a trial; ``speedup``: the dense model's median time over this model's (None
    without a variant named ``dense``)."""

    def __init__(self, path: str | Path, timing: Timing | None = None) -> None:
        self.timing = timing or Timing(reps=40, clock="cpu")
        self.grid = load_grid(path)
        cfg0 = self.grid.trials[0]
        _, val_ds = build_datasets(cfg0.data, progress=False)
        # (B, 3, H, W); a keep-ratio grid's padded to its largest image, the padding known to every model
        self.images, targets = fixed_batch(val_ds, cfg0.bench.batch_size, size_divisor(cfg0))
        self.sizes = image_sizes(self.images, targets)

    def rows(self) -> Iterator[dict[str, Any]]:
        models = {}
        for cfg in self.grid.trials:
            if cfg.name in models:  # another seed of a variant already built
                continue
            torch.manual_seed(cfg.seed)
            models[cfg.name] = build_detector(cfg).eval()
        kept = {}
        with torch.inference_mode():
            for name, m in models.items():
                blocks = m(self.images, None, self.sizes)["backbone"].blocks
                kept[name] = statistics.fmean(float(b.kept_fraction) for b in blocks) if blocks else 1.0
        times = self.timing.time(
            {n: partial(InferenceForward(m), self.images, self.sizes) for n, m in models.items()}
        )
        base = statistics.median(times["dense"]) if "dense" in times else None
        for name in models:
            q1, med, q3 = quartiles(times[name])
            yield {
                "grid": self.grid.name,
                "model": name,
                "kept_fraction": round(kept[name], 4),
                "batch": int(self.images.shape[0]),
                "ms": round(1e3 * med, 3),
                "ms_q1": round(1e3 * q1, 3),
                "ms_q3": round(1e3 * q3, 3),
                "speedup": round(base / med, 4) if base else None,
                **self.timing.env(),
            }

    def title(self, machine: str) -> str:
        return (
            f"{self.grid.name}: backbone and head forward (no score threshold, no NMS), batch {int(self.images.shape[0])}, {machine}, "
            f"{self.timing.clock} clock, {self.timing.reps} rounds, untrained models; median (interquartile range)"
        )

    def header(self) -> str:
        return "| model | kept | ms (IQR) | dense / model |\n|---|---|---|---|"

    def format_row(self, r: dict[str, Any]) -> str:
        ratio = f"{r['speedup']:.2f}x" if r["speedup"] else "n/a"
        return f"| {r['model']} | {r['kept_fraction']:.3f} | {r['ms']:.1f} ({r['ms_q1']:.1f}-{r['ms_q3']:.1f}) | {ratio} |"
