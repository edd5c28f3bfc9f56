"""A stand-in for Ray Train's ``TorchTrainer`` in ``harness.run.trial``, for tests of what a
multi-worker attempt hands Ray Train, without starting workers."""

import os
from typing import Any

import pytest

from harness.run import trial as trial_mod
from harness.run.trial import START_TIMEOUT_VAR


def install_fake_trainer(monkeypatch: pytest.MonkeyPatch, *, fail: bool = False) -> dict[str, Any]:
    """Replace ``TorchTrainer`` (and the placement-group cleanup, which needs Ray) for this test.
    Returns what the fake saw: its keyword arguments, and under ``start_timeout`` the value of
    ``START_TIMEOUT_VAR`` when ``fit`` ran (what ``TorchTrainer.fit`` reads and passes on). With
    ``fail`` its ``fit`` raises ``RuntimeError("the worker group failed")``."""
    seen: dict[str, Any] = {}

    class Trainer:
        def __init__(self, fn, **kwargs):
            seen.update(kwargs)

        def fit(self):
            seen["start_timeout"] = os.environ.get(START_TIMEOUT_VAR)
            if fail:
                raise RuntimeError("the worker group failed")
            return type("Result", (), {"return_value": {}})()

    monkeypatch.setattr(trial_mod, "TorchTrainer", Trainer)
    monkeypatch.setattr(trial_mod, "release_placement_groups", lambda *a: None)
    return seen
