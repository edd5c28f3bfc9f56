"""``harness.run.runner``: what a run restores and what it refuses, without starting Ray."""

import pytest

import harness.run.runner as runner
from harness.config import config_hash, trial_from_dict


@pytest.fixture
def tune_calls(monkeypatch):
    """``_run_tune`` replaced by a recorder of its ``restorable`` argument; it runs nothing."""
    calls = []

    def fake(pending, exp, manifest, address, max_concurrent, progress, tune_name, restorable, *rest):
        calls.append(restorable)
        return False

    monkeypatch.setattr(runner, "_run_tune", fake)
    return calls


def _interrupted_run(tmp_path, cfg):
    """A store whose last run of ``cfg`` was interrupted before its row landed."""
    runner.run_grid([cfg], results=str(tmp_path), experiment="e", progress=False)
    exp = runner.ResultsStore(str(tmp_path)).experiment("e")
    assert exp.read_manifest()["tune"]["trials"] == [config_hash(cfg)]


def test_an_interrupted_run_is_restored_only_with_the_same_retries(tmp_path, tune_calls):
    cfg = trial_from_dict({"name": "a", "resources": {"retries": 0}})
    _interrupted_run(tmp_path, cfg)
    runner.run_grid([cfg], results=str(tmp_path), experiment="e", progress=False)
    more = trial_from_dict({"name": "a", "resources": {"retries": 2}})
    assert config_hash(more) == config_hash(cfg)  # retries are not part of what the trial computes
    runner.run_grid([more], results=str(tmp_path), experiment="e", progress=False)
    assert tune_calls == [False, True, False]  # the new retries start a fresh Tune run


def test_a_local_results_path_on_a_cluster_is_refused_before_anything_is_written(tmp_path, tune_calls):
    cfg = trial_from_dict({"name": "a"})
    with pytest.raises(runner.SharedResultsError, match="--results-shared"):
        runner.run_grid([cfg], results=str(tmp_path / "r"), experiment="e", address="head:6379")
    assert not (tmp_path / "r").exists() and tune_calls == []
    runner.run_grid(
        [cfg],
        results=str(tmp_path / "r"),
        experiment="e",
        address="head:6379",
        results_shared=True,
        progress=False,
    )
    assert tune_calls == [False]


def test_the_grids_margin_and_contrasts_land_in_experiment_json_for_the_report(tmp_path, tune_calls):
    from harness.grid import Comparisons, Contrast

    declared = Comparisons(0.01, (Contrast("gate vs gate-random", "gate", "gate-random"),))
    cfg = trial_from_dict({"name": "a"})
    runner.run_grid(
        [cfg], results=str(tmp_path), experiment="e", progress=False, comparisons=declared.to_dict()
    )
    manifest = runner.ResultsStore(str(tmp_path)).experiment("e").read_manifest()
    assert Comparisons.from_dict(manifest["report"]) == declared
    runner.run_grid([cfg], results=str(tmp_path), experiment="e", progress=False)  # a caller without a grid
    assert "report" not in runner.ResultsStore(str(tmp_path)).experiment("e").read_manifest()


def _done_row(cfg) -> dict:
    import json

    from harness.config import trial_to_dict

    return {"name": cfg.name, "seed": cfg.seed, "status": "done", "config_hash": config_hash(cfg),
            "config_json": json.dumps(trial_to_dict(cfg), sort_keys=True)}  # fmt: skip


def test_plan_says_why_a_trial_with_a_stored_row_runs_again(tmp_path, tune_calls):
    """The plugin whose source changed (named with its file), the config keys that changed, a failed
    row, --rerun; a trial never run has no reason. The manifest keeps the reason for `status`."""
    from harness.results import ResultsStore, trial_states
    from spa_core.registry import SELECTION_POLICIES
    from spa_core.select import select_topk

    SELECTION_POLICIES.register("tp_reason", select_topk, origin="file /somewhere/my_variants.py")
    try:
        store = ResultsStore(str(tmp_path))
        exp = store.experiment("e")
        old = trial_from_dict({"name": "spa", "model": {"spa": {"selection": "tp_reason"}}})
        old.plugin_sources = {"selection_policy:tp_reason": "sha256:0000"}
        ratio = trial_from_dict({"name": "ratio", "model": {"spa": {"ratio": 0.25}}})
        failed = trial_from_dict({"name": "failed", "seed": 1})
        for cfg in (old, ratio):
            exp.write_row(config_hash(cfg), _done_row(cfg))
        exp.write_row(config_hash(failed), {**_done_row(failed), "status": "failed"})

        edited = trial_from_dict({"name": "spa", "model": {"spa": {"selection": "tp_reason"}}})
        edited.plugin_sources = {"selection_policy:tp_reason": "sha256:1111"}
        ratio2 = trial_from_dict({"name": "ratio", "model": {"spa": {"ratio": 0.1}}})
        new = trial_from_dict({"name": "new"})
        planned = {p.name: p for p in runner.plan([edited, ratio2, failed, new], store, "e")}
        assert planned["spa"].state == "pending"
        assert planned["spa"].reason == (
            "plugin changed since the stored row: selection_policy 'tp_reason' (file /somewhere/my_variants.py)"
        )
        assert planned["ratio"].reason == "config changed since the stored row: model.spa.ratio 0.25 -> 0.1"
        assert planned["failed"].reason == "its stored row is failed"
        assert planned["new"].reason is None
        assert all(p.reason == "--rerun" for p in runner.plan([new], store, "e", rerun=True))

        runner.run_grid([edited, new], results=str(tmp_path), experiment="e", progress=False)
        detail = {s["name"]: s["detail"] for s in trial_states(tmp_path / "e") if s["state"] == "pending"}
        assert detail["spa"].startswith("plugin changed since the stored row") and detail["new"] == ""
    finally:
        SELECTION_POLICIES.unregister("tp_reason")
