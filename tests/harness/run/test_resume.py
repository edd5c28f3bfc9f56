"""A trial killed mid-training (SIGKILL of its process, as a lost node or the OOM killer does) and run
again resumes at its last checkpoint and ends with the numbers of a trial that was never interrupted
(CPU, micro preset, one thread: deterministic). Each run is a fresh Python process running the Tune
function of one trial, as a Tune worker does."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.config import config_hash, trial_from_dict
from harness.results import Experiment

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
RUN_ONE_TRIAL = """
import json, sys
import ray.tune
ray.tune.report = lambda *a, **k: None  # no Tune session in this process
from harness.config import config_hash, trial_from_dict
from harness.run.rows import RunInfo, TrialSpec, tune_payload
from harness.run.trial import TrialContext, trial_trainable
cfg = trial_from_dict(json.loads(sys.argv[1]))
spec = TrialSpec(cfg, config_hash(cfg))
context = TrialContext(sys.argv[2], sys.argv[3], RunInfo(sys.argv[4], "abc"))
trial_trainable({"trial": tune_payload(spec.config_hash)}, context, {spec.config_hash: spec})
"""
STEPS = 60
EVERY = 4
COMPARED = ("task_loss", "gate_loss", "map", "map_50", "gate_recall", "gate_precision", "kept_fraction")


def _cfg(cache, every: int) -> dict:
    return {
        "name": "resume",
        "preset": "micro",
        "seed": 2,
        "model": {"drop_path_rate": 0.2, "spa": {"selection": "gate"}},
        "train": {"steps": STEPS, "batch_size": 2, "warmup_steps": 5, "checkpoint_every": every},
        "data": {"num_train": 12, "num_val": 4, "image_size": 64, "cache_dir": str(cache)},
        "bench": {"batch_size": 2, "warmup": 0, "repeats": 1, "train_step": False},
    }


def _start(cfg: dict, store: Path, experiment: str, run_id: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-c", RUN_ONE_TRIAL, json.dumps(cfg), str(store), experiment, run_id],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(p: subprocess.Popen, timeout: float = 900) -> None:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-5000:]


def test_a_killed_trial_resumes_at_its_checkpoint_with_the_uninterrupted_numbers(tmp_path):
    cache, store = tmp_path / "cache", tmp_path / "store"
    uninterrupted = _cfg(cache, every=0)
    _finish(_start(uninterrupted, store, "plain", "run-1"))
    h = config_hash(trial_from_dict(uninterrupted))
    plain = Experiment(str(store), "plain").read_row(h)
    assert plain["status"] == "done" and plain["resumed_step"] == 0

    checkpointed = _cfg(cache, every=EVERY)
    assert config_hash(trial_from_dict(checkpointed)) == h  # checkpoints do not change what is computed
    exp = Experiment(str(store), "killed")
    latest = Path(exp.trial_path(h, "checkpoint")) / "latest.json"
    p = _start(checkpointed, store, "killed", "run-1")
    deadline = time.monotonic() + 900
    while not latest.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.poll() is None, "the trial ended before its first checkpoint: " + p.communicate()[0][-3000:]
    os.kill(p.pid, signal.SIGKILL)  # the process this test started
    p.communicate()
    assert exp.read_row(h) is None  # killed: no row
    marker = json.loads(latest.read_text())
    assert 0 < marker["optimizer_step"] < STEPS and marker["optimizer_step"] % EVERY == 0

    _finish(_start(checkpointed, store, "killed", "run-2"))  # the rerun
    row = exp.read_row(h)
    assert row["status"] == "done" and row["resumed_step"] >= marker["optimizer_step"]
    assert row["resumed_step"] < STEPS and row["steps"] == STEPS
    for k in COMPARED:
        assert row[k] == plain[k] or (math.isnan(row[k]) and math.isnan(plain[k])), (k, row[k], plain[k])
    assert not Path(exp.trial_path(h, "checkpoint")).exists()  # a done trial keeps no checkpoint
