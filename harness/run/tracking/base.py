"""The tracking interface: what a backend (``mlflow.py``, ``wandb.py``) implements, the values that
travel between the driver, the trial and the rank-0 worker, and what every backend logs.

A backend keeps one run per trial under one run for the grid. The runner and the trial never talk to
a backend directly: they call ``harness.run.tracking`` (``start_grid``, ``start_trial``,
``step_logger``, ``finish_trial``, ``log_reused``, ``finish_grid``), which picks the backend by
``TrackRef.kind`` and turns a failure inside a trial into a warning.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from harness.config import flatten_config

__all__ = [
    "CURVE_PREFIX",
    "Backend",
    "CurveLogger",
    "GridInfo",
    "ReportFiles",
    "TrackRef",
    "TrackingError",
    "TrackingSpec",
    "config_of",
    "reused_tags",
    "row_metrics",
    "state_counts",
    "trial_params",
    "trial_tags",
]

CURVE_PREFIX = "train/"  # the curves' names: apart from the final row's task_loss, kept_fraction, ...


class TrackingError(ValueError):
    """A ``--track`` value that cannot be used (unknown kind, package missing, no default URI)."""


@dataclass(frozen=True)
class TrackingSpec:
    """What ``--track`` asks for: ``kind`` (mlflow, wandb) and its ``uri`` (MLflow tracking URI or
    W&B ``[ENTITY/]PROJECT``; None: the default)."""

    kind: str
    uri: str | None = None


@dataclass(frozen=True)
class TrackRef:
    """Where a grid's trials log (picklable: Tune ships it to every trial with the context)."""

    kind: str
    uri: str  # MLflow tracking URI, or the W&B [entity/]project
    experiment: str
    experiment_id: str  # MLflow experiment id; the W&B group
    parent_run_id: str
    harness_run_id: str
    git_commit: str | None = None
    mode: str | None = None  # W&B: WANDB_MODE of the driver (offline when unset)
    dir: str | None = None  # W&B: the folder of its run files (WANDB_DIR, else the local results)


@dataclass(frozen=True)
class GridInfo:
    """The grid's run as the driver opens it: ``trials`` in the grid, of which ``reused`` have a row
    from the store already (logged with ``log_reused``) and the rest run."""

    experiment: str
    experiment_uri: str
    harness_run_id: str
    git_commit: str | None = None
    source: str | None = None
    trials: int = 0
    reused: int = 0


ReportFiles = Callable[[str, Path], list[Path]]  # (experiment URI, folder) -> the report files it wrote
CurveLogger = Callable[[int, dict[str, float]], None]  # (step, {train/<name>: value})


class Backend(Protocol):
    """One tracking backend. Who calls what, and where:

    - ``start_grid(spec, grid)`` (driver, before any trial): open the grid's run; return the
      ``TrackRef`` every later call receives. Raise on an unreachable store (the runner turns it
      into ``TrackingError``: the run stops before anything runs).
    - ``start_trial(ref, cfg_dict, config_hash)`` (the trial's process): open the trial's run with
      its params and tags, status running; return its run id.
    - ``live_logger(ref, run_id)`` (the rank-0 worker process): a ``CurveLogger`` that logs each
      curve point as it comes, or None when the backend logs the curve in ``finish_trial``.
    - ``finish_trial(ref, run_id, row, points)`` (the trial's process, also on failure or
      timeout): the final row's metrics and status; close the run (finished when ``done``).
      ``points``: the curve as ``[(step, {name: value})]``.
    - ``log_reused(ref, row, from_experiment)`` (driver): one closed run for a trial whose row came
      from the store (kept from an earlier run of this experiment, or copied from another), tagged
      ``reused`` with the experiment it came from, so a tracked grid has a run per trial.
    - ``finish_grid(ref, experiment_uri, states, report_files)`` (driver, at the end): attach the
      report ``report_files`` writes, record the trials' states (config hash -> status), close.
    """

    def start_grid(self, spec: TrackingSpec, grid: GridInfo) -> TrackRef: ...

    def start_trial(self, ref: TrackRef, cfg_dict: Mapping[str, Any], config_hash: str) -> str: ...

    def live_logger(self, ref: TrackRef, run_id: str) -> CurveLogger | None: ...

    def finish_trial(
        self,
        ref: TrackRef,
        run_id: str,
        row: Mapping[str, Any],
        points: list[tuple[int, dict[str, float]]],
    ) -> None: ...

    def log_reused(self, ref: TrackRef, row: Mapping[str, Any], from_experiment: str) -> None: ...

    def finish_grid(
        self,
        ref: TrackRef,
        experiment_uri: str,
        states: Mapping[str, str],
        report_files: ReportFiles | None,
    ) -> None: ...


# --------------------------------------------------------------------------------------------------
# what every backend logs


def trial_params(cfg_dict: Mapping[str, Any]) -> dict[str, str]:
    """The flattened trial config as strings (``baseline`` left out: the row names it)."""
    flat = flatten_config({k: v for k, v in cfg_dict.items() if k != "baseline"})
    return {k: str(v) for k, v in flat.items()}


def row_metrics(row: Mapping[str, Any], params: Mapping[str, Any] | set[str] = ()) -> dict[str, float]:
    """Every number of a result row (booleans as 0/1) that is not a config column."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k in params or k.startswith("_") or k in ("seed", "attempt", "config_hash"):
            continue
        if isinstance(v, bool | int | float):
            out[k] = float(v)
    return out


def trial_tags(ref: TrackRef, cfg_dict: Mapping[str, Any], config_hash: str) -> dict[str, str]:
    """A trial run's tags: its identity, this grid run, status running, not reused."""
    return {
        "name": str(cfg_dict.get("name")),
        "seed": str(cfg_dict.get("seed")),
        "config_hash": config_hash,
        "status": "running",
        "experiment": ref.experiment,
        "harness_run_id": ref.harness_run_id,
        "git_commit": str(ref.git_commit),
        "reused": "false",
    }


def reused_tags(ref: TrackRef, row: Mapping[str, Any], from_experiment: str) -> dict[str, str]:
    """A reused trial's tags: ``trial_tags`` with its row's status, the commit and harness run that
    made the row, and where it came from."""
    tags = trial_tags(ref, config_of(row), str(row.get("config_hash")))
    tags.update(
        status=str(row.get("status")),
        git_commit=str(row.get("git_commit")),  # the code that computed the row, not this run's
        reused="true",
        reused_from=from_experiment,
        source_run_id=str(row.get("run_id")),
    )
    return tags


def config_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """The trial config a row stores (``config_json``), or {} when it holds none."""
    try:
        cfg = json.loads(row.get("config_json") or "{}")
    except (TypeError, ValueError):
        cfg = {}
    return cfg if isinstance(cfg, dict) else {}


def state_counts(states: Mapping[str, str]) -> dict[str, int]:
    """Trials per state: ``{"done": 3, "failed": 1}``."""
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    return counts
