"""The example plugin ablations/plugins/feature_norm.py, loaded by file path from a grid and run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.grid import load_grid
from harness.plugins import isolated_registries, list_variants
from spa_core.backbone import build_backbone
from spa_core.config import SPAConfig
from spa_core.registry import GATES, SELECTION_POLICIES

PLUGIN = Path(__file__).resolve().parents[2] / "ablations" / "plugins" / "feature_norm.py"


@pytest.fixture
def grid(tmp_path):
    with isolated_registries():
        path = tmp_path / "fn.yaml"
        path.write_text(
            f"plugins: [{PLUGIN}]\n"
            "base:\n"
            "  preset: micro\n"
            "  model.spa: {gate: feature_norm, selection: feature_norm, supervision: none}\n"
            "  data: {image_size: 64, num_train: 16, num_val: 8}\n"
            "  train: {steps: 2, batch_size: 4}\n"
            "axes:\n"
            "  model.spa.ratio: [0.25, 0.5]\n"
            "points:\n"
            "  - {name: dense, model.variant: dense}\n"
        )
        yield load_grid(path)


def test_registered_from_the_file(grid):
    assert SELECTION_POLICIES.origin("feature_norm") == f"file {PLUGIN}"
    assert GATES.origin("feature_norm") == f"file {PLUGIN}"
    table = list_variants()
    assert set(table[table.name == "feature_norm"].registry) == {"gate", "selection_policy"}
    assert all(t.plugins == [str(PLUGIN)] for t in grid.trials)


def test_grid_runs_with_the_plugin(grid):
    """Every trial of the grid builds, keeps its ratio per image, and trains (the gate has no weights)."""
    assert [t.name for t in grid.trials] == ["ratio=0.25", "ratio=0.5", "dense"]
    torch.manual_seed(0)
    images = torch.randn(3, 3, 64, 64)
    for trial in grid.trials:
        model = build_backbone(trial.model)
        out = model(images)
        loss = sum(f.square().mean() for f in out.features)
        loss.backward()
        if trial.model.variant == "dense":
            assert out.blocks == []
            continue
        assert not any("gate" in n for n, _ in model.named_parameters())
        for blk in out.blocks:
            n = blk.mask.shape[1]
            assert blk.counts.tolist() == [round(trial.model.spa.ratio * n)] * 3
        assert all(p.grad is not None for n, p in model.named_parameters() if "stages.3" in n and "attn" in n)


def test_policy_contract():
    with isolated_registries():
        from harness.plugins import load_plugin

        mod = load_plugin(str(PLUGIN))
        scores = torch.tensor([[0.0, 2.0, -1.0, 1.0], [3.0, -2.0, 0.5, 0.4]])
        sel = mod.select_feature_norm(scores, cfg=SPAConfig(ratio=0.5), training=True)
        assert sel.mask.tolist() == [[False, True, False, True], [True, False, True, False]]
        assert sel.counts.tolist() == [2, 2]
        # kept tokens enter attention unscaled: weight * sigmoid(s) == 1 on them, 1 elsewhere
        scaled = sel.weight * torch.sigmoid(scores)
        assert torch.allclose(scaled[sel.mask], torch.ones(4))
        assert torch.all(sel.weight[~sel.mask] == 1)
        gate = mod.FeatureNormGate(8)
        x = torch.randn(2, 5, 8)
        x[0, 3] *= 10  # a token far from its image's mean scores highest
        s = gate(x)
        assert s.shape == (2, 5) and s[0].argmax() == 3 and list(gate.parameters()) == []


def test_trains_and_evaluates_with_the_task(grid):
    """One trial of the grid end to end through the task (train, evaluate): the plugin in real use."""
    from harness.task.train import train_variant

    trial = grid.trials[1]  # ratio=0.5
    metrics = train_variant(trial, progress=False)
    assert metrics["steps"] == 2 and metrics["kept_fraction"] == pytest.approx(0.5, abs=0.05)
    assert 0.0 <= metrics["gate_precision"] <= 1.0 and "map" in metrics
