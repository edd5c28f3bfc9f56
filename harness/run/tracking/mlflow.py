"""The MLflow backend: one run per trial, nested under the grid's run (``mlflow.parentRunId``).

Every call goes through ``MlflowClient`` with explicit run ids, never MLflow's fluent API
(``mlflow.start_run``) and its active run per process: the trial's run is opened by the trial's
process, written to live by the rank-0 Ray Train worker (another process), and closed by the trial's
process, which outlives a worker that dies; and Tune reuses a trial's process for the next trial,
where a process-wide active run would carry over. ``mlflow`` is imported inside the calls: it is an
optional dependency (the ``track`` extra).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from harness.run.tracking.base import (
    CurveLogger,
    GridInfo,
    ReportFiles,
    TrackingError,
    TrackingSpec,
    TrackRef,
    config_of,
    reused_tags,
    row_metrics,
    state_counts,
    trial_params,
    trial_tags,
)

__all__ = ["MlflowBackend", "default_mlflow_uri"]

_BATCH = 100  # MLflow's limit of params (and a safe number of metrics) per log_batch call


def default_mlflow_uri(experiment_uri: str) -> str:
    """The file store beside an experiment's results: ``<experiment>/mlruns`` as a ``file:`` URI.
    Only for a store on the local disk; elsewhere a tracking URI must be given."""
    parsed = urlparse(experiment_uri)
    if parsed.scheme not in ("", "file") and len(parsed.scheme) > 1:  # a drive letter is no scheme
        raise TrackingError(
            f"results at {experiment_uri} are not on the local disk: give a tracking URI, "
            "--track mlflow=URI (e.g. http://host:5000 or sqlite:///mlflow.db)"
        )
    path = parsed.path if parsed.scheme == "file" else experiment_uri
    return (Path(path).resolve() / "mlruns").as_uri()


def _client(uri: str):
    if uri.startswith("file:"):
        # MLflow 3 refuses its file store unless told to use it (it is kept, not developed further).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class MlflowBackend:
    """``harness.run.tracking.base.Backend`` for MLflow."""

    def start_grid(self, spec: TrackingSpec, grid: GridInfo) -> TrackRef:
        uri = spec.uri or default_mlflow_uri(grid.experiment_uri)
        client = _client(uri)
        found = client.get_experiment_by_name(grid.experiment)
        exp_id = found.experiment_id if found is not None else client.create_experiment(grid.experiment)
        run = client.create_run(
            exp_id,
            run_name=f"{grid.experiment} {grid.harness_run_id}",
            tags={
                "kind": "grid",
                "harness_run_id": grid.harness_run_id,
                "git_commit": str(grid.git_commit),
                "results": grid.experiment_uri,
                "source": str(grid.source),
            },
        )
        run_id = run.info.run_id
        client.log_param(run_id, "trials", grid.trials)
        client.log_param(run_id, "trials_reused", grid.reused)
        return TrackRef("mlflow", uri, grid.experiment, exp_id, run_id, grid.harness_run_id, grid.git_commit)

    def _open(self, ref: TrackRef, name: str, cfg_dict: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """A trial run under the grid's run, with its params; its id."""
        from mlflow.entities import Param

        client = _client(ref.uri)
        tags = {"mlflow.parentRunId": ref.parent_run_id, "kind": "trial", **tags}
        run = client.create_run(ref.experiment_id, run_name=name, tags=tags)
        params = [Param(k, v) for k, v in trial_params(cfg_dict).items()]
        for i in range(0, len(params), _BATCH):
            client.log_batch(run.info.run_id, params=params[i : i + _BATCH])
        return run.info.run_id

    def start_trial(self, ref: TrackRef, cfg_dict: Mapping[str, Any], config_hash: str) -> str:
        return self._open(ref, str(cfg_dict.get("name")), cfg_dict, trial_tags(ref, cfg_dict, config_hash))

    def live_logger(self, ref: TrackRef, run_id: str) -> CurveLogger:
        from mlflow.entities import Metric

        client = _client(ref.uri)

        def log_step(step: int, metrics: dict[str, float]) -> None:
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

        return log_step

    def finish_trial(
        self,
        ref: TrackRef,
        run_id: str,
        row: Mapping[str, Any],
        points: list[tuple[int, dict[str, float]]],
    ) -> None:
        from mlflow.entities import Metric, RunTag

        client = _client(ref.uri)
        now = int(time.time() * 1000)
        status = str(row.get("status"))
        params = set(trial_params(config_of(row)))
        metrics = [Metric(k, v, now, 0) for k, v in row_metrics(row, params).items()]
        for i in range(0, len(metrics), _BATCH):
            client.log_batch(run_id, metrics=metrics[i : i + _BATCH])
        tags = [RunTag("status", status)]
        if row.get("error"):
            tags += [
                RunTag("error", str(row["error"])[:4000]),
                RunTag("error_type", str(row.get("error_type"))),
            ]
        client.log_batch(run_id, tags=tags)
        client.set_terminated(run_id, "FINISHED" if status == "done" else "FAILED")

    def log_reused(self, ref: TrackRef, row: Mapping[str, Any], from_experiment: str) -> None:
        cfg = config_of(row)
        run_id = self._open(ref, str(row.get("name")), cfg, reused_tags(ref, row, from_experiment))
        self.finish_trial(ref, run_id, row, [])  # the row's curve is not stored: its metrics only

    def finish_grid(
        self,
        ref: TrackRef,
        experiment_uri: str,
        states: Mapping[str, str],
        report_files: ReportFiles | None,
    ) -> None:
        client = _client(ref.uri)
        for s, n in state_counts(states).items():
            client.set_tag(ref.parent_run_id, f"trials_{s}", str(n))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                for f in report_files(experiment_uri, Path(tmp)) if report_files else []:
                    if f.is_dir():
                        client.log_artifacts(ref.parent_run_id, str(f), f"report/{f.name}")
                    else:
                        client.log_artifact(ref.parent_run_id, str(f), "report")
        except Exception as e:  # no report (e.g. no finished row): the runs are still there
            client.set_tag(ref.parent_run_id, "report_error", f"{type(e).__name__}: {e}"[:4000])
        ok = all(s == "done" for s in states.values())
        client.set_terminated(ref.parent_run_id, "FINISHED" if ok else "FAILED")
