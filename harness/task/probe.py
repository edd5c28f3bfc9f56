"""The probe: one batch through a copy of the trial's model before it trains, so that a variant that
cannot train or cannot be measured fails in seconds, not after hours of training.

``probe(cfg, device)`` builds the trial's detector as training will (``build_detector``: the same
weights, its own selection streams), then on the trial's device and precision:

- forward: one training micro-batch (the first ``train.batch_size`` train images) in training mode,
  through the loss (a selection plugin, a supervision mode, a pack strategy all run);
- backward: that loss back to every parameter;
- FLOP trace: fvcore's count of the inference forward on the fixed evaluation batch, each real image
  size alone, as ``harness.task.measure`` counts after training (``fvcore_macs`` over
  ``real_images``): fvcore traces the model with ``torch.jit.trace``, where Python arithmetic on a
  shape sees a tensor.

A stage that raises re-raises its exception with a note naming the stage (``harness.errors.describe``
shows it in the row). The probe leaves no trace in the trial: its model is a separate copy, and the
RNG states it could draw from (torch's CPU and CUDA generators, Python's and NumPy's) are restored,
so a trial trains the same with or without it.
"""

from __future__ import annotations

import contextlib
import random
import time
from typing import Any

import numpy as np
import torch

from harness.config import TrialConfig
from harness.task.backend import autocast_dtype
from harness.task.data import build_datasets, fixed_batch, image_sizes, size_divisor
from harness.task.detector import build_detector
from harness.task.measure import fvcore_macs, real_images
from harness.task.train import to_device

__all__ = ["probe", "PROBE_STAGES"]

PROBE_STAGES = ("forward", "backward", "FLOP trace")


@contextlib.contextmanager
def _stage(name: str):
    try:
        yield
    except Exception as e:
        e.add_note(f"probe before training: {name} of one batch")
        raise


@contextlib.contextmanager
def _rng_kept(device: torch.device):
    """Every RNG state the probe could draw from, put back afterwards."""
    # NumPy's legacy global state: what a dataset's augmentation may draw from, kept as it was
    py, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)  # noqa: NPY002


def probe(cfg: TrialConfig, device: torch.device) -> dict[str, Any]:
    """Forward, backward and FLOP trace of one batch (see the module docstring); returns
    ``probe_s``, the seconds it took. Raises what a stage raises, with a note naming the stage."""
    t0 = time.perf_counter()
    train_ds, val_ds = build_datasets(cfg.data, progress=False)
    amp = autocast_dtype(cfg.train.precision, device)
    with _rng_kept(device):
        model = build_detector(cfg).to(device).train()
        try:
            images, targets = fixed_batch(train_ds, cfg.train.batch_size, size_divisor(cfg))
            images, targets = images.to(device), to_device(targets, device)
            with _stage("forward"):
                with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
                    loss = model(images, targets, image_sizes(images, targets))["loss"]
            with _stage("backward"):
                loss.backward()
            del loss
            model.zero_grad(set_to_none=True)
            bench, bench_targets = fixed_batch(val_ds, cfg.bench.batch_size, size_divisor(cfg))
            with _stage("FLOP trace"):
                for part in real_images(bench.to(device), bench_targets):
                    fvcore_macs(model.eval(), part)
        finally:
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"probe_s": time.perf_counter() - t0}
