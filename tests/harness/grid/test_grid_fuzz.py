"""harness/grid/ under fuzzing: any YAML document, and the shipped grids with keys deleted or
duplicated, values of the wrong type and random scalars, either load or raise ``GridError`` with one
line naming the file; never another exception."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.grid import BUILTIN_GRIDS_DIR, TOP_LEVEL_KEYS, Grid, GridError, load_grid
from harness.plugins import isolated_registries

SETTINGS = dict(derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Keys the documents are made of: the grid's own, config keys (dotted and not) and noise.
KEYS = [k for k in TOP_LEVEL_KEYS if k != "plugins"] + [
    "preset",
    "model",
    "model.spa.ratio",
    "model.spa.selection",
    "model.variant",
    "spa",
    "ratio",
    "train.steps",
    "train",
    "steps",
    "data.image_size",
    "resources.workers",
    "workers",
    "seed",
    "name",
    "selection",
    "topk",
    "dense",
    "x",
    "",
]
# YAML's own syntax and the grid's words: text a hand edit could leave behind.
TOKENS = list("abc:- \n{}[],'\"&*!|>#.0\t") + [
    "<<: ",
    "&a ",
    "*a",
    "!!str ",
    "!!python/object:os.system ",
    "base",
    "axes",
    "points",
    "name",
    "---\n",
    "...\n",
    "  ",
    "model.spa.ratio",
    "preset: micro",
    "\ufeff",
    "\x00",
]
# Plugin specs that import nothing: a missing file, a wrong type, an empty list.
PLUGIN_VALUES = st.sampled_from(["nothere.py", "sub/missing.py", 3, [], [None], [""]])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        ["micro", "tiny", "topk", "dense", "spa", "gate", "containers", "0.5", "..", "/x", "smoke"]
    ),
    st.text(max_size=12),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)
    ),
    max_leaves=20,
)
documents = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), values, max_size=6),
    st.fixed_dictionaries(
        {},
        optional={
            "plugins": PLUGIN_VALUES,
            "base": values,
            "axes": values,
            "points": values,
            "seeds": values,
            "name": scalars,
        },
    ),
    values,
)


@pytest.fixture(scope="module")
def clean_registries():
    with isolated_registries():
        yield


def _load_or_grid_error(path: Path) -> None:
    try:
        grid = load_grid(path)
    except GridError as e:
        msg = str(e)
        assert e.file is not None and msg.startswith(e.file), msg  # names the file (this one or a parent)
        assert "\n" not in msg, msg  # one line
        return
    assert isinstance(grid, Grid) and len(grid) >= 1


@settings(max_examples=200, **SETTINGS)
@given(doc=documents)
def test_random_documents_load_or_raise_a_grid_error(tmp_path, clean_registries, doc):
    path = tmp_path / f"g{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    _load_or_grid_error(path)


@settings(max_examples=100, **SETTINGS)
@given(tokens=st.lists(st.sampled_from(TOKENS), max_size=30))
def test_random_text_loads_or_raises_a_grid_error(tmp_path, clean_registries, tokens):
    text = "".join(tokens)
    path = tmp_path / f"t{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(text)
    _load_or_grid_error(path)


# --- mutations of the shipped grids --------------------------------------------------------------


def _shipped() -> dict[str, dict]:
    """The shipped grids with their relative extends / plugins made absolute (they are written elsewhere)."""
    out = {}
    for path in sorted(BUILTIN_GRIDS_DIR.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if "extends" in doc:
            doc["extends"] = str(BUILTIN_GRIDS_DIR / doc["extends"])
        if "plugins" in doc:
            doc["plugins"] = [str((BUILTIN_GRIDS_DIR / p).resolve()) for p in doc["plugins"]]
        out[path.stem] = doc
    return out


SHIPPED = _shipped()


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _mutate(doc, path, op, value):
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    key = path[-1]
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = value
    elif op == "wrap":  # the right value, the wrong shape
        parent[key] = [parent[key]] if not isinstance(parent[key], list) else {"x": parent[key]}


@settings(max_examples=150, **SETTINGS)
@given(data=st.data(), grid=st.sampled_from(sorted(SHIPPED)))
def test_mutated_shipped_grids_load_or_raise_a_grid_error(tmp_path, clean_registries, data, grid):
    doc = yaml.safe_load(yaml.safe_dump(SHIPPED[grid]))  # a deep copy
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths), label="path")
        op = data.draw(st.sampled_from(["delete", "replace", "wrap"]), label="op")
        _mutate(doc, path, op, data.draw(scalars, label="value"))
    text = yaml.safe_dump(doc)
    lines = text.splitlines(keepends=True)
    if lines and data.draw(st.booleans(), label="duplicate a line"):  # a duplicated key, as a hand edit makes
        i = data.draw(st.integers(0, len(lines) - 1), label="line")
        lines.insert(i, lines[i])
    path = tmp_path / f"{grid}-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text("".join(lines))
    _load_or_grid_error(path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "the grid file is empty"),
        ("# only a comment\n", "the grid file is empty"),
        ("---\n", "the grid file is empty"),
        ("null\n", "the grid file is empty"),
        ("- a\n", "a grid is a mapping"),
        ("3\n", "a grid is a mapping"),
        ("name: lonely\n", "the grid names no trial"),
        ("description: nothing\nseeds: 2\n", "the grid names no trial"),
        ("resources: {workers: 1}\n", "the grid names no trial"),
        ("axes: {}\npoints: []\n", "the grid names no trial"),
    ],
)
def test_grids_that_name_no_trial_are_refused(tmp_path, clean_registries, text, expected):
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(GridError) as err:
        load_grid(path)
    assert str(err.value).startswith(str(path.resolve())) and expected in str(err.value)


def test_an_empty_base_is_one_trial_of_the_defaults(tmp_path, clean_registries):
    path = tmp_path / "g.yaml"
    path.write_text("base: {}\n")
    assert len(load_grid(path)) == 1
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {path}\nname: child\n")  # inherits its parent's trials
    assert len(load_grid(child)) == 1


def test_nan_and_huge_numbers_are_grid_errors(tmp_path, clean_registries):
    for value in (math.nan, math.inf, 10**30):
        path = tmp_path / "g.yaml"
        path.write_text(yaml.safe_dump({"base": {"train.steps": value}}))
        _load_or_grid_error(path)


@pytest.mark.parametrize(
    "text, key, expected",
    [
        (
            "base: {preset: micro}\nseeds: 100000000000000000000\n",
            "seeds",
            "expected a positive count up to 10000",
        ),
        ("base: {model.spa: [{gate: linear}]}\n", "model.spa", "a value of the wrong type or shape"),
        (
            "base: {preset: micro}\naxes: {model.spa.ratio: [0.1, 0.2, 0.3, 0.4]}\nseeds: 5000\n",
            "axes",
            "the grid expands to 20000 trials",
        ),
    ],
)
def test_what_the_fuzzing_found(tmp_path, clean_registries, text, key, expected):
    """A huge seed count (expanded before: memory ran out) and a list where a section goes (a TypeError)."""
    path = tmp_path / "g.yaml"
    path.write_text(text)
    with pytest.raises(GridError) as err:
        load_grid(path)
    assert err.value.key == key and expected in str(err.value)
