"""harness/grid.py: expansion (cross product, excludes, points, seeds, extends, named axes) and one
clear error for every kind of bad grid, naming the file, the line and the key."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest

from harness.config import config_hash
from harness.grid import BUILTIN_GRIDS_DIR, GridError, load_grid
from harness.plugins import isolated_registries

BASE = """\
base:
  preset: micro
  train.steps: 2
"""


@pytest.fixture
def clean_registries():
    with isolated_registries():
        yield


def _write(tmp_path: Path, text: str, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(path: Path, **kw) -> GridError:
    with pytest.raises(GridError) as info:
        load_grid(path, **kw)
    return info.value


# --- expansion -------------------------------------------------------------------------------------


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
    path = _write(
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
    path = _write(
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


def test_extends_changes_only_what_differs(tmp_path):
    _write(
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
    path = _write(
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


def test_overrides_apply_last(tmp_path):
    path = _write(tmp_path, BASE + "axes:\n  model.spa.ratio: [0.5]\n")
    grid = load_grid(path, overrides={"train.steps": 1, "data.num_train": 8})
    assert grid.trials[0].train.steps == 1 and grid.trials[0].data.num_train == 8


def test_plugins_named_in_grid_are_loaded_and_recorded(tmp_path, clean_registries):
    (tmp_path / "plug.py").write_text(
        "from spa_core.registry import SELECTION_POLICIES\n"
        "from spa_core.select import select_topk\n"
        "SELECTION_POLICIES.register('tp_grid_policy', select_topk)\n"
    )
    path = _write(
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


# --- bad grids: one error naming file, line, key and what was expected ------------------------------

_POINTS = (  # three variants, for the contrasts
    "points:\n  - {name: dense, model.variant: dense}\n  - {name: gate, model.spa.selection: gate}\n"
    "  - {name: gate-random, model.spa.selection: gate_random}\n"
)

BAD = {
    "unknown top-level key": (
        BASE + "axis:\n  model.spa.ratio: [0.5]\n",
        4,
        "axis",
        "unknown top-level key; expected one of",
    ),
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
    "bad seeds": (BASE + "seeds: 0\n", 4, "seeds", "expected a positive count"),
    "repeated seeds": (BASE + "seeds: [1, 1]\n", 4, "seeds", "seeds repeat"),
    "seed in base": (BASE + "  seed: 3\n", 4, "seed", "top-level `seeds:`"),
    "unknown resources key": (
        BASE + "resources: {gpus: 1}\n",
        4,
        "resources.gpus",
        "unknown key resources.gpus",
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
    "duplicate YAML key": (BASE + "  preset: tiny\n", 4, "base.preset", "duplicate key"),
    "YAML syntax": (BASE + "axes: {model.spa.ratio: [0.5}\n", 4, None, "not valid YAML"),
    "not a mapping": ("- a\n- b\n", 1, None, "a grid is a mapping"),
    "trial name with a slash": (
        BASE + "points:\n  - {name: a/b, model.variant: dense}\n",
        5,
        "name",
        "'a/b' is not a plain name: contains '/'",
    ),
    "name not a string": (BASE + "name: [a]\n", 4, "name", "expected a string"),
    "contrast of an unknown variant": (
        BASE + _POINTS + "contrasts:\n  - [dense, gate]\n  - [gate, gate-rand]\n",
        10,
        "contrasts[1]",
        "unknown variant 'gate-rand' in a contrast; the grid's variants: dense, gate, gate-random",
    ),
    "contrast label of an unknown variant": (
        BASE + _POINTS + "contrasts:\n  where: [gat, gate-random]\n",
        9,
        "contrasts.where",
        "unknown variant 'gat'",
    ),
    "contrast of a variant with itself": (
        BASE + _POINTS + "contrasts: [[gate, gate]]\n",
        8,
        "contrasts[0]",
        "two different variants",
    ),
    "contrast not a pair": (
        BASE + _POINTS + "contrasts:\n  - [dense, gate, gate-random]\n",
        9,
        "contrasts[0]",
        "a pair of variant names",
    ),
    "contrasts not a list or mapping": (BASE + "contrasts: gate\n", 4, "contrasts", "expected a list of"),
    "contrast declared twice": (
        BASE + _POINTS + "contrasts:\n  - [gate, dense]\n  - [gate, dense]\n",
        10,
        "contrasts[1]",
        "declared twice",
    ),
    "negative equivalence margin": (
        BASE + "equivalence_margin: -0.01\n",
        4,
        "equivalence_margin",
        "expected a positive finite number",
    ),
    "equivalence margin not a number": (
        BASE + "equivalence_margin: small\n",
        4,
        "equivalence_margin",
        "expected a positive number",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_grid(tmp_path, case):
    text, line, key, expected = BAD[case]
    path = _write(tmp_path, text)
    err = _error(path)
    assert err.file == str(path.resolve())
    assert err.line == line, str(err)
    assert err.key == key, str(err)
    assert expected in str(err), str(err)
    prefix = f"{path.resolve()}:{line}: " + (f"{key}: " if key else "")
    assert str(err).startswith(prefix), str(err)


def test_missing_grid_file(tmp_path):
    err = _error(tmp_path / "absent.yaml")
    assert "does not exist" in str(err) and "absent.yaml" in str(err)


def test_extends_cycle(tmp_path):
    _write(tmp_path, "extends: b.yaml\n", "a.yaml")
    _write(tmp_path, "extends: a.yaml\n", "b.yaml")
    err = _error(tmp_path / "a.yaml")
    assert err.key == "extends" and "cycle" in str(err) and err.line == 1


def test_error_in_parent_names_the_parent(tmp_path):
    parent = _write(tmp_path, BASE + "  train.lr: fast\n", "parent.yaml")
    child = _write(tmp_path, "extends: parent.yaml\n", "child.yaml")
    err = _error(child)
    assert err.file == str(parent.resolve()) and err.line == 4 and err.key == "train.lr"


def test_bad_extra_plugin(tmp_path):
    path = _write(tmp_path, BASE)
    err = _error(path, extra_plugins=["missing_plugin.py"])
    assert err.key == "--plugin" and "does not exist" in str(err)


def test_bad_override(tmp_path):
    path = _write(tmp_path, BASE)
    err = _error(path, overrides={"train.stepz": 1})
    assert "unknown key train.stepz" in str(err)


def test_every_trial_carries_its_axis_labels_for_the_report(tmp_path):
    """A trial's label on each axis travels with it (``axis``, not hashed) into its row's ``axis.<axis>``
    columns, where the report's axis tables read them; a point has none."""
    from harness.run.rows import RunInfo, TrialSpec, failure_row  # the row builder every row goes through

    path = _write(
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


@pytest.mark.parametrize("key", ["axis.selection", "baseline.name"])
def test_keys_the_grid_sets_itself_are_refused(tmp_path, key):
    path = _write(tmp_path, f"base: {{preset: micro, {key}: x}}\n")
    assert "set by the grid itself" in str(_error(path))


# --- how the report judges the rows ----------------------------------------------------------------------


def test_equivalence_margin_and_contrasts_travel_in_the_grid(tmp_path):
    from harness.grid import Comparisons, Contrast

    path = _write(
        tmp_path,
        BASE
        + _POINTS
        + "equivalence_margin: 0.01\ncontrasts:\n  - [gate, gate-random]\n  - [gate-random, dense]\n",
    )
    grid = load_grid(path)
    assert grid.comparisons == Comparisons(
        0.01,
        (
            Contrast("gate vs gate-random", "gate", "gate-random"),
            Contrast("gate-random vs dense", "gate-random", "dense"),
        ),
    )
    assert Comparisons.from_dict(grid.comparisons.to_dict()) == grid.comparisons
    labelled = load_grid(
        _write(tmp_path, BASE + _POINTS + "contrasts: {where-the-gate-looks: [gate, gate-random]}\n")
    )
    assert labelled.comparisons.contrasts == (Contrast("where-the-gate-looks", "gate", "gate-random"),)
    assert labelled.comparisons.equivalence_margin is None
    assert load_grid(_write(tmp_path, BASE)).comparisons == Comparisons()
    # they change no trial
    assert [config_hash(t) for t in labelled.trials] == [config_hash(t) for t in grid.trials]


def test_extends_replaces_the_margin_and_the_contrasts_when_given(tmp_path):
    _write(
        tmp_path,
        BASE + _POINTS + "equivalence_margin: 0.01\ncontrasts: [[gate, gate-random]]\n",
        "parent.yaml",
    )
    child = load_grid(_write(tmp_path, "extends: parent.yaml\nseeds: 2\n", "child.yaml"))
    assert child.comparisons.equivalence_margin == 0.01 and len(child.comparisons.contrasts) == 1
    other = load_grid(
        _write(tmp_path, "extends: parent.yaml\nequivalence_margin: 0.02\ncontrasts: null\n", "c2.yaml")
    )
    assert other.comparisons.equivalence_margin == 0.02 and other.comparisons.contrasts == ()
    # a child whose points drop a contrast's variant: the parent's contrast is named at its own line
    _write(tmp_path, "extends: parent.yaml\npoints:\n  - {name: dense, model.variant: dense}\n", "c3.yaml")
    err = _error(tmp_path / "c3.yaml")
    assert err.file == str((tmp_path / "parent.yaml").resolve()) and "unknown variant 'gate'" in str(err)


def test_the_default_grid_declares_gate_against_gate_random():
    grid = load_grid(BUILTIN_GRIDS_DIR / "default.yaml")
    names = {t.name for t in grid.trials}
    for c in grid.comparisons.contrasts:
        assert {c.a, c.b} <= names
    assert any({c.a, c.b} == {"gate", "gate-random"} for c in grid.comparisons.contrasts), (
        "the default grid asks where the gate looks at equal compute: gate vs gate-random"
    )
    assert grid.comparisons.equivalence_margin is not None


# --- an axis that overrides a base key says so ---------------------------------------------------------


def _parent(tmp_path: Path) -> Path:
    return _write(tmp_path, "base:\n  preset: micro\n  model.spa.selection: topk\naxes:\n  model.spa.ratio: [0.25, 0.5]\n",
                  "parent.yaml")  # fmt: skip


def test_an_inherited_axis_overriding_the_childs_base_key_warns_naming_both_places(tmp_path):
    _parent(tmp_path)
    child = _write(
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
    child = _write(tmp_path, "extends: parent.yaml\nbase:\n  model.spa.ratio: 0.1\naxes:\n  model.spa.ratio: null\n",
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
    assert bool(load_grid(_write(tmp_path, text)).warnings) == warns


def test_a_child_sweeping_a_key_its_parents_base_sets_does_not_warn(tmp_path):
    _write(tmp_path, "base: {preset: micro, model.spa.ratio: 0.1}\n", "parent.yaml")
    child = _write(tmp_path, "extends: parent.yaml\naxes: {model.spa.ratio: [0.25, 0.5]}\n", "child.yaml")
    assert load_grid(child).warnings == []


@pytest.mark.parametrize("name", sorted(p.name for p in BUILTIN_GRIDS_DIR.glob("*.yaml")))
def test_the_builtin_grids_warn_of_nothing(name, clean_registries):
    assert load_grid(BUILTIN_GRIDS_DIR / name).warnings == []


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
    grid = load_grid(_write(tmp_path, text))
    assert {tuple(t.head.in_stages) for t in grid.trials} == {(2, 3)}
    bad = _write(tmp_path, BASE + "  head.in_stages: [2, 3]\n", "bad.yaml")
    err = _error(bad)
    assert "bad.yaml" in str(err) and "head.in_stages" in str(err)
