"""The ``spa-harness`` command line without running trials: dry run, bad grids, status."""

from pathlib import Path

import pytest

from harness.cli import main
from harness.plugins import isolated_registries

SMOKE = Path(__file__).resolve().parents[2] / "ablations" / "grids" / "smoke.yaml"


def test_dry_run_prints_trials_and_resources_and_runs_nothing(tmp_path, capsys):
    assert main(["run", str(SMOKE), "--smoke", "--dry-run", "--results", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert out.count("would run") == 3 and "dense" in out and "--smoke" in out
    assert "│ 2       │ 2" in out  # the dense trial: 2 workers, 2 CPUs
    assert not (tmp_path / "r").exists()


def test_a_bad_grid_is_an_error_before_anything_runs(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nbase:\n  train.stepz: 3\n")
    assert main(["run", str(bad), "--results", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().out
    assert "error" in err and "stepz" in err
    assert not (tmp_path / "r").exists()


def test_status_of_an_empty_store(tmp_path, capsys):
    assert main(["status", str(tmp_path)]) == 1
    assert "no experiments" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "the grid file is empty"),
        ("- a\n", "a grid is a mapping"),
        ("name: x\n", "the grid names no trial"),
    ],
)
def test_empty_or_trialless_grids_exit_2_in_one_line(tmp_path, capsys, text, expected):
    grid = tmp_path / "g.yaml"
    grid.write_text(text)
    assert main(["run", str(grid), "--results", str(tmp_path / "r")]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"error: {grid.resolve()}") and expected in out and out.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_a_plugin_name_clash_is_one_line_in_variants_as_in_run(tmp_path, capsys):
    plugin = tmp_path / "clash.py"
    plugin.write_text(
        "from spa_core.registry import SELECTION_POLICIES\n\n"
        "SELECTION_POLICIES.register('topk', lambda scores, **kw: None)\n"
    )
    with isolated_registries():
        assert main(["variants", "--plugin", str(plugin)]) == 2
    variants = capsys.readouterr()
    with isolated_registries():
        assert (
            main(["run", str(SMOKE), "--dry-run", "--plugin", str(plugin), "--results", str(tmp_path / "r")])
            == 2
        )
    run = capsys.readouterr()
    assert variants.out == run.out and variants.err == run.err == "" and variants.out.count("\n") == 1
    assert variants.out.startswith(f"error: --plugin: plugin file '{plugin}' failed to load: KeyError: ")
    assert "'topk' is already registered (by builtin)" in variants.out
    assert f"[in <module> at {plugin}:3]" in variants.out  # the plugin's own line


def test_status_and_report_warn_about_a_damaged_row(tmp_path, capsys):
    from harness.results import ResultsStore

    exp = ResultsStore(str(tmp_path)).experiment("e")
    exp.write_manifest(
        {"name": "e", "trials": [{"name": "a", "config_hash": "h1"}, {"name": "b", "config_hash": "h2"}]}
    )
    exp.write_row("h1", {"name": "a", "config_hash": "h1", "status": "done", "wall_s": 1.0, "gmacs": 1.0})
    row = tmp_path / "e" / "trials" / "h2" / "row.json"
    row.parent.mkdir(parents=True)
    row.write_text('{"name": "b", "stat')
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert (
        out.err
        == f"warning: damaged file {row}: cannot be parsed (19 bytes: " + out.err.split("bytes: ", 1)[1]
    )
    assert "its trial counts as not done" in out.err and "1 done, 1 pending" in out.out
    main(["report", str(tmp_path), "--format", "csv"])
    assert str(row) in capsys.readouterr().err


def test_run_keeps_the_grids_margin_and_contrasts_for_the_report(tmp_path, monkeypatch, capsys):
    """``spa-harness run`` writes the grid's ``equivalence_margin`` and ``contrasts`` into
    ``experiment.json``, where ``report`` reads them (Tune replaced: nothing is trained)."""
    import harness.run.runner as runner
    from harness.grid import Comparisons, load_grid
    from harness.results import ResultsStore

    monkeypatch.setattr(runner, "_run_tune", lambda *a, **k: False)
    grid = tmp_path / "g.yaml"
    grid.write_text(
        "name: g\nbase: {preset: micro}\npoints:\n  - {name: dense, model.variant: dense}\n"
        "  - {name: topk, model.spa.selection: topk}\nequivalence_margin: 0.02\ncontrasts: [[topk, dense]]\n"
    )
    main(["run", str(grid), "--results", str(tmp_path / "r"), "--no-report", "--no-progress"])
    manifest = ResultsStore(str(tmp_path / "r")).experiment("g").read_manifest()
    assert Comparisons.from_dict(manifest["report"]) == load_grid(grid).comparisons
    assert manifest["report"]["equivalence_margin"] == 0.02


def test_status_shows_each_trials_node_and_commit_and_warns_about_mixed_commits(tmp_path, capsys):
    from harness.results import ResultsStore

    exp = ResultsStore(str(tmp_path)).experiment("e")
    trials = [{"name": n, "config_hash": f"h{n}"} for n in "abc"]
    exp.write_manifest({"name": "e", "trials": trials})
    for n, host, node, commit in (
        ("a", "host-1", "1a2b3c4d" + "0" * 48, "1" * 40),
        ("b", "host-1", "5e6f7a8b" + "0" * 48, "1" * 40),
    ):
        row = {"name": n, "config_hash": f"h{n}", "status": "done", "wall_s": 1.0, "gmacs": 1.0}
        exp.write_row(f"h{n}", {**row, "hostname": host, "node_id": node, "git_commit": commit})
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr()
    head = out.out.splitlines()[1]
    assert "node" in head and "commit" in head
    assert "host-1 (node 1a2b3c4d)" in out.out and "host-1 (node 5e6f7a8b)" in out.out
    assert out.out.count("1" * 12) == 2 and "1" * 13 not in out.out  # commits shortened to 12 digits
    assert out.err == ""  # one commit: no warning
    exp.write_row(
        "hc",
        {
            "name": "c",
            "config_hash": "hc",
            "status": "done",
            "wall_s": 1.0,
            "git_commit": "2" * 40 + "+dirty",
        },
    )
    assert main(["status", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err == f"warning: e: the rows come from 2 commits: {'1' * 12} (2), {'2' * 12}+dirty (1)\n"


def test_an_axis_overriding_a_base_key_is_a_warning_at_dry_run_and_at_the_start_of_run(
    tmp_path, capsys, monkeypatch
):
    import harness.run.runner as runner

    grid = tmp_path / "g.yaml"
    grid.write_text(f"extends: {SMOKE}\nname: g\nbase:\n  model.spa.ratio: 0.1\n")
    assert main(["run", str(grid), "--dry-run", "--results", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert f"warning: {SMOKE}:" in err and f"overrides model.spa.ratio = 0.1 set at {grid}:4" in err

    def stop(*args, **kwargs):  # the run starts no trial here: the warning came before it
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run_grid", stop)
    assert main(["run", str(grid), "--results", str(tmp_path / "r")]) == 130
    assert "overrides model.spa.ratio = 0.1" in capsys.readouterr().err
