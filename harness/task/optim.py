"""The optimizer and learning-rate schedule every backend trains with (``TorchBackend`` and
``DeepSpeedBackend`` both call ``build_optimizer`` and ``build_scheduler``, so they train alike).

Parameter groups (Swin's detection recipe): AdamW with ``train.weight_decay`` on weight matrices and
kernels, none on norms (every parameter of a normalisation layer), biases (the gates' included), other
parameters with fewer than two dimensions (gains, the FCOS head's scales), Swin's
``relative_position_bias_table`` / ``absolute_pos_embed``, and the names a module lists in its own
``no_weight_decay()`` (timm's convention, for plugins).

Schedule: linear warmup over ``train.warmup_steps`` optimizer steps, then ``cosine`` (from 1 to 1% of
``train.lr`` at the last step) or ``step`` (1, times ``train.decay_gamma`` at each decay point; Swin's
1x recipe: epochs 8 and 11 of 12). ``resolve_schedule`` turns epochs (``train.epochs``,
``train.decay_epochs``) into optimizer steps once the train split's size is known.
"""

from __future__ import annotations

import bisect
import dataclasses
import math

import torch
from torch import nn

from harness.config import TrainConfig, TrialConfig

__all__ = [
    "NO_DECAY_NAMES",
    "build_optimizer",
    "build_scheduler",
    "lr_multiplier",
    "param_groups",
    "resolve_schedule",
    "steps_per_epoch",
    "warmup_cosine",
    "warmup_step",
]

# Parameter names (the last part of a qualified name) that never take weight decay (Swin's recipe).
NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm, nn.RMSNorm)


def _no_decay_names(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for prefix, module in model.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
        if isinstance(module, _NORMS):
            names.update(own)
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            names.update(f"{prefix}.{n}" if prefix else n for n in hook())
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim < 2 or leaf == "bias" or leaf in NO_DECAY_NAMES:
            names.add(name)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's two groups of ``model``'s trainable parameters: ``{"params", "weight_decay", "names"}``
    with decay, then without (see the module docstring); every trainable parameter in exactly one."""
    no_decay = _no_decay_names(model)
    decay: list[tuple[str, nn.Parameter]] = []
    exempt: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (exempt if name in no_decay else decay).append((name, p))
    return [
        {"params": [p for _, p in decay], "weight_decay": weight_decay, "names": [n for n, _ in decay]},
        {"params": [p for _, p in exempt], "weight_decay": 0.0, "names": [n for n, _ in exempt]},
    ]


def build_optimizer(model: nn.Module, cfg: TrialConfig) -> torch.optim.AdamW:
    """AdamW at ``cfg.train.lr`` over ``param_groups(model, cfg.train.weight_decay)`` (without the names:
    an optimizer's groups hold tensors and numbers, as DeepSpeed's wrappers expect)."""
    groups = [
        {k: v for k, v in g.items() if k != "names"} for g in param_groups(model, cfg.train.weight_decay)
    ]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.999))


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.01) -> float:
    """LR multiplier at optimizer step ``step``: linear warmup over ``warmup`` steps, then cosine from
    1 to ``floor`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def warmup_step(step: int, milestones: tuple[int, ...], warmup: int, gamma: float = 0.1) -> float:
    """LR multiplier at optimizer step ``step``: linear warmup over ``warmup`` steps, then ``gamma`` to
    the power of the number of ``milestones`` (optimizer steps, increasing) reached; the warmup ramps
    to the decayed value if a milestone falls inside it."""
    decayed = gamma ** bisect.bisect_right(milestones, step)
    if warmup > 0 and step < warmup:
        return decayed * (step + 1) / warmup
    return decayed


def lr_multiplier(step: int, tc: TrainConfig) -> float:
    """The multiplier of ``tc.lr`` at optimizer step ``step`` (0-based) under ``tc``'s schedule, with
    ``tc`` resolved to steps (``resolve_schedule``)."""
    if tc.schedule == "step":
        if tc.decay_epochs:
            raise ValueError("train.decay_epochs must be resolved to steps first (resolve_schedule)")
        return warmup_step(step, tuple(tc.decay_steps), tc.warmup_steps, tc.decay_gamma)
    return warmup_cosine(step, tc.steps, tc.warmup_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` of ``lr_multiplier`` (stepped once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, tc))


def steps_per_epoch(tc: TrainConfig, num_train: int, world_size: int) -> float:
    """Optimizer steps in one pass over ``num_train`` images: each of ``world_size`` ranks gets
    ``ceil(num_train / world_size)`` of them (``DistributedSampler``) in whole micro-batches (the
    loader drops the last partial one), ``grad_accum`` micro-batches per step."""
    per_rank = -(-num_train // world_size)
    micro = per_rank // tc.batch_size if per_rank >= tc.batch_size else 1
    return micro / max(1, tc.grad_accum)


def resolve_schedule(tc: TrainConfig, num_train: int, world_size: int) -> TrainConfig:
    """``tc`` with epochs turned into optimizer steps for a train split of ``num_train`` images:
    ``steps = round(epochs * steps_per_epoch)`` when ``epochs`` is set, ``decay_steps`` from
    ``decay_epochs``; unchanged otherwise."""
    if tc.epochs is None and not tc.decay_epochs:
        return tc
    per_epoch = steps_per_epoch(tc, num_train, world_size)
    steps = tc.steps if tc.epochs is None else max(1, round(tc.epochs * per_epoch))
    decay = tuple(tc.decay_steps)
    if tc.decay_epochs:
        decay = tuple(max(1, round(e * per_epoch)) for e in tc.decay_epochs)
    return dataclasses.replace(tc, steps=steps, epochs=None, decay_steps=decay, decay_epochs=())
