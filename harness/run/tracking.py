"""Experiment tracking of a grid run: one MLflow run per trial under a parent run for the grid (or
W&B runs in one group), beside the results store, which stays the record the report is built from.

``spa-harness run GRID --track mlflow[=URI]`` (default URI: the file store
``RESULTS/<experiment>/mlruns``, a ``file:`` URI; any MLflow tracking URI works the same: a server
``http://host:5000``, ``sqlite:///mlflow.db``) or ``--track wandb[=[ENTITY/]PROJECT]`` (default
project: the experiment's name; offline unless ``WANDB_MODE`` says otherwise, run files under
``WANDB_DIR``, else ``RESULTS/<experiment>/wandb`` for a store on the local disk). Per trial that runs:

- params (W&B: config): the flattened trial config (``model.spa.ratio``, ``train.steps``, ...);
- tags: ``name``, ``seed``, ``config_hash``, ``status`` (running, then done / failed / timeout),
  ``error`` for a trial that did not finish, the harness's ``run_id`` and ``git_commit`` (W&B: the
  status is the run's one tag and a summary key, with ``error``; the rest is config, under ``harness``);
- metrics with a step: ``train/task_loss``, ``train/gate_loss``, ``train/loss``,
  ``train/kept_fraction`` every ``train.log_every`` micro-steps (``harness.task.train.train_variant``'s
  ``on_log``: means since the previous point), logged by the process that trains rank 0 while it
  trains (MLflow), or by the trial's process when the trial ends (W&B);
- metrics without a step (W&B: summary): every number of the trial's final row (``map``, ``gmacs``,
  ``speedup_vs_dense``, ``infer_ms``, ...), config columns left out.

The grid's parent run holds the report (``report/report.md`` with its plots and
``report/report.html``; W&B: an artifact of type ``report``) and the trials' states. Trials that do
not run (done before, or copied from another experiment) get no run. The file store needs
``MLFLOW_ALLOW_FILE_STORE=true`` in MLflow 3 (set here for ``file:`` URIs; a reader such as
``mlflow ui --backend-store-uri file:RESULTS/EXP/mlruns`` needs it too).

Flow: the driver calls ``start_grid`` (a ``TrackRef`` that Tune passes to each trial with its
``TrialContext``), the trial process ``start_trial`` / ``finish_trial``, the rank-0 worker
``step_logger``, the driver ``finish_grid``. A tracking failure inside a trial is a logged warning,
never a failed trial.

Both backends (MLflow, W&B) answer the same five calls the runner and the trial make.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from harness.config import TrialConfig, flatten_config, trial_to_dict

__all__ = [
    "KINDS",
    "CURVE_PREFIX",
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
    "finish_grid",
]

log = logging.getLogger(__name__)

KINDS = ("mlflow", "wandb")
_BATCH = 100  # MLflow's limit of params (and a safe number of metrics) per log_batch call


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


# --------------------------------------------------------------------------------------------------
# the four calls of a grid run


def start_grid(
    spec: TrackingSpec | str,
    experiment: str,
    experiment_uri: str,
    *,
    harness_run_id: str,
    git_commit: str | None = None,
    source: str | None = None,
    trials: int = 0,
) -> TrackRef:
    """Open the grid's parent run (driver side); raises ``TrackingError`` when the tracking store
    cannot be reached or created, before any trial runs."""
    spec = parse_track(spec)
    assert spec is not None
    try:
        return _BACKENDS[spec.kind].start_grid(
            spec, experiment, experiment_uri, harness_run_id, git_commit, source, trials
        )
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
        lambda: _BACKENDS[ref.kind].start_trial(ref, cfg_dict, config_hash),
    )


CURVE_PREFIX = "train/"  # the curves' names: apart from the final row's task_loss, kept_fraction, ...


class StepLogger:
    """``on_log(step, metrics)`` of ``train_variant`` for one trial's run: logs each point as it
    comes (MLflow) and keeps them in ``points`` (W&B logs them when the trial ends), each metric
    named ``train/<name>``."""

    def __init__(self, ref: TrackRef, run_id: str) -> None:
        self.ref, self.run_id = ref, run_id
        self.points: list[tuple[int, dict[str, float]]] = []
        self._live = _BACKENDS[ref.kind].live_logger(ref, run_id)
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
    _guard(f"finish run {run_id}", lambda: _BACKENDS[ref.kind].finish_trial(ref, run_id, row, points or []))


ReportFiles = Callable[[str, Path], list[Path]]  # (experiment URI, folder) -> the report files it wrote


def finish_grid(
    ref: TrackRef | None, experiment_uri: str, states: Mapping[str, str], report_files: ReportFiles | None
) -> None:
    """Attach the report that ``report_files`` writes (the caller's renderer: Markdown with its
    plots, and HTML) to the parent run, tag it with the trials' states, and close it."""
    if ref is None:
        return
    _guard(
        "finish the grid's run",
        lambda: _BACKENDS[ref.kind].finish_grid(ref, experiment_uri, states, report_files),
    )


def _guard(what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:
        log.warning("tracking: cannot %s: %s: %s", what, type(e).__name__, e)
        return None


# --------------------------------------------------------------------------------------------------
# what gets logged


def trial_params(cfg_dict: Mapping[str, Any]) -> dict[str, str]:
    """The flattened trial config as strings (``baseline`` left out: the row names it)."""
    flat = flatten_config({k: v for k, v in cfg_dict.items() if k != "baseline"})
    return {k: str(v) for k, v in flat.items()}


def row_metrics(row: Mapping[str, Any], params: Mapping[str, Any] = ()) -> dict[str, float]:
    """Every number of a result row (booleans as 0/1) that is not a config column."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k in params or k.startswith("_") or k in ("seed", "attempt", "config_hash"):
            continue
        if isinstance(v, bool):
            out[k] = float(v)
        elif isinstance(v, int | float) and v is not None:
            out[k] = float(v)
    return out


def trial_tags(ref: TrackRef, cfg_dict: Mapping[str, Any], config_hash: str) -> dict[str, str]:
    return {
        "name": str(cfg_dict.get("name")),
        "seed": str(cfg_dict.get("seed")),
        "config_hash": config_hash,
        "status": "running",
        "experiment": ref.experiment,
        "harness_run_id": ref.harness_run_id,
        "git_commit": str(ref.git_commit),
    }


# --------------------------------------------------------------------------------------------------
# MLflow


class _Mlflow:
    @staticmethod
    def client(uri: str):
        if uri.startswith("file:"):
            # MLflow 3 refuses its file store unless told to use it (it is kept, not developed further).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=uri)

    def start_grid(
        self, spec, experiment, experiment_uri, harness_run_id, git_commit, source, trials
    ) -> TrackRef:
        uri = spec.uri or default_mlflow_uri(experiment_uri)
        client = self.client(uri)
        found = client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        run = client.create_run(
            exp_id,
            run_name=f"{experiment} {harness_run_id}",
            tags={
                "kind": "grid",
                "harness_run_id": harness_run_id,
                "git_commit": str(git_commit),
                "results": experiment_uri,
                "source": str(source),
            },
        )
        client.log_param(run.info.run_id, "trials", trials)
        return TrackRef("mlflow", uri, experiment, exp_id, run.info.run_id, harness_run_id, git_commit)

    def start_trial(self, ref, cfg_dict, config_hash) -> str:
        from mlflow.entities import Param

        client = self.client(ref.uri)
        tags = {
            "mlflow.parentRunId": ref.parent_run_id,
            "kind": "trial",
            **trial_tags(ref, cfg_dict, config_hash),
        }
        run = client.create_run(ref.experiment_id, run_name=str(cfg_dict.get("name")), tags=tags)
        params = [Param(k, v) for k, v in trial_params(cfg_dict).items()]
        for i in range(0, len(params), _BATCH):
            client.log_batch(run.info.run_id, params=params[i : i + _BATCH])
        return run.info.run_id

    def live_logger(self, ref, run_id) -> Callable[[int, dict[str, float]], None]:
        from mlflow.entities import Metric

        client = self.client(ref.uri)

        def log_step(step: int, metrics: dict[str, float]) -> None:
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

        return log_step

    def finish_trial(self, ref, run_id, row, points) -> None:
        from mlflow.entities import Metric, RunTag

        client = self.client(ref.uri)
        now = int(time.time() * 1000)
        status = str(row.get("status"))
        params = set(trial_params(_config_of(row)))
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

    def finish_grid(self, ref, experiment_uri, states, report_files) -> None:
        client = self.client(ref.uri)
        counts: dict[str, int] = {}
        for s in states.values():
            counts[s] = counts.get(s, 0) + 1
        for s, n in counts.items():
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


# --------------------------------------------------------------------------------------------------
# Weights & Biases


class _Wandb:
    """One W&B run per trial in the grid's group, written by the trial process when the trial ends
    (its curve comes back with rank 0's row), and one run for the grid with the report.

    W&B's own API rather than Tune's ``WandbLoggerCallback``: that callback logs what a trial passes
    to ``tune.report``, and a trial here reports once, at its end; the curve is made by the Ray Train
    rank-0 worker and the final metrics go to the results store. Logging at the end also leaves one
    offline run directory per trial (an offline run cannot be resumed from another process)."""

    @staticmethod
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

    def start_grid(
        self, spec, experiment, experiment_uri, harness_run_id, git_commit, source, trials
    ) -> TrackRef:
        mode = os.environ.get("WANDB_MODE") or "offline"
        folder = os.environ.get("WANDB_DIR")
        if folder is None:
            parsed = urlparse(experiment_uri)
            if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # on the local disk
                folder = str(Path(parsed.path if parsed.scheme == "file" else experiment_uri).resolve())
            elif mode in ("offline", "dryrun"):
                raise TrackingError(
                    f"results at {experiment_uri} are not on the local disk: offline W&B runs need "
                    "WANDB_DIR (a folder on every node), or WANDB_MODE=online with WANDB_API_KEY"
                )
        return TrackRef(
            "wandb",
            spec.uri or experiment,
            experiment,
            f"{experiment}-{harness_run_id}",
            _wandb_id(),
            harness_run_id,
            git_commit,
            mode=mode,
            dir=folder,
        )

    def start_trial(self, ref, cfg_dict, config_hash) -> str:
        return _wandb_id()

    def live_logger(self, ref, run_id) -> None:
        return None

    def finish_trial(self, ref, run_id, row, points) -> None:
        cfg = _config_of(row)
        status = str(row.get("status"))
        tags = trial_tags(ref, cfg, str(row.get("config_hash")))
        config = {k: v for k, v in flatten_config(cfg).items() if k != "baseline"}
        config["harness"] = {
            k: tags[k] for k in ("config_hash", "experiment", "harness_run_id", "git_commit")
        }
        run = self._init(
            ref,
            id=run_id,
            name=str(row.get("name")),
            job_type="trial",
            config=config,
            tags=[status],  # W&B tags are short labels (at most 64 characters): the identity is config
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

    def finish_grid(self, ref, experiment_uri, states, report_files) -> None:
        import wandb

        counts = {f"trials_{s}": sum(1 for v in states.values() if v == s) for s in set(states.values())}
        run = self._init(
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
            run.summary.update(counts)
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


def _wandb_id() -> str:
    """A W&B run id (letters and digits), made here so the driver needs no W&B call."""
    return uuid.uuid4().hex[:12]


def _config_of(row: Mapping[str, Any]) -> dict[str, Any]:
    import json

    try:
        cfg = json.loads(row.get("config_json") or "{}")
    except (TypeError, ValueError):
        cfg = {}
    return cfg if isinstance(cfg, dict) else {}


_BACKENDS: dict[str, Any] = {"mlflow": _Mlflow(), "wandb": _Wandb()}
