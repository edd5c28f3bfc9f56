"""The Weights & Biases backend: one W&B run per trial in the grid's group, written by the trial's
process when the trial ends (its curve comes back with rank 0's row), and one run for the grid with
the report.

W&B's own API rather than Tune's ``WandbLoggerCallback``: that callback logs what a trial passes to
``tune.report``, and a trial here reports once, at its end; the curve is made by the Ray Train rank-0
worker and the final metrics go to the results store. Logging at the end also leaves one offline run
directory per trial (an offline run cannot be resumed from another process). ``wandb`` is imported
inside the calls: it is an optional dependency (the ``track`` extra).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from harness.config import flatten_config
from harness.run.tracking.base import (
    GridInfo,
    ReportFiles,
    TrackingError,
    TrackingSpec,
    TrackRef,
    config_of,
    reused_tags,
    row_metrics,
    state_counts,
    trial_tags,
)

__all__ = ["WandbBackend"]

_IDENTITY = ("config_hash", "experiment", "harness_run_id", "git_commit")  # config["harness"] of a trial


def _wandb_id() -> str:
    """A W&B run id (letters and digits), made here so the driver needs no W&B call."""
    return uuid.uuid4().hex[:12]


def _init(ref: TrackRef, **kw: Any):
    import wandb

    entity, _, project = ref.uri.rpartition("/")
    if ref.dir is not None:
        os.makedirs(ref.dir, exist_ok=True)
    return wandb.init(
        entity=entity or None,
        project=project,
        group=ref.experiment_id,
        dir=ref.dir,
        mode=ref.mode,
        reinit="create_new",  # several runs in one process (the driver, a reused trial actor)
        # the run opens after the work is done: the process's console and system metrics say nothing
        settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True),
        **kw,
    )


class WandbBackend:
    """``harness.run.tracking.base.Backend`` for W&B."""

    def start_grid(self, spec: TrackingSpec, grid: GridInfo) -> TrackRef:
        mode = os.environ.get("WANDB_MODE") or "offline"
        folder = os.environ.get("WANDB_DIR")
        if folder is None:
            parsed = urlparse(grid.experiment_uri)
            if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # on the local disk
                local = parsed.path if parsed.scheme == "file" else grid.experiment_uri
                folder = str(Path(local).resolve())
            elif mode in ("offline", "dryrun"):
                raise TrackingError(
                    f"results at {grid.experiment_uri} are not on the local disk: offline W&B runs need "
                    "WANDB_DIR (a folder on every node), or WANDB_MODE=online with WANDB_API_KEY"
                )
        return TrackRef(
            "wandb",
            spec.uri or grid.experiment,
            grid.experiment,
            f"{grid.experiment}-{grid.harness_run_id}",
            _wandb_id(),
            grid.harness_run_id,
            grid.git_commit,
            mode=mode,
            dir=folder,
        )

    def start_trial(self, ref: TrackRef, cfg_dict: Mapping[str, Any], config_hash: str) -> str:
        return _wandb_id()

    def live_logger(self, ref: TrackRef, run_id: str) -> None:
        return None

    def finish_trial(
        self,
        ref: TrackRef,
        run_id: str,
        row: Mapping[str, Any],
        points: list[tuple[int, dict[str, float]]],
    ) -> None:
        cfg = config_of(row)
        self._write(ref, run_id, row, trial_tags(ref, cfg, str(row.get("config_hash"))), points)

    def log_reused(self, ref: TrackRef, row: Mapping[str, Any], from_experiment: str) -> None:
        self._write(ref, _wandb_id(), row, reused_tags(ref, row, from_experiment), [])

    def _write(
        self,
        ref: TrackRef,
        run_id: str,
        row: Mapping[str, Any],
        tags: Mapping[str, str],
        points: list[tuple[int, dict[str, float]]],
    ) -> None:
        """One trial's run, whole: config, curve, summary, closed finished or failed."""
        status = str(row.get("status"))
        config = {k: v for k, v in flatten_config(config_of(row)).items() if k != "baseline"}
        reused = tags.get("reused") == "true"
        config["harness"] = {k: tags[k] for k in _IDENTITY}
        if reused:
            config["harness"].update(reused_from=tags["reused_from"], source_run_id=tags["source_run_id"])
        run = _init(
            ref,
            id=run_id,
            name=str(row.get("name")),
            job_type="trial",
            config=config,
            # W&B tags are short labels (at most 64 characters): the identity is config
            tags=[status, "reused"] if reused else [status],
        )
        try:
            for step, metrics in points:
                run.log(metrics, step=step)
            summary: dict[str, Any] = {**row_metrics(row, set(config)), "status": status}
            if row.get("error"):
                summary.update(error=str(row["error"])[:4000], error_type=str(row.get("error_type")))
            run.summary.update(summary)
        finally:
            run.finish(exit_code=0 if status == "done" else 1)

    def finish_grid(
        self,
        ref: TrackRef,
        experiment_uri: str,
        states: Mapping[str, str],
        report_files: ReportFiles | None,
    ) -> None:
        import wandb

        run = _init(
            ref,
            id=ref.parent_run_id,
            name=f"{ref.experiment} {ref.harness_run_id}",
            job_type="grid",
            config={
                "harness": {
                    "experiment": ref.experiment,
                    "harness_run_id": ref.harness_run_id,
                    "git_commit": str(ref.git_commit),
                    "results": experiment_uri,
                },
                "trials": len(states),
            },
        )
        ok = all(s == "done" for s in states.values())
        try:
            run.summary.update({f"trials_{s}": n for s, n in state_counts(states).items()})
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    if report_files is not None:
                        report_files(experiment_uri, Path(tmp))
                    art = wandb.Artifact(f"report-{ref.harness_run_id}", type="report")
                    art.add_dir(tmp)
                    run.log_artifact(art)  # add_dir copied the files: the folder may go
            except Exception as e:  # no report (e.g. no finished row): the runs are still there
                run.summary["report_error"] = f"{type(e).__name__}: {e}"[:4000]
        finally:
            run.finish(exit_code=0 if ok else 1)
