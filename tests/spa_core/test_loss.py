"""spa_core/loss.py: gate loss modes, alpha, and that supervision trains the gate."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from spa_core.backbone import build_backbone
from spa_core.config import SPAConfig, backbone_preset
from spa_core.labels import selection_labels_from_boxes
from spa_core.loss import gate_loss
from spa_core.registry import SUPERVISION_MODES


def _toy():
    torch.manual_seed(0)
    cfg = backbone_preset("micro", spa=SPAConfig(supervision="labels", alpha=1.0))
    model = build_backbone(cfg).train()
    images = torch.randn(2, 3, 64, 64)
    boxes = [torch.tensor([[0.0, 0.0, 24.0, 30.0]]), torch.tensor([[40.0, 33.0, 64.0, 64.0]])]
    labels = selection_labels_from_boxes(boxes, (64, 64), model.label_grids((64, 64)))
    return model, images, labels


def test_gate_loss_falls_with_label_supervision():
    model, images, labels = _toy()
    for blk in model.modules():
        if hasattr(blk, "generator"):
            blk.generator = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(25):
        out = model(images)
        loss = gate_loss(out.blocks, labels, model.cfg.spa)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    # the gate now keeps (mostly) the object tokens at inference
    model.eval()
    with torch.no_grad():
        out = model(images)
    for info in out.blocks:
        y = labels[info.grid].reshape(info.mask.shape).bool()
        assert (info.mask == y).float().mean() > 0.8


def test_modes_and_alpha():
    model, images, labels = _toy()
    out = model(images)
    spa = model.cfg.spa
    one = gate_loss(out.blocks, labels, dataclasses.replace(spa, alpha=1.0))
    tenth = gate_loss(out.blocks, labels, dataclasses.replace(spa, alpha=0.1))
    torch.testing.assert_close(tenth, 0.1 * one)
    expect = sum(
        torch.nn.functional.binary_cross_entropy_with_logits(b.logits, labels[b.grid].flatten(1))
        for b in out.blocks
    )
    torch.testing.assert_close(one, expect)
    none = gate_loss(out.blocks, None, dataclasses.replace(spa, supervision="none"))
    assert float(none.detach()) == 0.0 and none.requires_grad
    assert float(gate_loss([], labels, spa)) == 0.0
    assert float(gate_loss(out.blocks, labels, None).detach()) == 0.0  # the dense baseline
    assert set(SUPERVISION_MODES) >= {"labels", "none"}


def test_missing_labels_are_loud():
    model, images, labels = _toy()
    out = model(images)
    with pytest.raises(ValueError, match="labels"):
        gate_loss(out.blocks, None, model.cfg.spa)
    with pytest.raises(KeyError, match="grid"):
        gate_loss(out.blocks, {(1, 1): torch.zeros(2, 1, 1)}, model.cfg.spa)
