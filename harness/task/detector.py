"""The detector the harness trains: an SPA (or dense Swin) backbone from ``spa_core`` plus a small
anchor-free head (``harness.task.fcos``) over one or two of its stages.

``Detector.forward(images, targets=None)`` returns a dict: ``backbone`` (the ``BackboneOutput``),
with targets ``loss = task_loss + gate_loss``, ``task_loss``, ``gate_loss`` and
``selection_labels`` (``{(H, W): (B, H, W)}`` at the grids the backbone asks for; None for a dense
backbone), and in eval mode ``detections`` (per image ``boxes (n, 4)`` xyxy pixels of the input,
``scores``, ``labels`` 0-based). The same code serves the tiny CPU presets on the built-in set and
the Swin-T-size backbone on COCO (``head.num_classes=80``; the loader maps category ids).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harness.config import TrialConfig
from harness.task.data import selection_labels
from harness.task.fcos import FCOSHead, fcos_loss, fcos_postprocess
from spa_core import build_backbone, gate_loss

__all__ = ["Detector", "build_detector", "HEAD_TYPES"]

HEAD_TYPES = ("fcos",)


class Detector(nn.Module):
    """Backbone + FCOS head; see the module docstring for ``forward``."""

    def __init__(self, backbone: nn.Module, cfg: TrialConfig) -> None:
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
        self.head = FCOSHead(channels, self.strides, hc.num_classes, hc.channels)
        self.spa_cfg = None if cfg.model.is_dense else cfg.model.spa
        self.score_thresh, self.nms_thresh, self.max_detections = hc.score_thresh, hc.nms_thresh, hc.max_detections

    def forward(self, images: torch.Tensor, targets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """images: (B, 3, S, S); targets: per image ``boxes (n, 4)`` xyxy pixels, ``labels (n,)``."""
        bb = self.backbone(images)
        feats = [bb.features[s - 1] for s in self.in_stages]
        cls, ltrb, ctr = self.head(feats)
        out: dict[str, Any] = {"backbone": bb}
        hw = tuple(images.shape[-2:])
        if targets is not None:
            parts = fcos_loss(cls, ltrb, ctr, self.strides, targets)
            task = parts["cls"] + parts["box"] + parts["ctr"]
            labels = None
            if bb.blocks:
                labels = selection_labels(targets, hw, self.backbone.label_grids(hw),
                                          coverage=self.spa_cfg.label_coverage if self.spa_cfg else None)
            gate = gate_loss(bb.blocks, labels, self.spa_cfg).to(task)
            out.update(loss=task + gate, task_loss=task, gate_loss=gate, selection_labels=labels,
                       loss_parts={k: v.detach() for k, v in parts.items()})
        if targets is None or not self.training:
            out["detections"] = fcos_postprocess(cls, ltrb, ctr, self.strides, hw, score_thresh=self.score_thresh,
                                                 nms_thresh=self.nms_thresh, max_detections=self.max_detections)
        return out


def build_detector(cfg: TrialConfig) -> Detector:
    """The detector of a trial: ``spa_core.build_backbone(cfg.model)`` + the head of ``cfg.head``."""
    return Detector(build_backbone(cfg.model), cfg)
