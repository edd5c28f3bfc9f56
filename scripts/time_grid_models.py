"""Time the inference forward of every model of a grid in one process, the models called in rotation,
so that dense and SPA are timed under the same load (a grid's own ``infer_ms`` is timed per trial,
while other trials share the machine).

    .venv/bin/python scripts/time_grid_models.py ablations/grids/default.yaml [--threads 1] [--rounds 40]

The models are untrained: top-k and random selection keep their ratio exactly, but a gate keeps what an
untrained gate keeps (its kept fraction is printed). The batch is the grid's fixed evaluation batch
(``bench.batch_size`` val images), as in a trial.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import partial

import torch

from harness.grid import load_grid
from harness.task.data import build_datasets, fixed_batch
from harness.task.detector import build_detector
from kernels.bench import CLOCKS, time_in_rotation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("grid")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    clock = CLOCKS[a.clock]
    grid = load_grid(a.grid)
    cfg0 = grid.trials[0]
    _, val_ds = build_datasets(cfg0.data, progress=False)
    images, _ = fixed_batch(val_ds, cfg0.bench.batch_size)
    models = {}
    for cfg in grid.trials:
        torch.manual_seed(cfg.seed)
        models[cfg.name] = build_detector(cfg).eval()
    names = list(models)
    kept = {}
    with torch.inference_mode():
        for name, m in models.items():
            blocks = m(images)["backbone"].blocks
            kept[name] = statistics.fmean(float(b.kept_fraction) for b in blocks) if blocks else 1.0
    times = time_in_rotation({n: partial(m, images) for n, m in models.items()}, a.rounds, a.warmup, clock)
    base = statistics.median(times["dense"]) if "dense" in times else None
    print(
        f"{grid.name}: inference forward, batch {images.shape[0]}, {torch.get_num_threads()} threads, "
        f"{a.clock} clock, {a.rounds} rounds, untrained models; median (interquartile range)"
    )
    print("| model | kept | ms (IQR) | dense / model |")
    print("|---|---|---|---|")
    for name in names:
        q1, med, q3 = statistics.quantiles(times[name], n=4, method="inclusive")
        ratio = f"{base / med:.2f}x" if base else "n/a"
        print(f"| {name} | {kept[name]:.3f} | {1e3 * med:.1f} ({1e3 * q1:.1f}-{1e3 * q3:.1f}) | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
