"""Experiment tracking of a grid run: one run per trial under one run for the grid, in MLflow
(``mlflow.py``) or W&B (``wandb.py``), beside the results store, which stays the record the report is
built from. ``base.py`` holds the interface both implement and what they log.

``spa-harness run GRID --track mlflow[=URI]`` (default URI: the file store
``RESULTS/<experiment>/mlruns``, a ``file:`` URI; any MLflow tracking URI works the same: a server
``http://host:5000``, ``sqlite:///mlflow.db``) or ``--track wandb[=[ENTITY/]PROJECT]`` (default
project: the experiment's name; offline unless ``WANDB_MODE`` says otherwise, run files under
``WANDB_DIR``, else ``RESULTS/<experiment>/wandb`` for a store on the local disk). Per trial:

- params (W&B: config): the flattened trial config (``model.spa.ratio``, ``train.steps``, ...);
- tags: ``name``, ``seed``, ``config_hash``, ``status`` (running, then done / failed / timeout),
  ``error`` for a trial that did not finish, the harness's ``run_id`` and ``git_commit``, ``reused``
  (W&B: the status is the run's tag, with ``reused`` for a reused row, and a summary key, with
  ``error``; the rest is config, under ``harness``);
- metrics with a step: ``train/task_loss``, ``train/gate_loss``, ``train/loss``,
  ``train/kept_fraction`` every ``train.log_every`` micro-steps (``harness.task.train.train_variant``'s
  ``on_log``: means since the previous point), logged by the process that trains rank 0 while it
  trains (MLflow), or by the trial's process when the trial ends (W&B);
- metrics without a step (W&B: summary): every number of the trial's final row (``map``, ``gmacs``,
  ``speedup_vs_dense``, ``infer_ms``, ...), config columns left out.

A trial whose row comes from the store instead of running (done in an earlier run of this
experiment, or copied from another experiment by config hash) gets a closed run of its own, tagged
``reused=true`` with ``reused_from`` (the experiment that ran it), the row's own ``git_commit`` and
``source_run_id``, its final metrics and no curve: a tracked grid always has its grid run and one
run per trial. The grid's run holds the report (``report/report.md`` with its plots and
``report/report.html``; W&B: an artifact of type ``report``) and the trials' states. The file store
needs ``MLFLOW_ALLOW_FILE_STORE=true`` in MLflow 3 (set here for ``file:`` URIs; a reader such as
``mlflow ui --backend-store-uri file:RESULTS/EXP/mlruns`` needs it too).

Flow: the driver calls ``start_grid`` (a ``TrackRef`` that Tune passes to each trial with its
``TrialContext``) and ``log_reused`` per reused trial, the trial process ``start_trial`` /
``finish_trial``, the rank-0 worker ``step_logger``, the driver ``finish_grid``. A tracking failure
inside a trial, or for one reused row, is a logged warning, never a failed trial.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Mapping
from typing import Any

from harness.config import TrialConfig, trial_to_dict
from harness.run.tracking.base import (
    CURVE_PREFIX,
    Backend,
    GridInfo,
    ReportFiles,
    TrackingError,
    TrackingSpec,
    TrackRef,
    row_metrics,
    trial_params,
    trial_tags,
)
from harness.run.tracking.mlflow import MlflowBackend, default_mlflow_uri
from harness.run.tracking.wandb import WandbBackend

__all__ = [
    "KINDS",
    "BACKENDS",
    "CURVE_PREFIX",
    "Backend",
    "TrackingError",
    "TrackingSpec",
    "TrackRef",
    "StepLogger",
    "parse_track",
    "default_mlflow_uri",
    "start_grid",
    "start_trial",
    "step_logger",
    "finish_trial",
    "log_reused",
    "finish_grid",
    "row_metrics",
    "trial_params",
    "trial_tags",
]

log = logging.getLogger(__name__)

BACKENDS: dict[str, Backend] = {"mlflow": MlflowBackend(), "wandb": WandbBackend()}
KINDS = tuple(BACKENDS)


def parse_track(value: str | TrackingSpec | None) -> TrackingSpec | None:
    """``mlflow``, ``mlflow=URI``, ``wandb`` or ``wandb=[ENTITY/]PROJECT`` as a ``TrackingSpec``; raises
    ``TrackingError`` for another kind or a kind whose package is not installed."""
    if value is None or isinstance(value, TrackingSpec):
        spec = value
    else:
        kind, _, uri = str(value).partition("=")
        spec = TrackingSpec(kind.strip().lower(), uri.strip() or None)
    if spec is None:
        return None
    if spec.kind not in KINDS:
        raise TrackingError(
            f"--track {spec.kind!r}: expected one of {', '.join(KINDS)} (e.g. mlflow or mlflow=URI)"
        )
    if importlib.util.find_spec(spec.kind) is None:
        extra = "pip install 'spa-harness[track]'"
        raise TrackingError(f"--track {spec.kind}: the {spec.kind} package is not installed ({extra})")
    return spec


def start_grid(
    spec: TrackingSpec | str,
    experiment: str,
    experiment_uri: str,
    *,
    harness_run_id: str,
    git_commit: str | None = None,
    source: str | None = None,
    trials: int = 0,
    reused: int = 0,
) -> TrackRef:
    """Open the grid's run (driver side): ``trials`` in the grid, ``reused`` of them with a stored
    row. Raises ``TrackingError`` when the tracking store cannot be reached or created, before any
    trial runs."""
    spec = parse_track(spec)
    assert spec is not None
    grid = GridInfo(experiment, experiment_uri, harness_run_id, git_commit, source, trials, reused)
    try:
        return BACKENDS[spec.kind].start_grid(spec, grid)
    except TrackingError:
        raise
    except Exception as e:
        raise TrackingError(
            f"--track {spec.kind}: cannot open the tracking store: {type(e).__name__}: {e}"
        ) from e


def start_trial(ref: TrackRef | None, cfg: TrialConfig, config_hash: str) -> str | None:
    """Open one trial's run (its params and tags, status running); its id, or None (no tracking, or
    the tracking store failed: a warning)."""
    if ref is None:
        return None
    cfg_dict = trial_to_dict(cfg)
    return _guard(
        "start the run of trial " + str(cfg_dict.get("name")),
        lambda: BACKENDS[ref.kind].start_trial(ref, cfg_dict, config_hash),
    )


class StepLogger:
    """``on_log(step, metrics)`` of ``train_variant`` for one trial's run: logs each point as it
    comes (MLflow) and keeps them in ``points`` (W&B logs them when the trial ends), each metric
    named ``train/<name>``."""

    def __init__(self, ref: TrackRef, run_id: str) -> None:
        self.ref, self.run_id = ref, run_id
        self.points: list[tuple[int, dict[str, float]]] = []
        self._live = BACKENDS[ref.kind].live_logger(ref, run_id)
        self._warned = False

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        metrics = {CURVE_PREFIX + k: float(v) for k, v in metrics.items()}
        self.points.append((int(step), metrics))
        if self._live is None:
            return
        try:
            self._live(int(step), metrics)
        except Exception as e:  # the trial goes on without its curve
            if not self._warned:
                log.warning(
                    "tracking: cannot log step %d of run %s: %s: %s", step, self.run_id, type(e).__name__, e
                )
                self._warned = True


def step_logger(ref: TrackRef | None, run_id: str | None) -> StepLogger | None:
    """The ``on_log`` callback for the process that trains rank 0 (None without a run)."""
    if ref is None or run_id is None:
        return None
    return _guard("open the step logger", lambda: StepLogger(ref, run_id))


def finish_trial(
    ref: TrackRef | None,
    run_id: str | None,
    row: Mapping[str, Any],
    points: list[tuple[int, dict[str, float]]] | None = None,
) -> None:
    """Log the final row's metrics and status, and close the run (finished when ``done``, failed
    otherwise). ``points``: the curve, for a backend that does not log it live."""
    if ref is None or run_id is None:
        return
    _guard(f"finish run {run_id}", lambda: BACKENDS[ref.kind].finish_trial(ref, run_id, row, points or []))


def log_reused(ref: TrackRef | None, row: Mapping[str, Any], from_experiment: str) -> None:
    """One closed run, tagged reused, for a trial whose ``row`` came from the store (from the
    experiment ``from_experiment``) instead of running."""
    if ref is None:
        return
    _guard(
        f"log the reused row of trial {row.get('name')}",
        lambda: BACKENDS[ref.kind].log_reused(ref, row, from_experiment),
    )


def finish_grid(
    ref: TrackRef | None, experiment_uri: str, states: Mapping[str, str], report_files: ReportFiles | None
) -> None:
    """Attach the report that ``report_files`` writes (the caller's renderer: Markdown with its
    plots, and HTML) to the grid's run, tag it with the trials' states, and close it."""
    if ref is None:
        return
    _guard(
        "finish the grid's run",
        lambda: BACKENDS[ref.kind].finish_grid(ref, experiment_uri, states, report_files),
    )


def _guard(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:
        log.warning("tracking: cannot %s: %s: %s", what, type(e).__name__, e)
        return None
