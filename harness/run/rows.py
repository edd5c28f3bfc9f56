"""A trial's result row: the columns every row carries (identity, provenance, config, axis labels)
and the row of a trial that did not finish.

Every row of the store is built here, by the trial for what it ran (``base_row`` plus its
metrics) and for its failures (``failure_row``), and by ``DeadTrialRecorder`` for a trial whose
process died before it could write its own (the Linux OOM killer, Ray's memory monitor, a
segfault, a lost node).

A row, flat (what the report and users' scripts read):

- identity and outcome: ``name``, ``experiment``, ``config_hash``, ``seed``, ``run_id``, ``attempt``,
  ``status`` (done / failed / timeout), ``error``, ``error_type``, ``traceback`` (its tail);
- the config as dotted columns (``model.spa.ratio``; ``model.spa`` null for dense; lists as tuples),
  ``config_json``, and ``axis.<axis>`` the trial's value label on each grid axis;
- the task's metrics (``harness.task.train.train_variant``) and the measurements
  (``harness.task.measure``: ``gmacs``, timings, ``speedup_vs_dense``, memory, parameters);
- the run: ``world_size``, ``workers``, ``zero_stage``, ``precision``, ``dp_param_max_diff`` (the
  parameter checksum's spread across data-parallel ranks; 0 when in step), ``wall_s``, ``work_s``
  (train_time_s + eval_time_s + bench_time_s + paired_time_s), ``overhead_s`` (wall_s - work_s),
  ``startup_s``, ``deepspeed_setup_s``, ``prep_s``, ``worker_import_s``, ``node_id``, ``hostname``;
- provenance: ``git_commit``, ``{torch,deepspeed,ray,fvcore,triton}_version``, ``python_version``,
  ``device``, ``start_time``, ``end_time`` (epoch seconds).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any

import ray
from ray.tune import Callback

from harness.config import TrialConfig, flatten_config, trial_from_dict, trial_to_dict
from harness.errors import describe, is_oom, root_cause
from harness.provenance import package_versions
from harness.results import Experiment

__all__ = [
    "TrialSpec",
    "tune_payload",
    "tune_trial_hash",
    "RunInfo",
    "base_row",
    "failure_row",
    "error_tail",
    "error_message",
    "error_type",
    "node_id",
    "DeadTrialRecorder",
]

TRACEBACK_LINES = 40


@dataclass(frozen=True)
class TrialSpec:
    """One grid point: the typed config and its content hash (the store's key). Tune's param space
    holds only the hash (``tune_payload``); the trial function gets the specs by hash through
    ``tune.with_parameters``, which a restored run passes again. Objects in a param space would live
    in the object store of the driver that made them, and a restored run's trials would get dead
    references instead."""

    cfg: TrialConfig
    config_hash: str


def tune_payload(config_hash: str) -> dict[str, Any]:
    """One grid point of Tune's param space: plain data, which Tune saves and restores as it is."""
    return {"config_hash": config_hash}


def tune_trial_hash(trial: Any) -> str | None:
    """The config hash of a Tune trial (``None`` for a trial that is not a grid point)."""
    config = getattr(trial, "config", None)
    payload = config.get("trial") if isinstance(config, dict) else None
    h = payload.get("config_hash") if isinstance(payload, dict) else None
    return h if isinstance(h, str) else None


@dataclass(frozen=True)
class RunInfo:
    """What every row of one ``run`` records about the run itself."""

    run_id: str
    git_commit: str


def node_id() -> str | None:
    """Ray's id of the node this process runs on (``None`` outside Ray)."""
    try:
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


def base_row(spec: TrialSpec, run: RunInfo, attempt: int) -> dict[str, Any]:
    """The columns of every row: identity, provenance, the flattened config and the axis labels."""
    cfg = spec.cfg
    cfg_dict = trial_to_dict(cfg)
    row: dict[str, Any] = {
        "name": cfg.name,
        "config_hash": spec.config_hash,
        "seed": cfg.seed,
        "run_id": run.run_id,
        "attempt": attempt,
        "git_commit": run.git_commit,
        "config_json": json.dumps(cfg_dict, sort_keys=True),
        "workers": cfg.resources.workers,
    }
    row.update({f"{k}_version": v for k, v in package_versions().items()})
    row.update(node_id=node_id(), hostname=socket.gethostname())  # where the Tune trial's process ran
    # The baseline's model and head stay in config_json; the row names it in speedup_baseline. So do
    # the plugin sources: a trial's identity, not a setting a report compares variants by.
    row.update(
        flatten_config({k: v for k, v in cfg_dict.items() if k not in ("baseline", "axis", "plugin_sources")})
    )
    row.update({f"axis.{k}": v for k, v in cfg.axis.items()})  # the report's axis tables
    return row


def failure_row(
    spec: TrialSpec,
    run: RunInfo,
    *,
    status: str,
    error: str,
    error_type: str,
    tb: str,
    attempt: int,
    start: float,
    end: float | None = None,
) -> dict[str, Any]:
    """The row of a trial that did not finish: ``failed`` or ``timeout``, with the error."""
    end = end if end is not None else time.time()
    row = base_row(spec, run, attempt)
    row.update(
        status=status,
        error=error,
        error_type=error_type,
        traceback=tb,
        start_time=start,
        end_time=end,
        wall_s=end - start,
        gmacs=None,
    )
    return row


def error_tail(exc: BaseException, lines: int = TRACEBACK_LINES) -> str:
    tb = "".join(traceback.format_exception(exc))
    return "\n".join(tb.rstrip().splitlines()[-lines:])


def error_type(exc: BaseException) -> str:
    """The root cause's type name (Ray wraps a worker's exception in a TrainingFailedError)."""
    return type(root_cause(exc)).__name__


def error_message(exc: BaseException, traceback_path: str | None = None) -> str:
    """``Type: message [in func at file:line; full traceback: PATH]`` (``harness.errors.describe``:
    the innermost frame of user code, e.g. the plugin that raised), ``out of memory: `` first for
    an out-of-memory error."""
    return describe(exc, traceback_path=traceback_path, prefix="out of memory: " if is_oom(exc) else "")


class DeadTrialRecorder(Callback):
    """A Tune callback that writes the ``failed`` row of a trial whose process died before it could
    write its own, with Tune's error. It runs before the progress view, which then reads the row.

    It holds only the store URI and the experiment name: Tune pickles it with the experiment state
    and ``Tuner.restore`` brings it back; the rest is read from the store in ``setup``."""

    def __init__(self, store_uri: str, experiment: str) -> None:
        self.store_uri, self.experiment = store_uri, experiment

    def setup(self, **info: Any) -> None:
        self._exp = Experiment(self.store_uri, self.experiment)
        manifest = self._exp.read_manifest() or {}
        self._run = RunInfo(manifest.get("run_id") or "?", manifest.get("git_commit") or "?")
        self._started: dict[str, float] = {}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        h = tune_trial_hash(trial)
        if h is not None:
            self._started[h] = time.time()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        h = tune_trial_hash(trial)
        if h is None:
            return
        row = self._exp.read_row(h)
        if row is not None and (row.get("status") == "done" or row.get("run_id") == self._run.run_id):
            return  # the trial wrote its own row before its process ended
        # The config the runner stored for the trial (the trial's own object is in Ray's object store).
        spec = TrialSpec(
            trial_from_dict(self._exp.read_json(self._exp.trial_path(h, "config.json")) or {}), h
        )
        err = _tune_error(trial)
        first = _error_line(err)
        self._exp.write_text(h, "error.txt", err)
        self._exp.write_row(
            h,
            failure_row(
                spec,
                self._run,
                status="failed",
                error=first[:2000],
                error_type="OutOfMemoryError"
                if is_oom(err) or "memory" in first.lower()
                else "TrialProcessDied",
                tb="\n".join(err.splitlines()[-TRACEBACK_LINES:]),
                attempt=0,
                start=self._started.get(h, time.time()),
            ),
        )


def _error_line(err: str) -> str:
    """The line of a Tune error text that says what happened: of its last failure (Tune appends a
    ``Failure # n (occurred at ...)`` header per failure), the last ``...Error: ...`` line, else its
    first line."""
    lines = [ln.strip() for ln in err.strip().splitlines()]
    headers = [i for i, ln in enumerate(lines) if ln.startswith("Failure # ")]
    lines = [ln for ln in lines[headers[-1] + 1 if headers else 0 :] if ln]
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
    return (errors[-1] if errors else lines[0] if lines else "trial process died")[:2000]


def _tune_error(trial: Any) -> str:
    """Ray's error of a trial whose process died (a lost node: ``RayActorError``...). Tune writes it
    to the trial's local folder first and syncs it to the storage path later, where ``get_error``
    reads: with a URI store it is not there yet when this callback runs."""
    with contextlib.suppress(Exception):
        path = trial.error_file
        if path and os.path.exists(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read().strip()
            if text:
                return text
    for getter in ("get_error", "get_pickled_error"):
        try:
            err = getattr(trial, getter)()
        except Exception:
            err = None
        if err:
            return str(err)
    return "the trial's process died without an error report"
