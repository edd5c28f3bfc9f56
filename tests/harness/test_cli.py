"""The ``spa-harness`` command line without running trials: dry run, bad grids, status."""

from pathlib import Path

from harness.cli import main

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
