"""Rows taken from the store instead of run: ``spa-harness run --name B`` over a store whose
experiment A holds the grid's done rows copies them, says so per trial and in its summary with
``--no-progress``, records where they came from in ``experiment.json``, and with ``--track mlflow``
still makes the grid's run and one run per trial (tagged reused). No trial runs, so no Ray starts;
``test_tracking.py`` does the same after a real run of the smoke grid."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from harness.cli import main
from harness.config import config_hash, smoke_overrides, trial_to_dict
from harness.grid import load_grid
from harness.results import ResultsStore

mlflow = pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[3]
SMOKE = "ablations/grids/smoke.yaml"


def _store_with_done_rows(root: Path, experiment: str, commit: str) -> dict[str, str]:
    """Experiment ``experiment`` holding a done row for each trial of the smoke grid (CI size);
    config hash -> trial name."""
    grid = load_grid(ROOT / SMOKE, overrides=smoke_overrides())
    exp = ResultsStore(str(root)).experiment(experiment)
    names = {}
    for i, cfg in enumerate(grid.trials):
        h = config_hash(cfg)
        names[h] = cfg.name
        exp.write_row(
            h,
            {
                "name": cfg.name,
                "seed": cfg.seed,
                "config_hash": h,
                "status": "done",
                "error": None,
                "run_id": "run-a",
                "git_commit": commit,
                "hostname": "node-a",
                "node_id": f"{i:056x}",
                "map": 0.1 + i / 100,
                "gmacs": 1.0 + i,
                "wall_s": 10.0,
                "end_time": time.time(),
                "config_json": json.dumps(trial_to_dict(cfg), sort_keys=True),
            },
        )
    exp.write_manifest(
        {"name": experiment, "trials": [{"name": n, "config_hash": h} for h, n in names.items()]}
    )
    return names


def _mlflow_runs(uri: str, experiment: str) -> tuple[list, list]:
    client = mlflow.tracking.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("kind") == "grid"], [
        r for r in runs if r.data.tags.get("kind") == "trial"
    ]


def test_rows_reused_from_another_experiment_are_announced_recorded_and_tracked(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(ROOT)  # the grid named as a user in a checkout names it
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store = tmp_path / "results"
    names = _store_with_done_rows(store, "first", "a" * 40)
    args = ["run", SMOKE, "--smoke", "--results", str(store), "--name", "second", "--no-progress"]
    assert main([*args, "--no-report", "--track", "mlflow"]) == 0
    out = capsys.readouterr().out

    for h, name in names.items():  # per trial, naming the experiment
        assert f"second: reused {name} ({h}) from experiment first" in out, out
    assert "3 done" in out and "rows not run again: 3 reused from experiment first (--rerun runs them)" in out
    manifest = ResultsStore(str(store)).experiment("second").read_manifest()
    assert manifest["source"] == SMOKE  # as typed, not the resolved path of the copy that ran
    assert {(t["state"], t["reused_from"]) for t in manifest["trials"]} == {("done", "first")}

    uri = (store / "second" / "mlruns").as_uri()
    assert f"tracking: mlflow {uri}" in out
    grids, trials = _mlflow_runs(uri, "second")
    assert len(grids) == 1 and grids[0].info.status == "FINISHED"
    assert grids[0].data.params["trials"] == "3" and grids[0].data.params["trials_reused"] == "3"
    assert grids[0].data.tags["trials_done"] == "3"
    assert sorted(r.data.tags["config_hash"] for r in trials) == sorted(names)
    for run in trials:
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == grids[0].info.run_id and run.info.status == "FINISHED"
        assert (tags["reused"], tags["reused_from"], tags["status"]) == ("true", "first", "done")
        assert tags["git_commit"] == "a" * 40 and tags["source_run_id"] == "run-a"  # the row's origin
        assert run.data.params["train.steps"] == "4" and run.data.metrics["map"] >= 0.1

    # The same command again: the rows are this experiment's own now, kept, and tracked again.
    assert main([*args, "--no-report", "--track", "mlflow"]) == 0
    out = capsys.readouterr().out
    assert "3 trial(s) already done in this experiment, kept" in out
    assert "rows not run again: 3 kept from earlier runs" in out
    grids, trials = _mlflow_runs(uri, "second")
    assert len(grids) == 2 and len(trials) == 6
    assert sorted(r.data.tags["reused_from"] for r in trials) == ["first"] * 3 + ["second"] * 3


def test_a_reused_row_is_announced_with_the_live_view_off_and_nothing_else_is_printed(
    tmp_path, capsys, monkeypatch
):
    """Without tracking or a report, what remains is the reuse lines and the summary."""
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store = tmp_path / "results"
    names = _store_with_done_rows(store, "first", "b" * 40)
    assert (
        main(
            [
                "run",
                SMOKE,
                "--smoke",
                "--results",
                str(store),
                "--name",
                "again",
                "--no-progress",
                "--no-report",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    reuse = [ln for ln in lines if "reused" in ln and "from experiment first" in ln and ln.startswith("[")]
    assert len(reuse) == len(names)
    assert not any("tracking:" in ln for ln in lines)


@pytest.mark.parametrize("grid", ["smoke.yaml", "default.yaml", "paper.yaml"])
def test_a_key_added_at_its_old_behaviour_keeps_the_hash_a_store_knows(grid):
    """A row stored before ``model.stem`` existed has no such key in its config: at ``patch`` (what
    every backbone computed then) the trial's hash and its changes against that row are those of the
    config without the key, so the row is reused; ``patch2`` computes something else and hashes
    apart, and the change names it."""
    from harness.config import config_changes
    from harness.run.runner import rerun_reason

    for cfg in load_grid(Path(__file__).parents[3] / "ablations" / "grids" / grid).trials:
        d = trial_to_dict(cfg)
        before = json.loads(json.dumps(d))
        del before["model"]["stem"]
        if cfg.model.stem == "patch":
            assert config_hash(cfg) == config_hash(before)
            assert config_changes(before, d) == []
        else:
            assert config_hash(cfg) != config_hash(before)
            assert rerun_reason(cfg, {"config_json": json.dumps(before)}) == (
                f"config changed since the stored row: model.stem '(absent)' -> {cfg.model.stem!r}"
            )
        other = json.loads(json.dumps(d))
        other["model"]["stem"] = "patch2" if cfg.model.stem == "patch" else "patch"
        assert config_hash(other) != config_hash(cfg)
