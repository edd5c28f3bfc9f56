"""The Tune function's bookkeeping without Ray: skip, retries, failure rows, timeouts, dead processes."""

import dataclasses
import json
import os
import threading
import time

import pytest
import ray.tune

from harness.config import config_hash, flatten_config, trial_from_dict, trial_to_dict
from harness.results import Experiment, ResultsStore
from harness.run import trial as trial_mod
from harness.run import worker as worker_mod
from harness.run.progress import GridCallback
from harness.run.rows import DeadTrialRecorder, RunInfo, TrialSpec, tune_payload
from harness.run.trial import TrialContext, _Watchdog, trial_trainable


@pytest.fixture
def setup(tmp_path, monkeypatch):
    reports = []
    monkeypatch.setattr(ray.tune, "report", lambda metrics, **kw: reports.append(metrics))
    cfg = trial_from_dict({"name": "t", "preset": "micro", "resources": {"retries": 1}})
    spec = TrialSpec(cfg, config_hash(cfg))
    ctx = TrialContext(str(tmp_path), "exp", RunInfo("run-1", "abc123"))
    exp = ResultsStore(str(tmp_path)).experiment("exp")
    return spec, spec.config_hash, ctx, exp, reports


def _ok(*a, **k):
    return {
        "train_time_s": 1.0,
        "eval_time_s": 0.5,
        "bench_time_s": 0.25,
        "gmacs": 0.1,
        "world_size": 1,
    }, 0.01


def test_a_retry_after_an_exception_finishes_the_trial(setup, monkeypatch):
    spec, h, ctx, exp, reports = setup
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("transient")
        return _ok()

    monkeypatch.setattr(trial_mod, "_fit", flaky)
    trial_trainable({"trial": tune_payload(spec.config_hash)}, ctx, {spec.config_hash: spec})
    row = exp.read_row(h)
    assert row["status"] == "done" and row["attempt"] == 2 and len(calls) == 2
    assert row["work_s"] == 1.75 and row["overhead_s"] == pytest.approx(row["wall_s"] - 1.75)
    assert row["git_commit"] == "abc123" and row["config_hash"] == h and row["preset"] == "micro"
    assert reports == [{"status": "done", "wall_s": row["wall_s"], "overhead_s": row["overhead_s"]}]
    assert not os.path.exists(exp.trial_path(h, "error.txt"))


def test_exhausted_retries_leave_a_failed_row_with_the_error(setup, monkeypatch):
    spec, h, ctx, exp, reports = setup

    def oom(*a, **k):
        raise MemoryError("cannot allocate 40 GiB")

    monkeypatch.setattr(trial_mod, "_fit", oom)
    trial_trainable({"trial": tune_payload(spec.config_hash)}, ctx, {spec.config_hash: spec})
    row = exp.read_row(h)
    assert row["status"] == "failed" and row["attempt"] == 2
    assert row["error"].startswith("out of memory") and row["error_type"] == "MemoryError"
    assert "MemoryError: cannot allocate" in row["traceback"] and row["gmacs"] is None
    assert "MemoryError" in open(exp.trial_path(h, "error.txt")).read()


class _ProcessDied(BaseException):
    """Stands for the trial's process ending with its node: nothing after it runs in that process."""


@pytest.mark.parametrize("retries", [0, 1, 2])
def test_an_attempt_whose_process_died_counts_when_tune_restarts_the_trial(setup, monkeypatch, retries):
    """Tune restarts a trial whose process died with its node; the restarted call goes on with the
    next attempt of the same run, so ``resources.retries`` bounds both kinds of retry together. A
    later run (another run id) starts again at attempt 1."""
    spec, h, ctx, exp, reports = setup
    spec = dataclasses.replace(
        spec,
        cfg=dataclasses.replace(spec.cfg, resources=dataclasses.replace(spec.cfg.resources, retries=retries)),
    )
    calls = []

    def dies_once(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise _ProcessDied
        return _ok()

    monkeypatch.setattr(trial_mod, "_fit", dies_once)
    with pytest.raises(_ProcessDied):
        trial_trainable({"trial": tune_payload(h)}, ctx, {h: spec})
    assert exp.read_row(h) is None
    trial_trainable({"trial": tune_payload(h)}, ctx, {h: spec})  # Tune's restart, same run
    row = exp.read_row(h)
    if retries == 0:
        assert row["status"] == "failed" and row["error_type"] == "TrialProcessLost" and len(calls) == 1
        assert "attempt 1 of 1" in row["error"]
    else:
        assert row["status"] == "done" and row["attempt"] == 2 and len(calls) == 2
    later = dataclasses.replace(ctx, run=RunInfo("run-2", "abc123"), rerun=True)
    trial_trainable({"trial": tune_payload(h)}, later, {h: spec})
    assert exp.read_row(h)["attempt"] == 1


def test_a_stored_row_is_not_run_again(setup, monkeypatch):
    spec, h, ctx, exp, reports = setup
    monkeypatch.setattr(trial_mod, "_fit", lambda *a, **k: pytest.fail("must not run"))
    exp.write_row(h, {"status": "done", "config_hash": h, "run_id": "older"})
    trial_trainable({"trial": tune_payload(spec.config_hash)}, ctx, {spec.config_hash: spec})
    exp.write_row(
        h, {"status": "timeout", "config_hash": h, "run_id": "run-1"}
    )  # this run's (Tune retried it)
    trial_trainable({"trial": tune_payload(spec.config_hash)}, ctx, {spec.config_hash: spec})
    assert [r["skipped"] for r in reports] == [True, True]


def test_rerun_replaces_a_done_row_of_an_earlier_run(setup, monkeypatch):
    spec, h, ctx, exp, reports = setup
    monkeypatch.setattr(trial_mod, "_fit", _ok)
    exp.write_row(h, {"status": "done", "config_hash": h, "run_id": "older", "gmacs": 9.0})
    ctx.rerun = True
    trial_trainable({"trial": tune_payload(spec.config_hash)}, ctx, {spec.config_hash: spec})
    row = exp.read_row(h)
    assert row["run_id"] == "run-1" and row["gmacs"] == 0.1


def test_watchdog_beats_then_times_out(tmp_path, monkeypatch):
    exp = Experiment(str(tmp_path), "exp")
    exits, fired = [], threading.Event()
    monkeypatch.setattr(trial_mod, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(os, "_exit", lambda code: (exits.append(code), fired.set()))
    with _Watchdog(exp, "h", 0.3, lambda: exp.write_text("h", "timed-out", "yes"), {"attempt": 1}):
        assert exp.read_json(exp.trial_path("h", "running.json"))["attempt"] == 1
        assert fired.wait(5)
    assert exits == [3] and exp.read_bytes(exp.trial_path("h", "timed-out")) == b"yes"
    with _Watchdog(exp, "h2", 60, lambda: pytest.fail("no timeout"), {}):
        time.sleep(0.1)  # leaving the block stops the watchdog


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_the_last_resort_frees_the_placement_groups_of_a_multi_worker_trial(setup, monkeypatch, workers):
    """Past its deadline and the workers' grace, the watchdog ends the trial's process, and Ray
    Train's controller with it: the placement groups its rank 0 recorded would keep their CPUs until
    the run ends, so the watchdog removes them first (a one-worker trial has none)."""
    _, _, ctx, exp, _ = setup
    cfg = trial_from_dict(
        {"name": "t", "preset": "micro", "resources": {"workers": workers, "timeout_s": 0.2}}
    )
    spec = TrialSpec(cfg, config_hash(cfg))
    released, exits, fired = [], [], threading.Event()
    monkeypatch.setattr(trial_mod, "_WORKER_STOP_GRACE_S", 0.1)
    monkeypatch.setattr(trial_mod, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(trial_mod, "release_placement_groups", lambda e, h: released.append(h))
    monkeypatch.setattr(os, "_exit", lambda code: (exits.append(code), fired.set()))
    monkeypatch.setattr(trial_mod, "_fit", lambda *a, **k: (fired.wait(10), _ok())[1])  # a stuck fit
    row = trial_mod._run_attempt(spec, ctx, exp, attempt=1)  # returns once the watchdog has fired
    assert exits == [3] and exp.read_row(spec.config_hash)["status"] == "timeout"
    assert released == ([spec.config_hash] if workers > 1 else [])
    assert row["status"] == "done"  # the fake fit returns after the watchdog: the process would be gone


def test_a_row_names_the_baseline_but_does_not_spread_it_into_columns(setup, monkeypatch):
    """The grid's baseline (model and head of its dense point) is in config_json; the row's config
    columns are the trial's own."""
    from harness.config import BaselineConfig

    _, _, ctx, exp, _ = setup
    cfg = trial_from_dict({"name": "t", "preset": "micro"})
    dense = trial_from_dict({"preset": "micro", "model": {"variant": "dense"}})
    cfg.baseline = BaselineConfig(name="dense", model=dense.model, head=dense.head)
    spec = TrialSpec(cfg, config_hash(cfg))
    assert spec.config_hash == config_hash(trial_from_dict({"name": "t", "preset": "micro"}))  # not hashed
    monkeypatch.setattr(trial_mod, "_fit", lambda *a, **k: ({**_ok()[0], "speedup_baseline": "dense"}, 0.01))
    trial_trainable({"trial": tune_payload(spec.config_hash)}, ctx, {spec.config_hash: spec})
    row = exp.read_row(spec.config_hash)
    assert row["status"] == "done" and row["speedup_baseline"] == "dense"
    assert not any(k.startswith("baseline") for k in row if k != "speedup_baseline")
    assert json.loads(row["config_json"])["baseline"]["model"]["variant"] == "dense"
    assert trial_from_dict(json.loads(row["config_json"])).baseline == cfg.baseline  # re-runnable as it ran


def test_flatten_config_keeps_dense_spa_as_null():
    cfg = trial_to_dict(trial_from_dict({"preset": "micro", "model": {"variant": "dense"}}))
    flat = flatten_config(cfg)
    assert flat["model.spa"] is None and flat["model.variant"] == "dense" and flat["train.steps"] == 300


class _DeadTrial:
    def __init__(self, spec, error):
        self.config = {"trial": tune_payload(spec.config_hash)}
        self._error = error

    def get_error(self):
        return self._error


def test_a_trial_process_that_died_gets_a_failed_row(setup):
    spec, h, ctx, exp, reports = setup
    exp.write_manifest({"run_id": "run-2", "trials": [{"name": "t", "config_hash": h, "workers": 1}]})
    exp.write_config(h, trial_to_dict(spec.cfg))  # as the runner stores it before Tune starts
    # as in the runner: the recorder writes the row, then the progress view shows it
    callbacks = [DeadTrialRecorder(ctx.store_uri, "exp"), GridCallback(ctx.store_uri, "exp", show=False)]
    for cb in callbacks:
        cb.setup()
        cb.on_trial_start(0, [], _DeadTrial(spec, None))
    err = "Traceback ...\nray.exceptions.OutOfMemoryError: Task was killed due to the node running low on memory."
    for cb in callbacks:
        cb.on_trial_error(0, [], _DeadTrial(spec, err))
    row = exp.read_row(h)
    assert row["status"] == "failed" and row["error_type"] == "OutOfMemoryError"
    assert "running low on memory" in row["error"] and row["run_id"] == "run-2"
    assert callbacks[1]._states[h]["state"] == "failed"  # the view shows what the recorder wrote
    # a row the trial wrote itself in this run (its timeout) is kept
    exp.write_row(h, {"status": "timeout", "config_hash": h, "run_id": "run-2"})
    for cb in callbacks:
        cb.on_trial_error(0, [], _DeadTrial(spec, err))
    assert exp.read_row(h)["status"] == "timeout"
    callbacks[1].on_experiment_end([])


def test_default_concurrency_caps_multi_worker_trials():
    from harness.run.runner import PlannedTrial, _default_concurrency

    def planned(workers, cpus=1.0, gpus=0.0):
        cfg = trial_from_dict(
            {
                "preset": "micro",
                "resources": {"workers": workers, "cpus_per_worker": cpus, "gpus_per_worker": gpus},
            }
        )
        return PlannedTrial(cfg, config_hash(cfg), "pending")

    assert _default_concurrency([planned(1), planned(1)], {"CPU": 2}) is None  # Tune counts these itself
    assert _default_concurrency([planned(2)] * 5, {"CPU": 2}) == 1
    assert _default_concurrency([planned(2), planned(1)], {"CPU": 2}) == 1  # the 2-worker one needs both
    assert _default_concurrency([planned(2), planned(1)], {"CPU": 5}) == 2
    assert _default_concurrency([planned(4, gpus=1)] * 3, {"CPU": 64, "GPU": 8}) == 2
    assert _default_concurrency([planned(2)], {"CPU": 1}) == 1  # never 0


@pytest.mark.parametrize("cpus, expected", [(2, 2), (1, 1), (0.5, 1), (1.9, 1)])
def test_trial_runs_on_its_cpus_as_torch_threads(cpus, expected):
    """A trial's torch threads follow its cpus_per_worker whatever the (reused) process had before,
    and the process's setting comes back after."""
    import torch

    prev = torch.get_num_threads()
    torch.set_num_threads(3 if expected != 3 else 1)
    before = torch.get_num_threads()
    try:
        with worker_mod.torch_threads(cpus) as n:
            assert n == expected == torch.get_num_threads()
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(prev)


def test_torch_reads_omp_num_threads_only_at_import():
    """Why the trial sets torch's threads itself: Ray sets OMP_NUM_THREADS for each task, but a reused
    worker process imported torch under the first task's value, and torch does not read it again."""
    import subprocess
    import sys

    code = (
        "import os, torch\n"
        "first = torch.get_num_threads()\n"
        "os.environ['OMP_NUM_THREADS'] = '2'\n"
        "print(first, torch.get_num_threads())\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "1"]


def test_a_failed_trial_points_at_the_user_code_and_its_error_file(setup, monkeypatch, tmp_path):
    """The row's error (what the console and ``status`` show) names the exception, the plugin's file and
    line it came from, and the file holding the whole traceback."""
    import importlib.util

    from harness.results import trial_states

    spec, h, ctx, exp, reports = setup
    plugin = tmp_path / "my_selection.py"
    plugin.write_text("def select(scores):\n    raise IndexError('no tokens to select')\n")
    mod_spec = importlib.util.spec_from_file_location("my_selection_for_trial_test", plugin)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    monkeypatch.setattr(trial_mod, "_fit", lambda *a, **k: mod.select(None))
    exp.write_manifest({"trials": [{"name": "t", "config_hash": h}]})
    trial_trainable({"trial": tune_payload(spec.config_hash)}, ctx, {spec.config_hash: spec})
    row = exp.read_row(h)
    error_file = exp.trial_path(h, "error.txt")
    assert row["status"] == "failed" and row["error_type"] == "IndexError"
    assert row["error"] == (
        f"IndexError: no tokens to select [in select at {plugin}:2; full traceback: {error_file}]"
    )
    assert "my_selection.py" in open(error_file).read()
    (state,) = trial_states(tmp_path)
    assert state["state"] == "failed" and state["detail"] == row["error"]


def test_a_restored_trial_the_run_did_not_plan_runs_from_its_stored_config(setup, monkeypatch):
    """Tune's state holds only config hashes: a trial it restores that this run's specs lack (its row
    landed after Tune's last save, then was removed) takes the config the store keeps for it."""
    spec, h, ctx, exp, reports = setup
    exp.write_config(h, trial_to_dict(spec.cfg))
    seen = []
    monkeypatch.setattr(trial_mod, "_fit", lambda s, *a, **k: (seen.append(s), _ok())[1])
    trial_trainable({"trial": tune_payload(h)}, ctx, {})
    assert seen == [spec] and exp.read_row(h)["status"] == "done"
