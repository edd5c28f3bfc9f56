"""The detector the harness trains: an SPA (or dense Swin) backbone from ``spa_core`` plus a small
anchor-free head (``harness.task.fcos``) over one or two of its stages.

``Detector.forward(images, targets=None, image_sizes=None)`` returns a dict: ``backbone`` (the
``BackboneOutput``; ``image_sizes (B, 2)``, each image's real (height, width) in a padded batch, goes to
the backbone, which treats the rest as padding: ``spa_core.backbone``),
with targets ``loss = task_loss + gate_loss``, ``task_loss``, ``gate_loss`` and
``selection_labels`` (``{(H, W): (B, H, W)}`` at the grids the backbone asks for; None for a dense
backbone), and in eval mode ``detections`` (per image ``boxes (n, 4)`` xyxy pixels of the input,
``scores``, ``labels`` 0-based). The same code serves the tiny CPU presets on the built-in set and
the Swin-T-size backbone on COCO (``head.num_classes=80``; the loader maps category ids).

Paired trials. ``build_detector(cfg)`` makes a detector whose randomness is a function of ``cfg.seed``
alone, so that the trials of one seed differ only by their variant:

- Initial weights. The *reference* is the trial's dense network: ``model.variant: dense`` and no
  extra stage-3 blocks (``init_reference_config``), the grid's dense baseline itself for the usual
  grid. The reference and the trial's model are each built with torch's CPU generator seeded from
  ``(seed, "init")`` (inside ``torch.random.fork_rng``: the caller's RNG state is neither read nor
  changed), then every parameter and buffer of the model whose qualified name and shape the reference
  also has is copied from the reference. So what a variant shares with dense (same name, same shape:
  the patch embedding, Swin and SPA blocks' ``attn.qkv``/``attn.proj``/position tables, norms and MLPs,
  the merges, the head) starts bit for bit as dense does, whatever the variant builds and in whatever
  order; what only the variant has (gates, extra stage-3 blocks) keeps the variant's own
  initialisation, drawn under the same seed. Copying from a built reference relies on names and
  shapes only, never on how a module initialises itself, so plugin variants and new parameters need
  nothing. The reference has no extra stage-3 blocks because they are built before stage 4 and the
  head: a reference with them would draw those from another point of the stream than the baseline.
  The reference comes from the trial's own config (not from the grid), so a trial's weights are a
  function of its content hash. Every rank of a multi-worker trial builds the same model before
  DeepSpeed wraps it.
- Selection's random streams. Every module with a ``generator`` attribute (``SPABlock``: Gumbel noise
  of ``gate``, draws of ``random``) gets its own CPU ``torch.Generator`` seeded from
  ``(seed, "select", stage, index)`` (``set_selection_generators``), so selection never consumes the
  global RNG, one block's draws do not depend on the others', and the stream is the same on any
  device (the policies draw on the generator's device and move the result).
- Per rank. What is drawn per step differs between the data-parallel ranks of a multi-worker trial
  (else 8 GPUs would draw the same Gumbel noise and stochastic depth: 2 independent draws per global
  batch of 16): rank ``r > 0`` keys its selection streams with ``("rank", r)`` as well, and seeds the
  global RNG (stochastic depth) and its loader's workers with ``rank_seed(seed, r)``. Rank 0 draws
  exactly what a one-worker trial draws, so a one-worker row is rank 0 of any multi-worker one.
  Initial weights do not depend on the rank (``build_detector`` seeds them from the trial seed).

Pretrained backbones. With ``model.pretrained`` the backbone loads the Swin checkpoint when it is
built (``spa_core.pretrained``), the reference too, so what both have comes from the checkpoint and
what has no source there (gates, output norms, extra stage-3 blocks) from the seeded initialisation
above. ``pretrained_columns`` gives the row what the load left as initialised and the file's hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from harness.config import TrialConfig
from harness.task.data import selection_labels
from harness.task.fcos import FCOSHead, fcos_loss, fcos_postprocess
from spa_core import build_backbone, gate_loss

__all__ = [
    "Detector",
    "build_detector",
    "HEAD_TYPES",
    "derived_seed",
    "rank_seed",
    "init_reference_config",
    "pretrained_columns",
    "share_initial_weights",
    "set_selection_generators",
]

HEAD_TYPES = ("fcos",)


class Detector(nn.Module):
    """Backbone + FCOS head; see the module docstring for ``forward``."""

    # A MODEL_VARIANTS entry, any nn.Module meeting that registry's contract (``stage_channels``,
    # ``label_grids``, a forward returning ``BackboneOutput``): typed by the contract, not a class.
    backbone: Any

    def __init__(self, backbone: Any, cfg: TrialConfig) -> None:
        super().__init__()
        hc = cfg.head
        if hc.type not in HEAD_TYPES:
            raise ValueError(f"unknown head.type {hc.type!r}; known: {', '.join(HEAD_TYPES)}")
        stages = tuple(hc.in_stages)
        if not stages or any(s not in (1, 2, 3, 4) for s in stages) or list(stages) != sorted(set(stages)):
            raise ValueError(f"head.in_stages must be increasing 1-based stages in 1..4, got {hc.in_stages}")
        self.backbone = backbone
        self.in_stages = stages
        self.strides = [cfg.model.patch_size * 2 ** (s - 1) for s in stages]
        channels = [backbone.stage_channels[s - 1] for s in stages]
        self.head = FCOSHead(channels, self.strides, hc.num_classes, hc.channels, num_convs=hc.num_convs)
        self.range_factor, self.center_radius = hc.range_factor, hc.center_radius
        self.spa_cfg = None if cfg.model.is_dense else cfg.model.spa
        self.score_thresh, self.nms_thresh, self.max_detections = (
            hc.score_thresh,
            hc.nms_thresh,
            hc.max_detections,
        )
        # Averages a count over the data-parallel ranks (set by the trainer of a multi-worker trial):
        # the loss normaliser of every rank is then the batch's positives over all ranks. Used in
        # training only, where every rank runs the same number of forwards.
        self.count_mean: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(
        self,
        images: torch.Tensor,
        targets: list[dict[str, Any]] | None = None,
        image_sizes: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """images: (B, 3, H, W); targets: per image ``boxes (n, 4)`` xyxy pixels, ``labels (n,)``;
        image_sizes: (B, 2) int real (height, width) per image of a padded batch, or None (all real;
        ``harness.task.data.image_sizes`` gives it for a batch)."""
        bb = self.backbone(images, image_sizes)
        feats = [bb.features[s - 1] for s in self.in_stages]
        cls, ltrb, ctr = self.head(feats)
        out: dict[str, Any] = {"backbone": bb}
        hw = (images.shape[-2], images.shape[-1])
        if targets is not None:
            parts = fcos_loss(
                cls, ltrb, ctr, self.strides, targets, self.range_factor, self.center_radius,
                count_mean=self.count_mean if self.training else None,
            )  # fmt: skip
            task = parts["cls"] + parts["box"] + parts["ctr"]
            labels = None
            if bb.blocks:
                labels = selection_labels(
                    targets,
                    hw,
                    self.backbone.label_grids(hw),
                    coverage=self.spa_cfg.label_coverage if self.spa_cfg else None,
                )
            gate = gate_loss(bb.blocks, labels, self.spa_cfg).to(task)
            out.update(
                loss=task + gate,
                task_loss=task,
                gate_loss=gate,
                selection_labels=labels,
                loss_parts={k: v.detach() for k, v in parts.items()},
            )
        if targets is None or not self.training:
            out["detections"] = fcos_postprocess(
                cls,
                ltrb,
                ctr,
                self.strides,
                hw,
                score_thresh=self.score_thresh,
                nms_thresh=self.nms_thresh,
                max_detections=self.max_detections,
            )
        return out


def derived_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed for the stream named ``keys`` of trial seed ``seed`` (sha256 of their repr): the
    streams of one seed are independent of each other and of torch's global RNG."""
    digest = hashlib.sha256(repr((int(seed), *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s per-step draws (global RNG, loader workers): ``seed`` itself on
    rank 0 (a one-worker trial), an independent stream of ``seed`` on every other rank."""
    return int(seed) if rank == 0 else derived_seed(seed, "rank", int(rank))


def init_reference_config(cfg: TrialConfig) -> TrialConfig:
    """The config of the dense network whose initial weights ``cfg``'s model shares (see the module
    docstring): ``cfg`` with ``model.variant: dense``, ``model.spa: None``, ``extra_stage3_blocks: 0``."""
    model = dataclasses.replace(cfg.model, variant="dense", spa=None, extra_stage3_blocks=0)
    return dataclasses.replace(cfg, model=model)


def _seeded_build(cfg: TrialConfig) -> Detector:
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(derived_seed(cfg.seed, "init"))
        return Detector(build_backbone(cfg.model), cfg)


@torch.no_grad()
def share_initial_weights(model: nn.Module, reference: nn.Module) -> list[str]:
    """Copy into ``model`` every parameter and buffer of ``reference`` with the same qualified name and
    shape; returns the names copied."""
    ref: dict[str, torch.Tensor] = dict(reference.named_parameters())
    ref.update(reference.named_buffers())
    copied = []
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        r = ref.get(name)
        if r is not None and r.shape == t.shape:
            t.copy_(r)
            copied.append(name)
    return copied


def set_selection_generators(model: nn.Module, seed: int, rank: int = 0) -> int:
    """Give every module with a ``generator`` attribute (SPA blocks) its own CPU generator seeded from
    ``(seed, "select", stage, index)`` (its qualified name if it has no ``stage``/``index``), with
    ``("rank", rank)`` appended on a rank other than 0; returns how many were set."""
    n = 0
    for name, m in model.named_modules():
        g = getattr(m, "generator", False)
        if not (g is None or isinstance(g, torch.Generator)):  # no such attribute, or something else
            continue
        key = (m.stage, m.index) if hasattr(m, "stage") and hasattr(m, "index") else (name,)
        key += ("rank", int(rank)) if rank else ()
        m.generator = torch.Generator().manual_seed(derived_seed(seed, "select", *key))
        n += 1
    return n


def pretrained_columns(model: Detector) -> dict[str, Any]:
    """The row's ``pretrained_missing`` (the backbone modules the checkpoint had no weights for, left
    as initialised, comma-separated) and ``pretrained_sha256`` (of the checkpoint file); None for a
    backbone built without ``model.pretrained``. Logs what was left as initialised."""
    load = getattr(model.backbone, "pretrained_load", None)
    if load is None:
        return {"pretrained_missing": None, "pretrained_sha256": None}
    missing = ", ".join(load.missing)
    logging.getLogger(__name__).info(
        "pretrained %s (%s layout): %d weights loaded; no source, left as initialised: %s",
        load.source,
        load.layout,
        len(load.loaded),
        missing or "nothing",
    )
    return {"pretrained_missing": missing, "pretrained_sha256": load.sha256}


def build_detector(cfg: TrialConfig, rank: int = 0) -> Detector:
    """The detector of a trial: ``spa_core.build_backbone(cfg.model)`` + the head of ``cfg.head``, its
    initial weights shared with the dense reference of ``cfg.seed`` and its selection streams seeded
    for data-parallel rank ``rank`` (see the module docstring). Built on the CPU; the caller's RNG
    state is left as it was."""
    model = _seeded_build(cfg)
    reference = init_reference_config(cfg)
    if (reference.model, reference.head) != (cfg.model, cfg.head):
        share_initial_weights(model, _seeded_build(reference))
    set_selection_generators(model, cfg.seed, rank)
    return model
