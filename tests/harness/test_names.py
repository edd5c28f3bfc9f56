"""harness/names.py and every place a name becomes a path: ``..``, ``/``, absolute, empty and very
long names are refused by the grid loader, the command line and the results store, and nothing is
written outside the results root."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.cli import main
from harness.config import trial_from_dict
from harness.grid import GridError, load_grid
from harness.names import MAX_NAME_LEN, UnsafeNameError, check_name, inside, name_problem, safe_name
from harness.results import ResultsStore
from harness.results import UnsafeNameError as StoreNameError
from harness.run.runner import TrialDirname, run_grid

GOOD = ["smoke", "ratio=0.25,selection=topk", "topk-0.5", "a+b", "-1", "x" * MAX_NAME_LEN, "_", "v1.2"]
BAD = [
    "",
    ".",
    "..",
    ".hidden",
    "../../escaped",
    "a/b",
    "/abs",
    "C:\\x",
    "a\\b",
    "x" * (MAX_NAME_LEN + 1),
    "a b",
    "naïve",
    "a\nb",
    "a\0b",
    "~user",
    "$HOME",
]
# What reaches the loader, the CLI and the store: path-like names above all.
PATHLIKE = ["..", "../../escaped", "/abs/olute", "", "x" * 300, "a/b"]


@pytest.mark.parametrize("name", GOOD)
def test_plain_names_pass(name):
    assert name_problem(name) is None and check_name(name) == name and safe_name(name) == name


@pytest.mark.parametrize("name", BAD)
def test_other_names_are_refused_with_the_reason(name):
    problem = name_problem(name)
    assert problem is not None
    with pytest.raises(UnsafeNameError, match=r"^--name .* is not a plain name: "):
        check_name(name, "--name")
    assert name_problem(safe_name(name)) is None


def test_non_strings_are_not_names():
    assert name_problem(None) == "expected a string, got NoneType" and name_problem(3) is not None


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_safe_name_is_always_plain_and_keeps_plain_names(text):
    out = safe_name(text)
    assert name_problem(out) is None
    assert (out == text) == (name_problem(text) is None)


def test_inside():
    assert inside("/r", "/r/a/b") and inside("/r/", "/r") and not inside("/r", "/r/../x")
    assert not inside("/r", "/rx") and not inside("/r", "/etc")


# --- the grid loader -----------------------------------------------------------------------------------

BASE = "base:\n  preset: micro\n"


@pytest.mark.parametrize("name", PATHLIKE)
def test_loader_refuses_a_grid_name_that_is_a_path(tmp_path, name):
    grid = tmp_path / "g.yaml"
    grid.write_text(f"name: {name!r}\n" + BASE)
    with pytest.raises(GridError) as err:
        load_grid(grid)
    assert err.value.file == str(grid.resolve()) and err.value.line == 1 and err.value.key == "name"
    assert "is not a plain name" in str(err.value) and "\n" not in str(err.value)


def test_loader_refuses_a_file_stem_that_is_no_name_and_path_like_points_and_labels(tmp_path):
    grid = tmp_path / "my grid.yaml"
    grid.write_text(BASE)
    with pytest.raises(GridError, match=r"the grid file's stem .*'my grid' is not a plain name"):
        load_grid(grid)
    grid.write_text("name: ok\n" + BASE)
    assert load_grid(grid).name == "ok"
    for body, key in (
        ("points:\n  - {name: '..', model.variant: dense}\n", "name"),
        ("points:\n  - {name: /etc, model.variant: dense}\n", "name"),
        ("axes:\n  sel:\n    ../x: {model.spa.ratio: 0.5}\n", "sel.../x"),
    ):
        grid.write_text("name: ok\n" + BASE + body)
        with pytest.raises(GridError) as err:
            load_grid(grid)
        assert err.value.key == key and "is not a plain name" in str(err.value)


def test_crossed_trial_names_name_plain_folders():
    """A crossed trial's name holds its labels (values may be anything); Tune's folder of it is plain."""
    h = "0123456789abcdef"
    trial = SimpleNamespace(
        config={"trial": {"config_hash": h, "spec": ("__ref_ph", "x")}}
    )  # as Tune holds it
    name = TrialDirname({h: "spa={'gate': 'x/../y'},ratio=0.5" + "z" * 200})(trial)
    assert name_problem(name) is None and name.endswith("-0123456789abcdef")


# --- the command line -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PATHLIKE)
def test_cli_refuses_a_path_as_name_and_writes_nothing(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    grid = tmp_path / "g.yaml"
    grid.write_text("name: fine\n" + BASE)
    results = tmp_path / "deep" / "results"
    assert main(["run", str(grid), "--name", name, "--results", str(results), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("error: --name ") and "is not a plain name" in out and out.count("\n") == 1
    grid.write_text(f"name: {name!r}\n" + BASE)
    assert main(["run", str(grid), "--results", str(results), "--no-progress"]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"error: {grid.resolve()}:1: name: ") and out.count("\n") == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["g.yaml"]  # nothing written, inside or out


# --- the results store --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PATHLIKE)
def test_store_refuses_experiment_names_that_leave_one_folder(tmp_path, name):
    store = ResultsStore(str(tmp_path / "r"))
    with pytest.raises(StoreNameError):
        store.experiment(name)


@pytest.mark.parametrize("part", ["..", "../../x", "/abs", "", "a/b", "x" * 300])
def test_store_refuses_trial_paths_that_leave_the_trial_folder(tmp_path, part):
    exp = ResultsStore(str(tmp_path / "r")).experiment("e")
    with pytest.raises(StoreNameError):
        exp.write_row(part, {"status": "done"})
    with pytest.raises(StoreNameError):
        exp.write_text("0123abcd", part or "..", "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "r" / "x").exists()


def test_store_names_stay_inside_the_root(tmp_path):
    exp = ResultsStore(str(tmp_path / "r")).experiment("e.1")
    exp.write_row("0123abcd", {"status": "done"})
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(inside(str(tmp_path / "r"), str(p)) for p in written)


def test_run_grid_refuses_a_path_as_experiment_before_writing(tmp_path):
    with pytest.raises(StoreNameError):
        run_grid(
            [trial_from_dict({"preset": "micro"})],
            results=str(tmp_path / "r"),
            experiment="../x",
            progress=False,
        )
    assert not any(Path(tmp_path).rglob("*"))
