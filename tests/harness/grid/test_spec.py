"""harness/grid/spec.py: finding grid files, their top-level keys of the wrong shape, and `extends`
(what a child changes, cycles, an error in a parent named at the parent's line)."""

from __future__ import annotations

import textwrap

import pytest

from harness.grid import load_grid
from tests.harness.grid._grid_files import BASE, assert_bad_grid, grid_error, write


def test_extends_changes_only_what_differs(tmp_path):
    write(
        tmp_path,
        BASE
        + textwrap.dedent("""\
        name: parent
        description: the parent
        axes:
          model.spa.ratio: [0.25, 0.5]
          model.spa.pack: [containers, varlen]
        points:
          - {name: dense, model.variant: dense}
        seeds: [3]
        """),
        "parent.yaml",
    )
    path = write(
        tmp_path,
        textwrap.dedent("""\
        extends: parent.yaml
        base:
          train: {steps: 5}
        axes:
          model.spa.pack: null
          model.spa.selection: [topk]
        """),
        "child.yaml",
    )
    grid = load_grid(path)
    assert grid.name == "child" and grid.description == "the parent"
    assert list(grid.axes) == ["model.spa.ratio", "model.spa.selection"]
    assert [t.name for t in grid.trials] == ["ratio=0.25,selection=topk", "ratio=0.5,selection=topk", "dense"]
    assert all(t.train.steps == 5 and t.preset == "micro" and t.seed == 3 for t in grid.trials)


def test_missing_grid_file(tmp_path):
    err = grid_error(tmp_path / "absent.yaml")
    assert "does not exist" in str(err) and "absent.yaml" in str(err)


def test_extends_cycle(tmp_path):
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    err = grid_error(tmp_path / "a.yaml")
    assert err.key == "extends" and "cycle" in str(err) and err.line == 1


def test_error_in_parent_names_the_parent(tmp_path):
    parent = write(tmp_path, BASE + "  train.lr: fast\n", "parent.yaml")
    child = write(tmp_path, "extends: parent.yaml\n", "child.yaml")
    err = grid_error(child)
    assert err.file == str(parent.resolve()) and err.line == 4 and err.key == "train.lr"


# --- bad grids: one error naming file, line, key and what was expected ------------------------------

BAD = {
    "unknown top-level key": (
        BASE + "axis:\n  model.spa.ratio: [0.5]\n",
        4,
        "axis",
        "unknown top-level key; expected one of",
    ),
    "config-key axis given a mapping": (
        BASE + "axes:\n  model.spa.ratio: {a: 0.5}\n",
        5,
        "model.spa.ratio",
        "expected a list of its values",
    ),
    "empty axis": (BASE + "axes:\n  model.spa.ratio: []\n", 5, "model.spa.ratio", "at least one value"),
    "repeated axis values": (
        BASE + "axes:\n  model.spa.ratio: [0.5, 0.5]\n",
        5,
        "model.spa.ratio",
        "values repeat",
    ),
    "axes not a mapping": (BASE + "axes: [model.spa.ratio]\n", 4, "axes", "expected a mapping"),
    "point not a mapping": (BASE + "points:\n  - dense\n", 5, "points[0]", "non-empty mapping"),
    "missing extends file": (
        "extends: nowhere.yaml\n",
        1,
        "extends",
        "grid file 'nowhere.yaml' does not exist",
    ),
    "missing plugin file": (
        BASE + "plugins: [nothere.py]\n",
        4,
        "plugins",
        "plugin file 'nothere.py' does not exist",
    ),
    "missing plugin module": (BASE + "plugins: [tp_no_such.module]\n", 4, "plugins", "cannot be found"),
    "bad seeds": (BASE + "seeds: 0\n", 4, "seeds", "expected a positive count"),
    "repeated seeds": (BASE + "seeds: [1, 1]\n", 4, "seeds", "seeds repeat"),
    "not a mapping": ("- a\n- b\n", 1, None, "a grid is a mapping"),
    "name not a string": (BASE + "name: [a]\n", 4, "name", "expected a string"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_grid(tmp_path, case):
    assert_bad_grid(tmp_path, *BAD[case])
