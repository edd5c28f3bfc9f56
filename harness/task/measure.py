"""Per-trial measurements beyond the task metrics: FLOPs, timings, memory, parameters.

Timings on one fixed evaluation batch (the first ``bench.batch_size`` val images, the same for every
variant), FLOPs on the first ``bench.flop_images`` val images (all of them when the split is smaller;
``flop_images`` the number counted), after training, with the trial's real selection (the trained
gate, or top-k / random).

What SPA changes is the forward: the backbone and the detection head (``InferenceForward``). The
detector's inference call adds the postprocessing (score threshold, NMS), whose cost depends on how
many boxes pass the threshold, so on how far the model has trained rather than on SPA: an untrained
head scores every location about 0.07, above the 0.05 threshold, and sends 100 boxes per image to
NMS, while a trained one sends few. The speedup and ``forward_ms`` therefore time
``InferenceForward`` only, the same graph fvcore counts; ``infer_ms`` keeps the whole call, for the
latency a user of the detector sees.

- ``gmacs``: fvcore's count of the inference forward (backbone + detection head; NMS excluded), per
  image, in GMACs (fvcore counts one multiply-add as one flop); ``backbone_gmacs`` the backbone's share;
  ``fvcore_attn_gmacs`` the share of the attention modules and gates of every block (Swin and SPA).
  Counted on each image at its own size (the images of one size together): a keep-ratio batch's
  padding is not counted, so the dense model is not charged for padding that SPA never selects and a
  GMACs delta is selection's alone (``bench_padding_fraction``: the share of the timed batch's pixels
  that is padding; a ``square`` batch has none, its padding being part of each image);
- ``analytic_attn_gmacs``: the same modules by formula, per image, from the kept counts of the same
  images: Swin blocks W-MSA over the padded map, ``B(4 N_p C^2 + 2 M^2 N_p C)``; SPA blocks their pack
  strategy's ``attention_macs`` (the projections on the packed tokens and attention over the
  sequences the strategy runs: ``spa_core.strategies``) plus the gate's scorer ``BNC``. It follows the kept tokens and
  equals ``fvcore_attn_gmacs`` (a difference means a kernel computes other than its formula says);
  the paper's container formula, an upper bound of it, is in ``spa_core/strategies.py``;
- ``forward_ms``: median wall time of ``InferenceForward`` (backbone and head, no postprocessing) on
  the trial's model, under ``train.precision``'s autocast; ``infer_ms``: of the whole inference call
  through the DeepSpeed engine (postprocessing included); ``train_step_ms``: of one training
  micro-step (forward, backward, optimizer step through the engine); each after ``bench.warmup`` runs,
  over ``bench.repeats``; ``*_iqr`` the inter-quartile range; ``*_samples_per_s`` from the median (a
  training step counts the samples of every worker). The timed batches are padded, their padding known
  to the model: the dense model computes it, SPA never selects it (``bench_padding_fraction``);
- ``speedup_vs_dense`` (``paired_speedup``, last, after the peak memory is read): ``InferenceForward``
  of the trial's model and of the grid's baseline model timed in this process, calls alternating and
  which goes first alternating, ``bench.repeats`` pairs after ``bench.warmup``: the median over pairs
  of baseline time / model time (``harness.task.timing.time_in_rotation``), ``*_q1`` / ``*_q3`` its quartiles, ``paired_model_ms`` /
  ``paired_dense_ms`` the medians, ``speedup_timed`` what was timed (``SPEEDUP_TIMED``). The baseline
  (``speedup_baseline_config``) is the grid's dense point (``cfg.baseline``, attached by the grid: for
  the paper's grid plain Swin-T, without the 4 extra stage-3 blocks the SPA model pays for), so the
  speedup and the GMACs delta of a row are against the same model; a trial of a grid without a dense
  point falls back to its dense twin (its own config with ``model.variant: dense``, extra blocks
  kept). ``speedup_baseline`` names which: the baseline trial's name, or ``dense-twin``. The baseline
  is built as ``build_detector`` builds every model (the initial weights of the seed), untrained: the
  forward's time does not depend on the weights (the postprocessing's would). Both
  run under the same load, which ``infer_ms`` of two trials do not (other trials train beside them),
  and both as plain modules: under ZeRO-3 the trial's model is timed as a plain copy of its gathered
  weights (``timing_copy``), without the hooks ZeRO-3 runs around every submodule;
- ``peak_mem_mb``: peak resident set of the process (CPU; reset at the trial's start where Linux
  allows) or ``torch.cuda.max_memory_allocated`` (CUDA), ``peak_mem_kind`` says which;
- ``backbone_params`` (the task reports ``num_params`` for the whole detector).

Each measurement runs on its own (``MEASUREMENTS``): one that fails gives no columns and is returned
by name with its exception, the others still run, and the trial keeps its trained metrics
(``harness.run.worker`` records the failure in the row). A trial finds most such failures before it
trains: ``harness.task.probe`` runs a forward, a backward and the FLOP trace on one batch first.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
import warnings
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch
from fvcore.nn import FlopCountAnalysis
from torch import nn

import kernels
from harness.task.backend import autocast_dtype
from harness.task.data import build_datasets, fixed_batch, image_sizes, size_divisor
from harness.task.detector import Detector, build_detector
from harness.task.timing import quartiles, time_in_rotation
from harness.task.train import to_device
from spa_core.backbone import stage_grids
from spa_core.contracts import check_attention_macs
from spa_core.registry import PACK_STRATEGIES

__all__ = [
    "MEASUREMENTS",
    "measure",
    "paired_speedup",
    "reset_peak_memory",
    "peak_memory",
    "fvcore_macs",
    "analytic_attention_macs",
    "timed",
    "dense_twin_config",
    "speedup_baseline_config",
    "timing_copy",
    "zero3_partitioned",
    "InferenceForward",
    "DENSE_TWIN",
    "SPEEDUP_TIMED",
]

DENSE_TWIN = "dense-twin"  # ``speedup_baseline`` of a trial timed against its own dense twin
SPEEDUP_TIMED = "backbone+head"  # ``speedup_timed``: what the speedup times (no score threshold, no NMS)


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak-memory window (CUDA stats; on Linux, VmHWM via /proc/self/clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # no reset: the peak then covers the process's life


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(peak MiB, kind) since ``reset_peak_memory``."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024, "rss_peak"
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_peak"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Median and IQR (ms) of ``fn()`` over ``max(1, repeats)`` runs after ``warmup`` runs."""
    times = time_in_rotation({"fn": fn}, max(1, repeats), warmup, sync=partial(_sync, device))["fn"]
    q1, med, q3 = quartiles([1e3 * t for t in times])
    return {"median": med, "iqr": q3 - q1}


class InferenceForward(nn.Module):
    """The part of the detector's inference that SPA changes: backbone and head, tensors out, without
    the postprocessing (score threshold and NMS: a data-dependent loop whose cost follows the number of
    boxes above the threshold, so the training, and does no multiply-adds worth counting). What fvcore
    counts and what the timings time. Every backbone feature is an output too, read by the head or
    not: a trace drops work whose result reaches no output, and the eager forward computes all four
    stages (fvcore would otherwise leave out, say, the layer norm of a stage the head does not read).

    ``forward(images: (B, 3, H, W), image_sizes: (B, 2) | None)`` -> per head level ``cls (B, K, h,
    w)``, then every ``ltrb (B, 4, h, w)``, every ``ctr (B, 1, h, w)``, then the backbone's four stage
    features. ``image_sizes``: each image's real extent in a padded batch (``harness.task.data``)."""

    def __init__(self, detector: Detector) -> None:
        super().__init__()
        self.detector = detector

    def forward(
        self, images: torch.Tensor, image_sizes: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        bb = self.detector.backbone(images, image_sizes)
        feats = [bb.features[s - 1] for s in self.detector.in_stages]
        cls, ltrb, ctr = self.detector.head(feats)
        return (*cls, *ltrb, *ctr, *bb.features)


def fvcore_macs(detector: Detector, images: torch.Tensor) -> dict[str, Any]:
    """fvcore multiply-adds of the inference forward on ``images``: total, backbone, attention+gates
    (summed over the batch), and the ops fvcore could not count."""
    graph = InferenceForward(detector).eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about data-dependent shapes
        fca = FlopCountAnalysis(graph, (images,)).set_op_handle(**kernels.FVCORE_HANDLES)
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        fca.tracer_warnings("none")
        total = fca.total()
        by_module = fca.by_module()
        unsupported: Counter[str] = Counter(fca.unsupported_ops())
    attn = sum(
        v
        for k, v in by_module.items()
        if k.startswith("detector.backbone.") and (k.endswith(".attn") or k.endswith(".gate"))
    )
    return {
        "total": total,
        "backbone": by_module.get("detector.backbone", 0),
        "attn": attn,
        "unsupported": ",".join(f"{k}:{n}" for k, n in sorted(unsupported.items())),
    }


def analytic_attention_macs(cfg, blocks: list[Any], image_hw: tuple[int, int], batch: int) -> float:
    """Multiply-adds of the backbone's attention modules and gates by formula, summed over its blocks,
    for a batch of ``batch`` images of ``image_hw`` with the kept counts in ``blocks``
    (``SPABlockInfo`` list): W-MSA over the padded map for Swin blocks (its projections run on the
    padded tokens too), the pack strategy's ``attention_macs`` for SPA blocks (checked: a finite
    number >= 0)."""
    m = cfg.model
    depths = list(m.depths)
    depths[2] += m.extra_stage3_blocks
    grids = stage_grids(image_hw, m.patch_size)
    spa_stages = () if m.is_dense else tuple(m.spa_stages)
    counts = {(b.stage, b.index): b.counts.detach().cpu().long().tolist() for b in blocks}
    spa = m.spa
    strategy = None if m.is_dense else PACK_STRATEGIES.get(spa.pack)  # each strategy's own formula
    total = 0.0
    for i, depth in enumerate(depths):
        h, w = grids[i]
        n = h * w
        c = m.embed_dim * 2**i
        mh, mw = min(m.window_size, h), min(m.window_size, w)
        n_pad = math.ceil(h / mh) * mh * math.ceil(w / mw) * mw
        for j in range(depth):
            if i + 1 not in spa_stages:  # W-MSA: B(4 N_p C^2 + 2 M^2 N_p C)
                total += batch * (4 * n_pad * c * c + 2 * mh * mw * n_pad * c)
                continue
            k = counts.get((i + 1, j), [n] * batch)
            assert strategy is not None and spa is not None  # an SPA stage of a model that is not dense
            # The block packs from the map padded to whole windows when it has Swin's position bias;
            # an image that keeps every real token packs the padding too (spa_core.block).
            if n_pad != n and spa.position_bias == "swin":
                positions, packed = n_pad, [n_pad if kb == n else kb for kb in k]
            else:
                positions, packed = n, k
            # containers of one window's tokens (clipped where the map is smaller than the window)
            macs = strategy.attention_macs(packed, positions, c, spa.container_len or mh * mw)
            total += batch * n * c  # the gate's scorer over the real tokens
            total += check_attention_macs(macs, spa.pack, strategy.attention_macs, packed)
    return total


MEASUREMENTS = ("inference_timing", "flops", "train_step_timing", "peak_memory", "paired_speedup")


def real_images(images: torch.Tensor, targets: list[dict[str, Any]]) -> list[torch.Tensor]:
    """A padded batch ``images (B, 3, H, W)`` -> its images without the batch padding, those of one
    real size stacked together: ``[(B_k, 3, h_k, w_k)]`` in order of first appearance."""
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    for img, t in zip(images, targets):
        h, w = t.get("image_size", img.shape[-2:])
        groups.setdefault((int(h), int(w)), []).append(img[:, :h, :w])
    return [torch.stack(g) for g in groups.values()]


def measure(cfg, backend, detector: Detector) -> tuple[dict[str, Any], dict[str, BaseException]]:
    """The measurement columns of a trial (see the module docstring) and the measurements that failed.

    Each of ``MEASUREMENTS`` runs on its own: one that raises (fvcore cannot trace a plugin, the
    timing runs out of memory) gives no columns and is returned in ``failed`` (name -> the
    exception, with a note naming it), and the others still run, so a trained and evaluated trial
    keeps every number it got. Every rank calls it (a training step is collective; ZeRO-3 gathers
    parameters collectively); rank 0 reports. A failure is assumed to strike every rank alike (the
    same model on the same batch), as a collective inside a measurement needs."""
    bc = cfg.bench
    device = backend.device
    engine = backend.engine
    t0 = time.perf_counter()
    train_ds, val_ds = build_datasets(cfg.data, trial_seed=cfg.seed, progress=False)
    images, targets = fixed_batch(val_ds, bc.batch_size, size_divisor(cfg))
    images, targets = images.to(device), to_device(targets, device)
    sizes = image_sizes(images, targets)
    real = sum(p.shape[0] * p.shape[-2] * p.shape[-1] for p in real_images(images, targets))
    out: dict[str, Any] = {
        "bench_batch": int(images.shape[0]),
        "bench_padding_fraction": 1.0 - real / (images.shape[0] * images.shape[-2] * images.shape[-1]),
    }
    failed: dict[str, BaseException] = {}

    def attempt(name: str, fn: Callable[[], dict[str, Any]]) -> None:
        try:
            out.update(fn())
        except Exception as e:  # recorded in the row; the other measurements go on
            e.add_note(f"measurement {name!r} after training")
            failed[name] = e
            warnings.warn(f"measurement {name!r} failed: {type(e).__name__}: {e}", stacklevel=2)

    def inference_timing() -> dict[str, Any]:
        engine.eval()
        forward = _autocast_call(InferenceForward(detector).eval(), images, cfg, device, sizes)
        with torch.no_grad():
            fwd = timed(forward, bc.warmup, bc.repeats, device)
            infer = timed(lambda: engine(images, None, sizes), bc.warmup, bc.repeats, device)
        return {
            "forward_ms": fwd["median"],
            "forward_ms_iqr": fwd["iqr"],
            "forward_samples_per_s": images.shape[0] / fwd["median"] * 1e3,
            "infer_ms": infer["median"],
            "infer_ms_iqr": infer["iqr"],
            "infer_samples_per_s": images.shape[0] / infer["median"] * 1e3,
        }

    def flops() -> dict[str, Any]:
        flop_batch, flop_targets = fixed_batch(val_ds, min(bc.flop_images, len(val_ds)), size_divisor(cfg))
        macs: Counter[str] = Counter()
        unsupported: Counter[str] = Counter()
        analytic = 0.0
        with backend.gathered_parameters():
            for part in real_images(flop_batch.to(device), flop_targets):  # each real size alone: no padding
                with torch.no_grad():
                    blocks = detector.eval()(part)["backbone"].blocks
                counted = fvcore_macs(detector, part)
                for item in filter(None, counted.pop("unsupported").split(",")):
                    op, n = item.rsplit(":", 1)
                    unsupported[op] += int(n)
                macs.update(counted)
                analytic += analytic_attention_macs(
                    cfg, blocks, (part.shape[-2], part.shape[-1]), part.shape[0]
                )
        b = flop_batch.shape[0]
        return {
            "flop_images": b,
            "gmacs": macs["total"] / b / 1e9,
            "backbone_gmacs": macs["backbone"] / b / 1e9,
            "fvcore_attn_gmacs": macs["attn"] / b / 1e9,
            "analytic_attn_gmacs": analytic / b / 1e9,
            "fvcore_unsupported_ops": ",".join(f"{k}:{n}" for k, n in sorted(unsupported.items())),
        }

    def train_step_timing() -> dict[str, Any]:
        t_images, t_targets = fixed_batch(train_ds, cfg.train.batch_size, size_divisor(cfg))
        t_images, t_targets = t_images.to(device), to_device(t_targets, device)
        t_sizes = image_sizes(t_images, t_targets)
        engine.train()

        def _step() -> None:
            with backend.autocast():
                loss = engine(t_images, t_targets, t_sizes)["loss"]
            backend.backward(loss)
            backend.step()

        try:
            step = timed(_step, bc.warmup, bc.repeats, device)
        finally:
            engine.eval()
        return {
            "train_step_ms": step["median"],
            "train_step_ms_iqr": step["iqr"],
            "train_step_samples_per_s": t_images.shape[0] * backend.world_size / step["median"] * 1e3,
        }

    def memory() -> dict[str, Any]:
        mb, kind = peak_memory(device)
        return {"peak_mem_mb": mb, "peak_mem_kind": kind}

    out["backbone_params"] = sum(p.numel() for p in detector.backbone.parameters())
    attempt("inference_timing", inference_timing)
    attempt("flops", flops)
    if bc.train_step:
        attempt("train_step_timing", train_step_timing)
    out["bench_time_s"] = time.perf_counter() - t0
    attempt("peak_memory", memory)  # before the dense twin exists
    attempt("paired_speedup", lambda: paired_speedup(cfg, backend, detector, images, sizes))
    return out, failed


def _autocast_call(
    forward: nn.Module, images: torch.Tensor, cfg, device: torch.device, sizes: torch.Tensor | None = None
):
    """``forward(images, sizes)`` without gradients under the autocast of ``train.precision`` (what the
    DeepSpeed engine's own forward applies), as a function of no arguments for the timers."""
    amp = autocast_dtype(cfg.train.precision, device)

    def run() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            forward(images, sizes)

    return run


def zero3_partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed's ZeRO-3 manages the module's parameters (its parameters carry ``ds_status``),
    and so its forward hooks run on every submodule call."""
    return any(hasattr(p, "ds_status") for p in module.parameters())


def timing_copy(cfg, detector: nn.Module) -> nn.Module:
    """The model ``paired_speedup`` times for the trial: ``detector`` itself, or, under ZeRO-3 (call it
    with the parameters gathered), a plain copy built from ``cfg`` with the detector's weights and
    buffers. ZeRO-3's forward hooks fetch and release parameters around every submodule call even while
    they are gathered: measured here (micro preset, CPU, 2 images), the hooked detector took 101 ms per
    forward and the plain copy 51 ms, a cost the dense twin does not pay."""
    if not zero3_partitioned(detector):
        return detector
    p = next(detector.parameters())
    copy = build_detector(cfg)
    copy.load_state_dict(detector.state_dict())
    return copy.to(device=p.device, dtype=p.dtype).train(detector.training)


def dense_twin_config(cfg):
    """The trial's config with plain Swin blocks everywhere (``model.variant: dense``)."""
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, variant="dense", spa=None))


def speedup_baseline_config(cfg) -> tuple[Any, str]:
    """``(config, name)`` of the model ``paired_speedup`` times the trial against: the trial's config
    with the model and head of ``cfg.baseline`` (the grid's dense point) and that point's name, or,
    without a baseline, ``(dense_twin_config(cfg), DENSE_TWIN)``. Data, bench and seed stay the trial's."""
    import copy
    import dataclasses

    if cfg.baseline is None:
        return dense_twin_config(cfg), DENSE_TWIN
    b = cfg.baseline
    return dataclasses.replace(
        cfg, model=copy.deepcopy(b.model), head=copy.deepcopy(b.head), baseline=None
    ), b.name


def paired_speedup(
    cfg,
    backend,
    detector: nn.Module,
    images: torch.Tensor | None = None,
    sizes: torch.Tensor | None = None,
    *,
    clock=time.perf_counter,
) -> dict[str, Any]:
    """``speedup_vs_dense`` and its quartiles against ``speedup_baseline_config(cfg)``, named in
    ``speedup_baseline``: the ``InferenceForward`` of both models (backbone and head, no postprocessing;
    see the module docstring); empty for a dense trial.
    ``images``: the fixed evaluation batch on the device, ``sizes`` its ``image_sizes`` (default: both
    loaded here); ``clock``: the
    timer of ``harness.task.timing.time_in_rotation``.

    Both models run as plain modules (not through the DeepSpeed engine), under the autocast of
    ``train.precision``, so the two calls of a pair differ only in the model. Under ZeRO-3 the trial's
    model is timed as a plain copy with its gathered weights (``timing_copy``)."""
    if cfg.model.is_dense:
        return {}
    t0 = time.perf_counter()
    device = backend.device
    bc = cfg.bench
    if images is None:
        _, val_ds = build_datasets(cfg.data, trial_seed=cfg.seed, progress=False)
        images, targets = fixed_batch(val_ds, bc.batch_size, size_divisor(cfg))
        images = images.to(device)
        sizes = image_sizes(images, targets)
    dtype = next(detector.parameters()).dtype
    twin_cfg, baseline = speedup_baseline_config(cfg)
    twin = build_detector(twin_cfg).to(device=device, dtype=dtype).eval()

    gathered = getattr(backend, "gathered_parameters", contextlib.nullcontext)
    with gathered():
        model = timing_copy(cfg, detector)
        was_training = model.training
        model.eval()
        try:
            times = time_in_rotation(
                {
                    "model": _autocast_call(
                        InferenceForward(cast(Detector, model)), images, cfg, device, sizes
                    ),
                    "dense": _autocast_call(InferenceForward(twin), images, cfg, device, sizes),
                },
                max(1, bc.repeats),
                bc.warmup,
                clock=clock,
                sync=partial(_sync, device),
            )
        finally:
            model.train(was_training)
    t_model, t_dense = times["model"], times["dense"]
    q1, med, q3 = quartiles([d / m for d, m in zip(t_dense, t_model)])
    del twin, model
    return {
        "speedup_baseline": baseline,
        "speedup_timed": SPEEDUP_TIMED,
        "speedup_vs_dense": float(med),
        "speedup_vs_dense_q1": float(q1),
        "speedup_vs_dense_q3": float(q3),
        "paired_model_ms": 1e3 * statistics.median(t_model),
        "paired_dense_ms": 1e3 * statistics.median(t_dense),
        "paired_repeats": int(max(1, bc.repeats)),
        "paired_time_s": time.perf_counter() - t0,
    }
