"""The trial config: everything one grid point needs to train, evaluate and benchmark a variant.

A grid (``ablations/``) sets dotted keys of this dataclass tree (``model.spa.ratio``,
``train.steps``, ``resources.workers``); the resolved config is saved with every result row and its
content hash keys the results store, so a row can be re-run and a finished trial is never run twice.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from spa_core.config import (
    BACKBONE_PRESETS,
    BackboneConfig,
    ConfigError,
    backbone_preset,
    checked_field,
    config_from_dict,
    config_to_dict,
    stem_problem,
)

__all__ = [
    "DataConfig",
    "HeadConfig",
    "TrainConfig",
    "BenchConfig",
    "ResourcesConfig",
    "TrialConfig",
    "BaselineConfig",
    "trial_from_dict",
    "trial_to_dict",
    "config_hash",
    "config_changes",
    "set_dotted",
    "get_dotted",
    "flatten_config",
    "smoke_overrides",
    "ConfigError",
]


@dataclass
class DataConfig:
    dataset: str = checked_field(
        "builtin", choices=("builtin", "coco")
    )  # "builtin" (shapes on photographs, generated: harness.task.builtin_data) or "coco"
    root: str | None = None  # coco: folder holding the files below
    train_images: str = "train"  # coco: image folder, relative to root
    train_ann: str = "annotations/instances_train.json"
    val_images: str = "val"
    val_ann: str = "annotations/instances_val.json"
    # "square": the longer side resized to image_size and padded to image_size x image_size inside the
    # image (a batch of equal squares; the model is not told about the padding). "keep_ratio": Swin's
    # detection pipeline: resized to fit `scale` (long, short), the batch padded to its largest image
    # (rounded up to size_divisor) and the padding's extent passed to the model (harness/task/transforms.py)
    resize: str = checked_field("square", choices=("square", "keep_ratio"))
    image_size: int = checked_field(128, range_=(1, None, True, None))  # square: the side
    scale: tuple[int, ...] = (1333, 800)  # keep_ratio: (long, short) limits of evaluation and training
    # keep_ratio multi-scale training: a short side drawn per image from this list (long <= scale[0]);
    # empty: scale[1]. Swin's 3x recipe: 480, 512, ..., 800
    train_short_sides: tuple[int, ...] = ()
    flip: float = checked_field(0.0, range_=(0.0, 1.0, True, True))  # training: horizontal flip probability
    # keep_ratio training: probability of Swin's 3x crop policy (resize, random crop, multi-scale resize)
    crop_prob: float = checked_field(0.0, range_=(0.0, 1.0, True, True))
    # a batch's height and width are rounded up to this; None: the backbone's total stride (keep_ratio),
    # 1 (square: every image is the same square already)
    size_divisor: int | None = checked_field(None, range_=(1, None, True, None))
    num_train: int = 1200  # builtin: images generated for train / val
    num_val: int = 200
    data_seed: int = 0  # builtin: generation seed (the content hash names the cache folder)
    # builtin: True generates each trial's set from (data_seed, the trial's seed), so the seeds of a
    # grid also sample the data and an interval over seeds includes data sampling; False: one set
    seed_with_trial: bool = False
    cache_dir: str | None = None  # builtin: where generated sets live (default ~/.cache/spa-harness)
    skip_bad_annotations: bool = False  # False: a bad box/file raises; True: skipped and counted
    num_workers: int = 0  # DataLoader workers


@dataclass
class HeadConfig:
    type: str = "fcos"  # small anchor-free head
    num_classes: int = 3  # must equal the dataset's categories (the built-in set's: circle, triangle, square)
    in_stages: tuple[int, ...] = (2, 3, 4)  # 1-based backbone stages the head reads (every SPA stage)
    channels: int = 64
    # 3x3 conv layers in each of the head's class and box towers (FCOS: 4). Each adds context around a
    # location, which the head can then supply where the backbone's blocks did not: a light head
    # leaves the context to the backbone, the part SPA changes.
    num_convs: int = checked_field(2, range_=(0, None, True, None))
    # A level of stride s takes boxes whose reach (largest distance from a location to a side) is in
    # (range_factor * s_prev, range_factor * s]: FCOS's 8 fits 800-px images; a smaller canvas needs less
    range_factor: float = checked_field(8.0, range_=(0.0, None, False, None))
    # centre sampling: a location learns a box if it lies within this many strides of the box's centre
    center_radius: float = checked_field(1.5, range_=(0.0, None, False, None))
    score_thresh: float = 0.05
    nms_thresh: float = 0.6
    max_detections: int = 100


@dataclass
class TrainConfig:
    steps: int = checked_field(300, range_=(1, None, True, None))  # optimizer steps (unless epochs is set)
    # passes over the train split; when set it replaces steps (rounded to whole optimizer steps)
    epochs: float | None = checked_field(None, range_=(0.0, None, False, None))
    batch_size: int = checked_field(16, range_=(1, None, True, None))  # micro-batch per worker
    grad_accum: int = checked_field(1, range_=(1, None, True, None))
    lr: float = checked_field(1e-3, range_=(0.0, None, False, None))
    weight_decay: float = 0.05
    warmup_steps: int = 20
    # learning rate after warmup: "cosine" (to 1% of lr at the last step) or "step" (lr, times
    # decay_gamma at each of decay_epochs or decay_steps: Swin's 1x recipe decays at epochs 8 and 11)
    schedule: str = checked_field("cosine", choices=("cosine", "step"))
    decay_epochs: tuple[float, ...] = ()
    decay_steps: tuple[int, ...] = ()
    decay_gamma: float = checked_field(0.1, range_=(0.0, None, False, None))
    zero_stage: int = checked_field(0, range_=(0, 3, True, True))  # DeepSpeed ZeRO stage
    precision: str = checked_field(
        "auto", choices=("auto", "bf16", "fp16", "fp32")
    )  # fp16: CUDA only; auto: bf16 where the device supports it (never fp16 on CPU), else fp32
    grad_clip: float = 1.0
    eval_images: int | None = None  # None: the whole val split
    log_every: int = 10
    # optimizer steps between checkpoints (0: none); a retried or re-run trial resumes from the last
    checkpoint_every: int = checked_field(0, range_=(0, None, True, None))
    # where: a folder or URI (<dir>/<experiment>/<config_hash>/); None: the trial's folder in the store
    checkpoint_dir: str | None = None


@dataclass
class BenchConfig:
    batch_size: int = checked_field(
        8, range_=(1, None, True, None)
    )  # the fixed evaluation batch for FLOPs and timings
    warmup: int = 2
    repeats: int = checked_field(7, range_=(1, None, True, None))
    # FLOPs are counted over the first flop_images val images (all of them if fewer), traced in one
    # batch: enough images that a kept fraction's difference shows in the GMACs columns
    flop_images: int = checked_field(32, range_=(1, None, True, None))
    train_step: bool = True  # also time a training step


@dataclass
class ResourcesConfig:
    workers: int = checked_field(
        1, range_=(1, None, True, None)
    )  # Ray Train workers (data-parallel DeepSpeed ranks)
    cpus_per_worker: float = checked_field(1.0, range_=(0.0, None, False, None))
    gpus_per_worker: float = checked_field(0.0, range_=(0.0, None, True, None))
    timeout_s: float = checked_field(
        1800.0, range_=(0.0, None, False, None)
    )  # a trial past this is recorded as "timeout"
    retries: int = checked_field(0, range_=(0, None, True, None))  # re-runs of a failed trial


@dataclass
class BaselineConfig:
    """The grid's dense baseline, attached to its other trials (``harness.grid``): the model a trial's
    ``speedup_vs_dense`` is timed against. Not part of the content hash (it changes no trained weight)."""

    name: str = "dense"  # the baseline trial's name
    model: BackboneConfig = field(default_factory=lambda: BackboneConfig(variant="dense", spa=None))
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class TrialConfig:
    name: str = "trial"
    preset: str = checked_field(
        "tiny", choices=tuple(BACKBONE_PRESETS)
    )  # backbone size (spa_core.config.BACKBONE_PRESETS); model.* overrides it
    model: BackboneConfig = field(default_factory=BackboneConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    seed: int = 0
    plugins: list[str] = field(default_factory=list)  # modules / files to import before building
    # set by the grid: "registry:name" -> the source hash of each plugin entry the trial uses
    # (harness.plugins.plugin_sources); hashed, so an edited plugin makes a new trial
    plugin_sources: dict[str, str] = field(default_factory=dict)
    baseline: BaselineConfig | None = None  # set by the grid from its dense point; None: no dense point
    axis: dict[str, str] = field(
        default_factory=dict
    )  # set by the grid: the trial's label on each of its axes


# Keys that do not change what a trial computes: left out of the content hash.
# The built-in generator's version (``harness.task.builtin_data``): bumped whenever its images change.
# Part of a built-in trial's hash, so rows computed on an older set are never reused as this one's.
BUILTIN_DATA_VERSION = 4

_UNHASHED = (
    "name",
    "resources.timeout_s",
    "resources.retries",
    "plugins",
    "data.num_workers",
    "data.cache_dir",
    "train.checkpoint_every",  # a resumed trial computes what an uninterrupted one does
    "train.checkpoint_dir",
    "baseline",
    "axis",
)


def trial_from_dict(data: dict[str, Any], *, partial: bool = False) -> TrialConfig:
    """A ``TrialConfig`` from a (possibly partial) dict; ``model`` keys override the preset's.
    ``partial``: ``data`` sets a few keys only (a grid file's key checked alone), so the rules between
    keys (the head reads every SPA stage, ``_check_pipeline``) wait for the whole trial."""
    data = copy.deepcopy(data or {})
    preset = data.get("preset", TrialConfig.preset)
    model = data.pop("model", {}) or {}
    if not isinstance(model, dict):
        raise ConfigError(f"model: expected a mapping, got {model!r}")
    base = config_to_dict(backbone_preset(preset))
    if "spa" in model and model["spa"] is not None and base.get("spa") is not None:
        model["spa"] = {**base["spa"], **model["spa"]}
    cfg = config_from_dict(TrialConfig, data)
    cfg.model = config_from_dict(BackboneConfig, {**base, **model}, "model")
    if cfg.model.variant == "dense":
        cfg.model.spa = None
    if not partial:
        _check_head_reads_spa(cfg)
        _check_pipeline(cfg)
    return cfg


def _check_pipeline(cfg: TrialConfig) -> None:
    """The data, schedule and model keys that depend on each other (each field's own range is its rule)."""
    d, t = cfg.data, cfg.train
    if len(d.scale) != 2 or min(d.scale) < 1 or d.scale[0] < d.scale[1]:
        raise ConfigError(f"data.scale: expected [long, short], positive, long >= short, got {list(d.scale)}")
    if any(s < 1 for s in d.train_short_sides):
        raise ConfigError(f"data.train_short_sides: expected positive sides, got {list(d.train_short_sides)}")
    if d.resize == "square" and (d.train_short_sides or d.crop_prob):
        raise ConfigError(
            "data.train_short_sides and data.crop_prob need data.resize: keep_ratio "
            "(square images have one size)"
        )
    if t.decay_epochs and t.decay_steps:
        raise ConfigError("train.decay_epochs and train.decay_steps: set one of them, not both")
    if t.schedule == "step" and not (t.decay_epochs or t.decay_steps):
        raise ConfigError("train.schedule 'step' needs train.decay_epochs or train.decay_steps")
    if t.schedule != "step" and (t.decay_epochs or t.decay_steps):
        raise ConfigError("train.decay_epochs / train.decay_steps are read by train.schedule: step only")
    for key, values in (("decay_epochs", t.decay_epochs), ("decay_steps", t.decay_steps)):
        if any(v <= 0 for v in values) or list(values) != sorted(values):
            raise ConfigError(f"train.{key}: expected increasing positive values, got {list(values)}")
    problem = stem_problem(cfg.model)
    if problem:
        raise ConfigError(problem)


def _check_head_reads_spa(cfg: TrialConfig) -> None:
    """SPA blocks in a stage after the last one the head reads would feed nothing: no detection and no
    task loss would see what they select (only their gates would train, on the labels)."""
    if cfg.model.is_dense or not cfg.head.in_stages:
        return
    unread = sorted(s for s in cfg.model.spa_stages if s > max(cfg.head.in_stages))
    if unread:
        raise ConfigError(
            f"model.spa_stages {list(cfg.model.spa_stages)} has SPA blocks in stage(s) {unread}, after the last "
            f"stage the head reads (head.in_stages {list(cfg.head.in_stages)}): their output would reach no "
            "detection and no loss. Add the stage(s) to head.in_stages or remove them from model.spa_stages."
        )


def trial_to_dict(cfg: TrialConfig) -> dict[str, Any]:
    return config_to_dict(cfg)


# Keys added after stores existed, with the value that computes what a config without the key did: at
# that value the key is left out of the hash (and of ``config_changes``), so the rows of a store made
# before the key existed keep their keys instead of every trial running again.
_HASHED_UNLESS = {"model.stem": "patch"}


def _drop_unhashed(d: dict[str, Any]) -> None:
    for key in _UNHASHED:
        _pop_dotted(d, key)
    for key, old in _HASHED_UNLESS.items():
        try:
            value = get_dotted(d, key)
        except KeyError:
            continue
        if value == old:
            _pop_dotted(d, key)


def config_hash(cfg: TrialConfig | dict[str, Any], length: int = 12) -> str:
    """Content hash of what a trial computes (canonical JSON, sha256), the results store's key."""
    d = trial_to_dict(cfg) if isinstance(cfg, TrialConfig) else copy.deepcopy(cfg)
    _drop_unhashed(d)
    data = d.get("data")
    if isinstance(data, dict) and data.get("dataset", "builtin") == "builtin":
        data["builtin_version"] = BUILTIN_DATA_VERSION
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


_ABSENT = "(absent)"


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` of every hashed key whose value differs between two
    config dicts (``trial_to_dict`` form; a key one of them lacks reads ``"(absent)"``), sorted."""
    flat = []
    for d in (old, new):
        d = copy.deepcopy(d)
        _drop_unhashed(d)
        flat.append(flatten_config(d))
    a, b = flat
    return [
        (k, a.get(k, _ABSENT), b.get(k, _ABSENT))
        for k in sorted(set(a) | set(b))
        if json.dumps(a.get(k, _ABSENT), default=str) != json.dumps(b.get(k, _ABSENT), default=str)
    ]


def get_dotted(d: dict[str, Any], key: str) -> Any:
    cur: Any = d
    for part in key.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(key)
        cur = cur[part]
    return cur


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted-key columns of a config dict (``model.spa.ratio``); ``model.spa`` is None when dense."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating intermediate mappings."""
    parts = key.split(".")
    cur = d
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[part] = nxt
        cur = nxt
    cur[parts[-1]] = value


def _pop_dotted(d: dict[str, Any], key: str) -> None:
    parts = key.split(".")
    cur = d
    for part in parts[:-1]:
        cur = cur.get(part)
        if not isinstance(cur, dict):
            return
    cur.pop(parts[-1], None)


def smoke_overrides() -> dict[str, Any]:
    """What ``--smoke`` changes: few steps, little data, small benchmark (a quick end-to-end check)."""
    return {
        "train.steps": 4,
        "train.epochs": None,
        "train.batch_size": 4,
        "train.log_every": 2,
        "data.num_train": 48,
        "data.num_val": 16,
        "data.image_size": 64,
        "bench.batch_size": 2,
        "bench.warmup": 1,
        "bench.repeats": 3,
    }
