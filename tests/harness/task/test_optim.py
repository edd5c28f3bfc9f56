"""harness/task/optim.py: Swin's parameter groups (no weight decay on norms, biases, position tables)
and the learning-rate schedules (warmup-cosine, step decay at epochs or steps), one builder for both
backends."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from harness.config import ConfigError, trial_from_dict
from harness.task.backend import TorchBackend
from harness.task.detector import build_detector
from harness.task.optim import (
    build_optimizer,
    lr_multiplier,
    param_groups,
    resolve_schedule,
    steps_per_epoch,
    warmup_cosine,
    warmup_step,
)
from spa_core.config import check_config


def _cfg(train=None, **model):
    return trial_from_dict({"preset": "tiny", "model": model, "train": train or {}})


# --- parameter groups ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", [{"variant": "dense"}, {"spa_stages": [2, 3, 4], "extra_stage3_blocks": 1}])
def test_no_decay_on_norms_biases_and_position_tables_only(model):
    detector = build_detector(_cfg(**model))
    decay, exempt = param_groups(detector, 0.05)
    assert (decay["weight_decay"], exempt["weight_decay"]) == (0.05, 0.0)
    names = dict(detector.named_parameters())
    assert sorted(decay["names"] + exempt["names"]) == sorted(names)  # each parameter once
    assert not set(decay["names"]) & set(exempt["names"])
    norms = {
        f"{m_name}.{p_name}"
        for m_name, m in detector.named_modules()
        if isinstance(m, nn.LayerNorm | nn.GroupNorm)
        for p_name, _ in m.named_parameters(recurse=False)
    }
    assert norms and norms <= set(exempt["names"])
    tables = [n for n in names if n.endswith("relative_position_bias_table")]
    assert tables and set(tables) <= set(exempt["names"])
    assert all(names[n].ndim == 2 for n in tables)  # 2-D: a rule on dimensions alone would decay them
    biases = [n for n in names if n.endswith(".bias")]
    assert set(biases) <= set(exempt["names"])
    gate_biases = [n for n in biases if ".gate." in n]
    assert bool(gate_biases) == ("spa_stages" in model)
    # what decays: the weight matrices and kernels, each >= 2-D and none of the above
    assert all(names[n].ndim >= 2 for n in decay["names"])
    for part in ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "patch_embed.proj.weight"):
        assert any(n.endswith(part) for n in decay["names"]), part
    if "spa_stages" in model:
        assert any(".gate." in n and n.endswith("weight") for n in decay["names"])
    assert set(exempt["names"]) == norms | set(tables) | {n for n in names if names[n].ndim < 2}


def test_a_module_names_its_own_exempt_parameters():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4, bias=False)
            self.embedding = nn.Parameter(torch.zeros(3, 4))

        def no_weight_decay(self) -> set[str]:
            return {"embedding"}

    model = nn.Sequential(Scaled())
    decay, exempt = param_groups(model, 0.1)
    assert decay["names"] == ["0.proj.weight"] and exempt["names"] == ["0.embedding"]
    frozen = nn.Linear(2, 2)
    frozen.weight.requires_grad_(False)
    decay, exempt = param_groups(frozen, 0.1)
    assert decay["names"] == [] and exempt["names"] == ["bias"]  # frozen parameters are left out


def test_the_optimizer_applies_the_groups():
    detector = build_detector(_cfg(train={"weight_decay": 0.05, "lr": 1e-4}))
    opt = build_optimizer(detector, _cfg(train={"weight_decay": 0.05, "lr": 1e-4}))
    groups = param_groups(detector, 0.05)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    for g, ref in zip(opt.param_groups, groups):
        assert [id(p) for p in g["params"]] == [id(p) for p in ref["params"]]
        assert "names" not in g and g["lr"] == 1e-4


# --- schedules --------------------------------------------------------------------------------------


def test_warmup_cosine():
    assert warmup_cosine(0, 100, 10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10) == pytest.approx(0.505)
    assert warmup_cosine(100, 100, 10) == pytest.approx(0.01)
    assert warmup_cosine(0, 5, 0) == pytest.approx(1.0)


def test_step_decay_values():
    # Swin's 1x recipe at 100 steps per epoch: warmup 10, x0.1 at epochs 8 and 11
    m = (800, 1100)
    assert warmup_step(0, m, 10) == pytest.approx(0.1)
    assert warmup_step(9, m, 10) == pytest.approx(1.0)
    assert warmup_step(10, m, 10) == 1.0 and warmup_step(799, m, 10) == 1.0
    assert warmup_step(800, m, 10) == pytest.approx(0.1)  # the milestone step itself is decayed
    assert warmup_step(1099, m, 10) == pytest.approx(0.1)
    assert warmup_step(1100, m, 10) == pytest.approx(0.01) and warmup_step(10**6, m, 10) == pytest.approx(
        0.01
    )
    assert warmup_step(5, (3,), 10, gamma=0.5) == pytest.approx(0.5 * 6 / 10)  # decay inside the warmup
    assert warmup_step(3, (), 0) == 1.0


@settings(max_examples=60, deadline=None)
@given(
    milestones=st.lists(st.integers(1, 500), max_size=4, unique=True).map(sorted),
    warmup=st.integers(0, 50),
    gamma=st.floats(0.01, 0.9),
)
def test_step_decay_is_piecewise_constant_after_warmup(milestones, warmup, gamma):
    values = [warmup_step(s, tuple(milestones), warmup, gamma) for s in range(600)]
    for s in range(max(warmup, 1), 600):
        drops = sum(1 for m in milestones if m == s)
        assert values[s] == pytest.approx(values[s - 1] * gamma**drops) or s == warmup
    assert values[-1] == pytest.approx(gamma ** len(milestones))


def test_epochs_resolve_to_optimizer_steps():
    tc = _cfg(train={"epochs": 12, "schedule": "step", "decay_epochs": [8, 11], "batch_size": 2}).train
    # 117266 COCO images (those with boxes), 8 ranks x 2: 7329 steps per epoch
    assert steps_per_epoch(tc, 117266, 8) == 7329
    r = resolve_schedule(tc, 117266, 8)
    assert (r.steps, r.decay_steps, r.epochs, r.decay_epochs) == (12 * 7329, (8 * 7329, 11 * 7329), None, ())
    assert lr_multiplier(8 * 7329 - 1, r) == 1.0 and lr_multiplier(8 * 7329, r) == pytest.approx(0.1)
    # accumulation: two micro-batches per step; fewer images than a batch: one partial batch
    acc = _cfg(train={"epochs": 1, "batch_size": 4, "grad_accum": 2}).train
    assert steps_per_epoch(acc, 40, 1) == 5 and resolve_schedule(acc, 40, 1).steps == 5
    assert steps_per_epoch(acc, 3, 1) == 0.5 and resolve_schedule(acc, 3, 1).steps == 1
    plain = _cfg(train={"steps": 7}).train
    assert resolve_schedule(plain, 100, 2) is plain  # nothing in epochs: unchanged
    with pytest.raises(ValueError, match="resolved"):
        lr_multiplier(0, tc)


@pytest.mark.parametrize(
    "train,match",
    [
        ({"schedule": "step"}, "needs train.decay_epochs"),
        ({"schedule": "step", "decay_epochs": [8], "decay_steps": [3]}, "one of them"),
        ({"decay_steps": [3]}, "schedule: step only"),
        ({"schedule": "step", "decay_steps": [5, 3]}, "increasing"),
        ({"schedule": "step", "decay_epochs": [0]}, "increasing positive"),
        ({"epochs": 0}, "train.epochs"),
        ({"schedule": "linear"}, "train.schedule"),
    ],
)
def test_schedule_keys_that_do_not_fit_are_refused(train, match):
    with pytest.raises(ConfigError, match=match):
        check_config(_cfg(train=train))  # the field rules: what the grid loader checks key by key


def test_the_backend_steps_the_learning_rate_by_the_schedule():
    cfg = _cfg(train={"steps": 6, "lr": 0.01, "warmup_steps": 2, "schedule": "step", "decay_steps": [3, 5]})
    backend = TorchBackend("cpu")
    model = nn.Linear(3, 1)
    backend.setup(model, cfg)
    seen = []
    for _ in range(6):
        seen.append(backend.lr)
        model(torch.randn(2, 3)).sum().backward()
        backend.step()
    expect = [0.01 * lr_multiplier(s, cfg.train) for s in range(6)]
    assert seen == pytest.approx(expect)
    assert seen == pytest.approx([0.005, 0.01, 0.01, 0.001, 0.001, 0.0001])
    assert not math.isnan(backend.lr)


def test_a_grid_checks_the_schedule_keys_together(tmp_path):
    from harness.grid import GridError, load_grid

    ok = tmp_path / "ok.yaml"
    ok.write_text("base:\n  train.schedule: step\n  train.decay_epochs: [8, 11]\n  train.epochs: 12\n")
    (trial,) = load_grid(ok).trials  # each key alone would not resolve; together they do
    assert (trial.train.schedule, trial.train.decay_epochs) == ("step", (8.0, 11.0))
    bad = tmp_path / "bad.yaml"
    bad.write_text("base:\n  train.schedule: step\n")
    with pytest.raises(GridError, match="bad.yaml.*needs train.decay_epochs"):
        load_grid(bad)
