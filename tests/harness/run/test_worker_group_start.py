"""A multi-worker trial's Ray Train worker group may wait for its workers until the trial's own
deadline (``resources.timeout_s``), not Ray Train's 60 s: on a busy node two workers that import torch
and DeepSpeed, or that wait for the previous trial's CPUs, start later than that (a CI run failed a
2-worker trial with "The worker group startup timed out after 60.0 seconds")."""

import os
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.config import config_hash, trial_from_dict
from harness.run import trial as trial_mod
from harness.run.rows import RunInfo, TrialSpec
from harness.run.trial import START_TIMEOUT_VAR, TrialContext
from harness.run.worker import WorkerJob
from tests.harness.run._fake_trainer import install_fake_trainer


def _fit(tmp_path, monkeypatch, deadline, fail=False):
    seen = install_fake_trainer(monkeypatch, fail=fail)
    cfg = trial_from_dict({"preset": "micro", "resources": {"workers": 2}})
    job = WorkerJob(TrialSpec(cfg, config_hash(cfg)), str(tmp_path), "exp", launched=0.0, deadline=deadline)
    context = TrialContext(str(tmp_path), "exp", RunInfo("r", "c"))
    if fail:
        with pytest.raises(RuntimeError, match="the worker group failed"):
            trial_mod._fit_ray_train(job, context, attempt=1)
    else:
        trial_mod._fit_ray_train(job, context, attempt=1)
    return seen["start_timeout"]


@settings(max_examples=25, deadline=None)
@given(left=st.floats(-100.0, 1e6), fail=st.booleans())
def test_the_worker_group_waits_until_the_trials_deadline(tmp_path_factory, left, fail):
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.delenv(START_TIMEOUT_VAR, raising=False)
        now = time.time()
        value = float(_fit(tmp_path_factory.mktemp("t"), monkeypatch, now + left, fail=fail))
        assert value >= 1.0  # never 0 or negative: Ray Train would give up at once
        # rounded up from the time left when the fit starts (a moment after the test read the clock)
        assert max(1.0, left) - 0.5 <= value <= max(1.0, left) + 1.0 + 1e-6 * abs(left)
        assert START_TIMEOUT_VAR not in os.environ  # restored for the process's next trial


def test_a_value_the_user_set_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv(START_TIMEOUT_VAR, "30")
    assert _fit(tmp_path, monkeypatch, time.time() + 600) == "30"
    assert os.environ[START_TIMEOUT_VAR] == "30"


def test_without_a_deadline_ray_trains_default_holds(tmp_path, monkeypatch):
    monkeypatch.delenv(START_TIMEOUT_VAR, raising=False)
    assert _fit(tmp_path, monkeypatch, float("inf")) is None
