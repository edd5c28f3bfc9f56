"""harness/grid/comparisons.py: the equivalence margin and the contrasts a grid declares, read,
checked against the grid's variants, merged under `extends` and carried to the report."""

from __future__ import annotations

import dataclasses

import pytest

from harness.config import config_hash
from harness.grid import BUILTIN_GRIDS_DIR, Comparisons, Contrast, load_grid
from tests.harness.grid._grid_files import BASE, POINTS, assert_bad_grid, grid_error, write


def test_equivalence_margin_and_contrasts_travel_in_the_grid(tmp_path):
    path = write(
        tmp_path,
        BASE
        + POINTS
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
        write(tmp_path, BASE + POINTS + "contrasts: {where-the-gate-looks: [gate, gate-random]}\n")
    )
    assert labelled.comparisons.contrasts == (Contrast("where-the-gate-looks", "gate", "gate-random"),)
    assert labelled.comparisons.equivalence_margin is None
    assert load_grid(write(tmp_path, BASE)).comparisons == Comparisons()
    # they change no trial
    assert [config_hash(t) for t in labelled.trials] == [config_hash(t) for t in grid.trials]


def test_extends_replaces_the_margin_and_the_contrasts_when_given(tmp_path):
    write(
        tmp_path,
        BASE + POINTS + "equivalence_margin: 0.01\ncontrasts: [[gate, gate-random]]\n",
        "parent.yaml",
    )
    child = load_grid(write(tmp_path, "extends: parent.yaml\nseeds: 2\n", "child.yaml"))
    assert child.comparisons.equivalence_margin == 0.01 and len(child.comparisons.contrasts) == 1
    other = load_grid(
        write(tmp_path, "extends: parent.yaml\nequivalence_margin: 0.02\ncontrasts: null\n", "c2.yaml")
    )
    assert other.comparisons.equivalence_margin == 0.02 and other.comparisons.contrasts == ()
    # a child whose points drop a contrast's variant: the parent's contrast is named at its own line
    write(tmp_path, "extends: parent.yaml\npoints:\n  - {name: dense, model.variant: dense}\n", "c3.yaml")
    err = grid_error(tmp_path / "c3.yaml")
    assert err.file == str((tmp_path / "parent.yaml").resolve()) and "unknown variant 'gate'" in str(err)


def test_the_default_grid_contrasts_the_gate_with_random_places_at_equal_compute():
    """The default grid's contrast asks where the gate looks: its two rows keep the same share of each
    image's tokens and differ in nothing but the policy that places them."""
    grid = load_grid(BUILTIN_GRIDS_DIR / "default.yaml")
    by_name = {t.name: t for t in grid.trials if t.seed == grid.seeds[0]}
    for c in grid.comparisons.contrasts:
        assert {c.a, c.b} <= by_name.keys()
    assert [(c.a, c.b) for c in grid.comparisons.contrasts] == [("gate", "random")]
    gate, rand = by_name["gate"], by_name["random"]
    assert (gate.model.spa.selection, rand.model.spa.selection) == ("topk", "random")
    assert gate.model.spa.ratio == rand.model.spa.ratio

    def without_policy(t):
        return dataclasses.replace(t.model, spa=dataclasses.replace(t.model.spa, selection=""))

    assert without_policy(gate) == without_policy(rand)
    assert (gate.head, gate.data, gate.train, gate.seed) == (rand.head, rand.data, rand.train, rand.seed)
    assert grid.comparisons.equivalence_margin is not None


# --- bad grids: one error naming file, line, key and what was expected ------------------------------

BAD = {
    "contrast of an unknown variant": (
        BASE + POINTS + "contrasts:\n  - [dense, gate]\n  - [gate, gate-rand]\n",
        10,
        "contrasts[1]",
        "unknown variant 'gate-rand' in a contrast; the grid's variants: dense, gate, gate-random",
    ),
    "contrast label of an unknown variant": (
        BASE + POINTS + "contrasts:\n  where: [gat, gate-random]\n",
        9,
        "contrasts.where",
        "unknown variant 'gat'",
    ),
    "contrast of a variant with itself": (
        BASE + POINTS + "contrasts: [[gate, gate]]\n",
        8,
        "contrasts[0]",
        "two different variants",
    ),
    "contrast not a pair": (
        BASE + POINTS + "contrasts:\n  - [dense, gate, gate-random]\n",
        9,
        "contrasts[0]",
        "a pair of variant names",
    ),
    "contrasts not a list or mapping": (BASE + "contrasts: gate\n", 4, "contrasts", "expected a list of"),
    "contrast declared twice": (
        BASE + POINTS + "contrasts:\n  - [gate, dense]\n  - [gate, dense]\n",
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
    assert_bad_grid(tmp_path, *BAD[case])
