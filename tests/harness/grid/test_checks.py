"""harness/grid/checks.py: each config key and value alone (unknown keys, wrong types, names no
registry holds, ranges, keys the grid sets itself, plain names), and rules between keys waiting for
the whole trial."""

from __future__ import annotations

import re

import pytest

from harness.grid import load_grid
from tests.harness.grid._grid_files import BASE, assert_bad_grid, grid_error, write


def test_bad_override(tmp_path):
    path = write(tmp_path, BASE)
    err = grid_error(path, overrides={"train.stepz": 1})
    assert "unknown key train.stepz" in str(err)


@pytest.mark.parametrize("key", ["axis.selection", "baseline.name"])
def test_keys_the_grid_sets_itself_are_refused(tmp_path, key):
    path = write(tmp_path, f"base: {{preset: micro, {key}: x}}\n")
    assert "set by the grid itself" in str(grid_error(path))


@pytest.mark.parametrize("where", ["base", "axis"])
def test_rules_between_keys_wait_for_the_whole_trial(tmp_path, where):
    """``head.in_stages`` read alone would break the head-reads-every-SPA-stage rule against the
    default ``model.spa_stages``; with the trial's own ``spa_stages`` it holds: the grid loads. A
    trial that really breaks it is refused, naming the file."""
    both = "  model.spa_stages: [2, 3]\n  head.in_stages: [2, 3]\n"
    if where == "base":
        text = BASE + both
    else:
        text = BASE + "axes:\n  shallow:\n    two: {model.spa_stages: [2, 3], head.in_stages: [2, 3]}\n"
    grid = load_grid(write(tmp_path, text))
    assert {tuple(t.head.in_stages) for t in grid.trials} == {(2, 3)}
    bad = write(tmp_path, BASE + "  head.in_stages: [2, 3]\n", "bad.yaml")
    err = grid_error(bad)
    assert "bad.yaml" in str(err) and "head.in_stages" in str(err)


@pytest.mark.parametrize(
    "keys,match",
    [
        (
            "  model.stem: patch2\n  model.pretrained: swin.pth\n",
            r"model\.stem 'patch2'.*set model\.stem: patch",
        ),
        ("  model.stem: patch2\n  model.patch_size: 3\n", r"patch_size must be even, got 3"),
        ("  model.stem: conv\n", r"model\.stem.*patch2"),
    ],
)
def test_a_stem_that_cannot_work_is_refused_before_anything_runs(tmp_path, keys, match):
    """A two-conv stem under a Swin checkpoint (which has one conv to load) or with an odd patch, or a
    stem that does not exist: the grid does not load, and the error says what to set."""
    err = grid_error(write(tmp_path, BASE + keys, "bad.yaml"))
    assert "bad.yaml" in str(err)
    assert re.search(match, str(err)), str(err)
    ok = write(tmp_path, BASE + "  model.stem: patch2\n", "ok.yaml")
    assert {t.model.stem for t in load_grid(ok).trials} == {"patch2"}


# --- bad grids: one error naming file, line, key and what was expected ------------------------------

BAD = {
    "unknown config key": (
        "base:\n  preset: micro\n  model:\n    spa:\n      ratoi: 0.5\n",
        5,
        "model.spa.ratoi",
        "unknown key model.spa.ratoi for SPAConfig; expected one of: alpha",
    ),
    "wrong type in base": (
        BASE + "  train.batch_size: big\n",
        4,
        "train.batch_size",
        "expected an integer, got 'big'",
    ),
    "wrong type of an axis value": (
        BASE + "axes:\n  model.spa.ratio:\n    - 0.5\n    - half\n",
        7,
        "model.spa.ratio",
        "expected a number, got 'half'",
    ),
    "unknown variant": (
        BASE + "points:\n  - {name: x, model.variant: swin_xl}\n",
        5,
        "model.variant",
        "unknown model_variant 'swin_xl'; registered: dense, spa",
    ),
    "unknown selection policy on an axis": (
        BASE + "axes:\n  model.spa.selection: [topk, magic]\n",
        5,
        "model.spa.selection",
        "unknown selection_policy 'magic'; registered:",
    ),
    "unknown gate inside a mapping value": (
        BASE + "axes:\n  model.spa:\n    - {gate: linear}\n    - {gate: mlp}\n",
        7,
        "model.spa",
        "unknown gate 'mlp'; registered:",
    ),
    "unknown pack strategy": (
        BASE + "  model.spa.pack: zip\n",
        4,
        "model.spa.pack",
        "unknown pack_strategy 'zip'; registered:",
    ),
    "ratio out of range": (
        BASE + "axes:\n  model.spa.ratio: [0.5, 1.5]\n",
        5,
        "model.spa.ratio",
        "expected a value >= 0.0 and <= 1.0, got 1.5",
    ),
    "no workers": (
        BASE + "resources: {workers: 0}\n",
        4,
        "resources.workers",
        "expected a value >= 1, got 0",
    ),
    "unknown preset": (BASE.replace("micro", "huge"), 2, "preset", "unknown backbone preset 'huge'"),
    "unknown axis key": (
        BASE + "axes:\n  model.spa.ratios: [0.5]\n",
        5,
        "model.spa.ratios",
        "unknown config key for an axis",
    ),
    "seed in base": (BASE + "  seed: 3\n", 4, "seed", "top-level `seeds:`"),
    "unknown resources key": (
        BASE + "resources: {gpus: 1}\n",
        4,
        "resources.gpus",
        "unknown key resources.gpus",
    ),
    "trial name with a slash": (
        BASE + "points:\n  - {name: a/b, model.variant: dense}\n",
        5,
        "name",
        "'a/b' is not a plain name: contains '/'",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_grid(tmp_path, case):
    assert_bad_grid(tmp_path, *BAD[case])
