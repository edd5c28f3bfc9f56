"""harness/grid/expand.py: expansion (cross product, excludes, points, seeds, named axes, overrides,
plugins), the built-in grids, each trial's axis labels, and the warning for a base key an axis
overrides in every value."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest

from harness.config import config_hash
from harness.grid import BUILTIN_GRIDS_DIR, load_grid
from tests.harness.grid._grid_files import BASE, assert_bad_grid, grid_error, write


@pytest.mark.parametrize("path", sorted(BUILTIN_GRIDS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_builtin_grids_load(path, clean_registries):
    grid = load_grid(path)
    assert grid.trials and grid.source == path.resolve()
    names = {t.name for t in grid.trials}
    assert "dense" in names, "every built-in grid carries the dense baseline"
    assert len({config_hash(t) for t in grid.trials}) == len(grid.trials)


def test_smoke_grid():
    grid = load_grid(BUILTIN_GRIDS_DIR / "smoke.yaml")
    assert grid.name == "smoke" and grid.description
    by_name = {t.name: t for t in grid.trials}
    assert set(by_name) == {"ratio=0.25", "ratio=0.5", "dense"}
    assert by_name["dense"].model.variant == "dense" and by_name["dense"].model.spa is None
    assert by_name["ratio=0.25"].model.spa.selection == "topk"
    assert [by_name[n].model.spa.ratio for n in ("ratio=0.25", "ratio=0.5")] == [0.25, 0.5]
    assert sorted(t.resources.workers for t in grid.trials) == [1, 1, 2]
    for t in grid.trials:
        assert t.preset == "micro" and t.data.image_size == 64 and t.train.steps <= 10
        assert t.model.embed_dim == 16  # the micro preset resolved


def test_cross_product_exclude_points_seeds(tmp_path):
    path = write(
        tmp_path,
        BASE
        + textwrap.dedent("""\
        axes:
          model.spa.selection: [topk, random]
          model.spa.ratio: [0.25, 0.5, 0.75]
        exclude:
          - {model.spa.selection: random, model.spa.ratio: [0.25, 0.75]}
        points:
          - {name: dense, model.variant: dense}
        seeds: 2
        resources: {workers: 1, cpus_per_worker: 2}
        """),
    )
    grid = load_grid(path)
    variants = list(dict.fromkeys(t.name for t in grid.trials))
    assert variants == [
        "selection=topk,ratio=0.25",
        "selection=topk,ratio=0.5",
        "selection=topk,ratio=0.75",
        "selection=random,ratio=0.5",
        "dense",
    ]
    assert len(grid.trials) == 5 * 2
    assert [t.seed for t in grid.trials[:2]] == [0, 1]
    assert all(t.resources.cpus_per_worker == 2.0 for t in grid.trials)
    assert grid.axes == {
        "model.spa.selection": ["topk", "random"],
        "model.spa.ratio": ["0.25", "0.5", "0.75"],
    }
    assert grid.labels["selection=random,ratio=0.5"] == {
        "model.spa.selection": "random",
        "model.spa.ratio": "0.5",
    }
    table = grid.table()
    assert len(table) == 10 and {"name", "seed", "config_hash", "cpus", "model.spa.ratio"} <= set(
        table.columns
    )


def test_named_axis_and_list_values(tmp_path):
    path = write(
        tmp_path,
        BASE
        + textwrap.dedent("""\
        axes:
          selection:
            topk50: {model.spa.selection: topk, model.spa.ratio: 0.5}
            gate_nosup: {model.spa: {selection: gate, supervision: none}}
          model.spa_stages: [[4], [3, 4]]
        exclude:
          - {selection: gate_nosup, model.spa_stages: [4]}
        """),
    )
    grid = load_grid(path)
    names = [t.name for t in grid.trials]
    assert names == ["topk50,spa_stages=4", "topk50,spa_stages=3-4", "gate_nosup,spa_stages=3-4"]
    assert grid.trials[2].model.spa.supervision == "none" and grid.trials[2].model.spa_stages == (3, 4)


def test_overrides_apply_last(tmp_path):
    path = write(tmp_path, BASE + "axes:\n  model.spa.ratio: [0.5]\n")
    grid = load_grid(path, overrides={"train.steps": 1, "data.num_train": 8})
    assert grid.trials[0].train.steps == 1 and grid.trials[0].data.num_train == 8


def test_plugins_named_in_grid_are_loaded_and_recorded(tmp_path, clean_registries):
    (tmp_path / "plug.py").write_text(
        "from spa_core.registry import SELECTION_POLICIES\n"
        "from spa_core.select import select_topk\n"
        "SELECTION_POLICIES.register('tp_grid_policy', select_topk)\n"
    )
    path = write(
        tmp_path,
        BASE
        + textwrap.dedent("""\
        plugins: [plug.py]
        axes:
          model.spa.selection: [topk, tp_grid_policy]
        """),
    )
    grid = load_grid(path)
    assert grid.plugins == [str((tmp_path / "plug.py").resolve())]
    assert all(t.plugins == grid.plugins for t in grid.trials)


def test_bad_extra_plugin(tmp_path):
    path = write(tmp_path, BASE)
    err = grid_error(path, extra_plugins=["missing_plugin.py"])
    assert err.key == "--plugin" and "does not exist" in str(err)


def test_every_trial_carries_its_axis_labels_for_the_report(tmp_path):
    """A trial's label on each axis travels with it (``axis``, not hashed) into its row's ``axis.<axis>``
    columns, where the report's axis tables read them; a point has none."""
    from harness.run.rows import RunInfo, TrialSpec, failure_row  # the row builder every row goes through

    path = write(
        tmp_path,
        textwrap.dedent("""
        base: {preset: micro}
        axes:
          model.spa.ratio: [0.25, 0.5]
          selection: {tk: {model.spa.selection: topk}, rnd: {model.spa.selection: random}}
        points: [{name: dense, model.variant: dense}]
        seeds: 2
    """),
    )
    grid = load_grid(path)
    by_name = {t.name: t for t in grid.trials}
    assert by_name["ratio=0.25,tk"].axis == {"model.spa.ratio": "0.25", "selection": "tk"}
    assert by_name["dense"].axis == {}
    t = by_name["ratio=0.5,rnd"]
    bare = copy.deepcopy(t)
    bare.axis = {}
    assert config_hash(bare) == config_hash(t)
    row = failure_row(
        TrialSpec(t, config_hash(t)),
        RunInfo("r", "c"),
        status="failed",
        error="x",
        error_type="X",
        tb="",
        attempt=1,
        start=0.0,
    )
    assert row["axis.selection"] == "rnd" and row["axis.model.spa.ratio"] == "0.5"
    assert not any(k == "axis" or k.startswith("baseline.") for k in row)


# --- an axis that overrides a base key says so ---------------------------------------------------------


def _parent(tmp_path: Path) -> Path:
    return write(tmp_path, "base:\n  preset: micro\n  model.spa.selection: topk\naxes:\n  model.spa.ratio: [0.25, 0.5]\n",
                  "parent.yaml")  # fmt: skip


def test_an_inherited_axis_overriding_the_childs_base_key_warns_naming_both_places(tmp_path):
    _parent(tmp_path)
    child = write(
        tmp_path, "extends: parent.yaml\nbase:\n  model.spa: {selection: topk, ratio: 0.1}\n", "child.yaml"
    )
    grid = load_grid(child)
    assert {t.model.spa.ratio for t in grid.trials} == {0.25, 0.5}  # what the warning is about
    [w] = grid.warnings
    assert w.startswith(f"{tmp_path / 'parent.yaml'}:5: axis model.spa.ratio overrides model.spa.ratio = 0.1")
    assert f"set at {tmp_path / 'child.yaml'}:3" in w
    assert "`axes: {model.spa.ratio: null}`" in w  # and how to remove it


def test_removing_the_inherited_axis_with_null_keeps_the_base_value_and_the_warning_goes(tmp_path):
    _parent(tmp_path)
    child = write(tmp_path, "extends: parent.yaml\nbase:\n  model.spa.ratio: 0.1\naxes:\n  model.spa.ratio: null\n",
                   "child.yaml")  # fmt: skip
    grid = load_grid(child)
    assert [t.model.spa.ratio for t in grid.trials] == [0.1] and grid.warnings == []


@pytest.mark.parametrize(
    "text, warns",
    [
        # one file: a base value no value of the axis keeps
        ("base: {preset: micro, model.spa.ratio: 0.1}\naxes: {model.spa.ratio: [0.25, 0.5]}\n", True),
        # one file: the base names one of the axis's values (a default beside its sweep)
        ("base: {preset: micro, model.spa.ratio: 0.25}\naxes: {model.spa.ratio: [0.25, 0.5]}\n", False),
        # a named axis setting the key in every value
        (
            "base: {preset: micro, model.spa.ratio: 0.1}\naxes:\n  s:\n    a: {model.spa.ratio: 0.3}\n"
            "    b: {model.spa.ratio: 0.4, model.spa.pack: varlen}\n",
            True,
        ),
        # an axis over a key above the base's: a whole model.spa mapping replaces model.spa.ratio
        (
            "base: {preset: micro, model.spa.ratio: 0.1}\naxes: {model.spa: [{selection: topk}, {selection: all}]}\n",
            True,
        ),
        # a named axis leaving the key alone in one value: the base value reaches that trial
        (
            "base: {preset: micro, model.spa.ratio: 0.1}\naxes:\n  s:\n    a: {model.spa.ratio: 0.3}\n"
            "    b: {model.spa.pack: varlen}\n",
            False,
        ),
        # points are diffs over base by design
        ("base: {preset: micro, model.spa.ratio: 0.1}\npoints: [{name: p, model.spa.ratio: 0.3}]\n", False),
    ],
)
def test_which_overrides_warn(tmp_path, text, warns):
    assert bool(load_grid(write(tmp_path, text)).warnings) == warns


def test_a_child_sweeping_a_key_its_parents_base_sets_does_not_warn(tmp_path):
    write(tmp_path, "base: {preset: micro, model.spa.ratio: 0.1}\n", "parent.yaml")
    child = write(tmp_path, "extends: parent.yaml\naxes: {model.spa.ratio: [0.25, 0.5]}\n", "child.yaml")
    assert load_grid(child).warnings == []


@pytest.mark.parametrize("name", sorted(p.name for p in BUILTIN_GRIDS_DIR.glob("*.yaml")))
def test_the_builtin_grids_warn_of_nothing(name, clean_registries):
    assert load_grid(BUILTIN_GRIDS_DIR / name).warnings == []


# --- bad grids: one error naming file, line, key and what was expected ------------------------------

BAD = {
    "exclude matching nothing": (
        BASE + "axes:\n  model.spa.ratio: [0.25, 0.5]\nexclude:\n  - {model.spa.ratio: 0.3}\n",
        7,
        "exclude",
        "matches no trial",
    ),
    "exclude with an unknown key": (
        BASE + "axes:\n  model.spa.ratio: [0.5]\nexclude:\n  - {ratio: 0.5}\n",
        7,
        "ratio",
        "expected a config key or an axis name (model.spa.ratio)",
    ),
    "duplicate variant names": (
        BASE + "points:\n  - {name: d, model.variant: dense}\n  - {name: d, model.spa.ratio: 0.1}\n",
        6,
        "name",
        "two variants are named 'd'",
    ),
    "two trials with one config": (
        BASE + "axes:\n  model.variant: [dense]\npoints:\n  - {name: dense, model.variant: dense}\n",
        7,
        "name",
        "resolve to the same config",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_grid(tmp_path, case):
    assert_bad_grid(tmp_path, *BAD[case])
