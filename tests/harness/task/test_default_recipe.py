"""The default grid's recipe (``ablations/grids/default.yaml``) on the built-in data: every level that an
SPA stage feeds gets detection targets, and the exact null (keep-all without gate scaling) computes
what the dense baseline computes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from harness.grid import load_grid
from harness.task.data import build_datasets, collate
from harness.task.detector import build_detector
from harness.task.fcos import fcos_targets, level_points

GRID = Path(__file__).parents[3] / "ablations" / "grids" / "default.yaml"
N_IMAGES = 200  # a prefix of the default training split (each image has its own generator)


def _trials(cache: Path) -> dict[str, object]:
    """One trial per variant of the default grid (seed 0), on a prefix of its built-in set."""
    out = {}
    for t in load_grid(GRID).trials:
        if t.seed == 0 and t.name not in out:
            data = dataclasses.replace(t.data, cache_dir=str(cache), num_train=N_IMAGES, num_val=16)
            out[t.name] = dataclasses.replace(t, data=data)
    return out


@pytest.fixture(scope="module")
def trials(tmp_path_factory):
    return _trials(tmp_path_factory.mktemp("default-recipe"))


def test_every_level_an_spa_stage_feeds_gets_positive_locations(trials):
    """The split of FCOS's positive locations per level over the first 200 training images of the
    default recipe (measured when the recipe was set, head levels at strides 8 / 16 / 32 with
    ``range_factor`` 4: 2066 / 1165 / 48, 63% / 36% / 1%; the SPA stages 2-3 feed strides 8 and 16).
    Every level read from an SPA stage carries at least 5% of them, so the task loss reaches what
    selection changes directly, not only through the head's top-down sum."""
    cfg = trials["gate"]
    train, _ = build_datasets(cfg.data, trial_seed=cfg.seed, progress=False)
    strides = [cfg.model.patch_size * 2 ** (s - 1) for s in cfg.head.in_stages]
    size = cfg.data.image_size
    points = level_points([(-(-size // s),) * 2 for s in strides], strides, torch.device("cpu"))
    per_level = torch.zeros(len(strides))
    for i in range(len(train)):
        _, target = train[i]
        cls, _ = fcos_targets(
            points, strides, target["boxes"], target["labels"], cfg.head.center_radius, cfg.head.range_factor
        )
        per_level += torch.stack([(c >= 0).sum() for c in cls.split([len(p) for p in points])])
    share = per_level / per_level.sum()
    split = ", ".join(f"stride {s}: {int(n)} ({f:.0%})" for s, n, f in zip(strides, per_level, share))
    fed = [cfg.head.in_stages.index(s) for s in cfg.model.spa_stages]
    assert fed, "the default grid's SPA stages feed no level of the head"
    for level in fed:
        assert share[level] >= 0.05, f"level of stride {strides[level]} gets too few positives: {split}"


def test_the_exact_null_computes_what_dense_computes(trials):
    """keep-all with ``gate_scaling: false`` and no gate loss at the default recipe, built for seed 0 as a
    trial builds it (weights shared with the dense baseline), gives the loss dense trains on and its
    gradients on a batch of built-in images, up to float32 rounding (every stage map of a 128-px image
    is a multiple of the window, where a containers SPA block is its Swin block)."""
    dense_cfg, null_cfg = trials["dense"], trials["keep-all"]
    spa = null_cfg.model.spa
    assert (spa.selection, spa.gate_scaling, spa.supervision) == ("all", False, "none")
    train, _ = build_datasets(dense_cfg.data, trial_seed=0, progress=False)
    images, targets = collate([train[i] for i in range(4)])
    results = []
    for cfg in (dense_cfg, null_cfg):
        model = build_detector(cfg).train()
        out = model(images, targets)
        named = {n: p for n, p in model.named_parameters() if ".gate." not in n}
        grads = torch.autograd.grad(out["loss"], list(named.values()), allow_unused=True)
        results.append((out["loss"].detach(), dict(zip(named, grads))))
    (loss_d, grads_d), (loss_n, grads_n) = results
    torch.testing.assert_close(loss_n, loss_d, rtol=1e-5, atol=1e-6)
    assert grads_d.keys() == grads_n.keys()
    for name, g in grads_d.items():
        torch.testing.assert_close(grads_n[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_default_long_is_the_default_grid_with_twice_the_training():
    """``default-long.yaml`` says it is ``default.yaml`` with only the schedule and the seed count
    changed: every trial of the default grid has a twin there (same name and seed, every config field
    but ``train`` the same) with twice the optimizer steps of the same batch size; the
    comparisons are the same, and the extra seeds run the same rows."""
    short, long = load_grid(GRID), load_grid(GRID.with_name("default-long.yaml"))
    twins = {(t.name, t.seed): t for t in long.trials}
    assert set(long.seeds) > set(short.seeds)
    assert set(twins) == {(t.name, seed) for t in short.trials for seed in long.seeds}
    for s in short.trials:
        lg = twins[(s.name, s.seed)]
        assert dataclasses.replace(lg, train=s.train) == s, s.name
        assert lg.train.steps == 2 * s.train.steps
        assert lg.train.batch_size == s.train.batch_size
    assert long.comparisons == short.comparisons
