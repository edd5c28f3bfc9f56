"""Run a grid of trials on Ray Tune: plan against the results store, schedule, resume.

``run_grid(trials, results=..., experiment=...)``:

1. plans: every trial is keyed by its config hash; one with a ``done`` row in this experiment is
   kept, one with a ``done`` row in another experiment of the store is copied over (byte for byte,
   with ``reused.json`` naming where from), the rest are pending (``rerun=True``: all pending, old
   rows replaced when the new ones land). Each copied trial gets a line naming the experiment it
   came from, and the kept ones a line of their count, whatever the progress view
   (``harness.run.progress.announce_stored``);
2. writes ``experiment.json`` (the grid file as the user named it, the trial list with each trial's
   state and, for a copied row, ``reused_from``, and under ``report`` how the grid's rows are judged:
   its equivalence margin and contrasts, ``harness.grid.Comparisons.to_dict``) and each trial's
   ``config.json``; at the end the
   trial states in ``experiment.json`` are those of the rows in the store;
3. connects to Ray (``address`` / ``RAY_ADDRESS``: an existing cluster; otherwise an embedded local
   Ray bound to 127.0.0.1 with the dashboard off) and runs one Tune trial per pending grid point
   (``harness.run.trial.trial_trainable``, given the trials' typed ``TrialSpec`` by hash) with that trial's resources, at most ``max_concurrent`` at a
   time. If the previous run of this experiment was interrupted (Ctrl-C, a killed driver) and
   its pending trials are a subset of that run's, its Tune state is restored (``Tuner.restore``);
   finished trials are never re-run, whichever way;
4. with ``track`` (``--track mlflow[=URI]`` / ``wandb``): each trial that runs logs its config,
   curves, final metrics and status to a run of its own under a parent run, each trial whose row
   came from the store gets a closed run tagged reused, and the parent run gets the report files
   that ``report_files`` (the caller's renderer) writes (``harness.run.tracking``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray._private.ray_constants as ray_constants
from ray import tune

from harness.config import TrialConfig, config_changes, config_hash, trial_from_dict, trial_to_dict
from harness.names import name_problem, safe_name
from harness.provenance import project_commit
from harness.results import Experiment, ResultsStore, join_uri
from harness.run import tracking
from harness.run.placement import placement_strategy
from harness.run.progress import GridCallback, announce_stored
from harness.run.rows import DeadTrialRecorder, RunInfo, TrialSpec, tune_payload, tune_trial_hash
from harness.run.trial import TrialContext, trial_trainable
from spa_core.registry import ALL_REGISTRIES

__all__ = [
    "PlannedTrial",
    "RunSummary",
    "SharedResultsError",
    "plan",
    "rerun_reason",
    "trial_resources",
    "trial_placement_group",
    "init_ray",
    "cluster_address",
    "results_problem",
    "run_grid",
]

log = logging.getLogger(__name__)

# A multi-worker trial's Tune function only waits for its Ray Train workers (which reserve the CPUs
# and GPUs); Tune needs a non-empty request, so it reserves this sliver of memory and no CPU.
_DRIVER_MEMORY = 64 * 2**20

# Tune's state holds each trial's ``tune_payload``; a state written in another form is not restored.
_TUNE_FORMAT = 3


@dataclass
class PlannedTrial:
    cfg: TrialConfig
    config_hash: str
    state: str  # "pending", "done" (already in this experiment) or "reused" (copied from another)
    reused_from: str | None = None
    # why a pending trial runs when the experiment has a row of it (its row failed, its plugin or
    # config changed since, --rerun); None for a trial never run here
    reason: str | None = None

    @property
    def name(self) -> str:
        return self.cfg.name


@dataclass
class RunSummary:
    experiment: str
    uri: str
    trials: list[PlannedTrial]
    states: dict[str, str] = field(default_factory=dict)  # config hash -> done / failed / timeout / ...
    restored: bool = False
    wall_s: float = 0.0
    tracking: tracking.TrackRef | None = None  # the grid's tracked run (--track)

    @property
    def ok(self) -> bool:
        return all(s == "done" for s in self.states.values())

    @property
    def reused(self) -> dict[str, int]:
        """Experiment -> how many of this run's trials took their row from it instead of running
        (this experiment's own name for rows kept from its earlier runs)."""
        out: dict[str, int] = {}
        for p in self.trials:
            if p.state in ("done", "reused"):
                source = p.reused_from or self.experiment
                out[source] = out.get(source, 0) + 1
        return out


def trial_resources(cfg: TrialConfig) -> dict[str, float]:
    """What the Tune trial reserves: the worker's CPUs/GPUs for a trial run in its own process; for
    a multi-worker trial nothing but a sliver of memory (Ray Train reserves the workers' resources)."""
    r = cfg.resources
    if r.workers <= 1:
        out = {"CPU": float(r.cpus_per_worker)}
        if r.gpus_per_worker:
            out["GPU"] = float(r.gpus_per_worker)
        return out
    return {"memory": float(_DRIVER_MEMORY)}


def trial_placement_group(cfg: TrialConfig) -> tune.PlacementGroupFactory:
    """The Tune trial's placement group: its one bundle (``trial_resources``), with the strategy of
    the trial's Ray Train workers (``STRICT_PACK`` for several GPU workers)."""
    return tune.PlacementGroupFactory([trial_resources(cfg)], strategy=placement_strategy(cfg))


class SharedResultsError(ValueError):
    """``--results`` is a path only this machine sees, while the trials run on a cluster."""


def cluster_address(address: str | None = None) -> str | None:
    """The Ray cluster the run goes to: ``address``, else ``RAY_ADDRESS`` (which ``ray job submit``
    sets for its entrypoint); ``None`` for an embedded local Ray."""
    return address or os.environ.get("RAY_ADDRESS") or None


def results_problem(results: str, address: str | None, *, shared: bool = False) -> str | None:
    """Why ``results`` cannot hold a cluster run's rows, or ``None`` when it can.

    Every trial writes its row from the node it runs on, and the driver reads the rows back to plan,
    summarise and report: on a cluster the store must be one every node sees. An object-store URI
    (``s3://``, ``gs://``, ...) is; so is a ``file://`` URI or a path declared shared
    (``shared=True``, ``--results-shared``: NFS or another mount at the same path on every node).
    An embedded local Ray (no address) runs every trial on this machine, so any path does."""
    if not address or shared:
        return None
    scheme = results.split("://", 1)[0] if "://" in results else ""
    if scheme and scheme != "file":
        return None
    if scheme == "file":
        return (
            None
            if results[len("file://") :].startswith("/")
            else (f"--results {results}: a file:// URI names an absolute path (file:///shared/spa)")
        )
    return (
        f"--results {results} is a path on this machine only, but the trials run on the Ray cluster at "
        f"{address}: rows written on other nodes would never reach it. Pass an object-store URI "
        "(s3://bucket/spa, gs://...), or a folder mounted at the same path on every node as "
        "file:///path or with --results-shared"
    )


def plan(
    trials: list[TrialConfig], store: ResultsStore, experiment: str, *, rerun: bool = False
) -> list[PlannedTrial]:
    """Key the trials by config hash and decide what runs (see the module docstring)."""
    exp = store.experiment(experiment)
    out: list[PlannedTrial] = []
    seen: dict[str, str] = {}
    stored: dict[tuple[str, Any], dict[str, Any]] | None = None  # (name, seed) -> done row, read once
    for cfg in trials:
        h = config_hash(cfg)
        if h in seen:
            log.warning(
                "trial %r computes the same as %r (config hash %s); running it once", cfg.name, seen[h], h
            )
            continue
        seen[h] = cfg.name
        if rerun:
            out.append(PlannedTrial(cfg, h, "pending", reason="--rerun"))
            continue
        row = exp.read_row(h)
        if row is not None and row.get("status") == "done":
            out.append(PlannedTrial(cfg, h, "done"))
            continue
        other = store.find_done(h, exclude=experiment)
        if other is not None:
            out.append(PlannedTrial(cfg, h, "reused", reused_from=other.name))
            continue
        if row is not None:
            reason = f"its stored row is {row.get('status')}"
        else:
            if stored is None:
                stored = {(r.get("name"), r.get("seed")): r for r in exp.rows() if r.get("status") == "done"}
            reason = rerun_reason(cfg, stored.get((cfg.name, cfg.seed)))
        out.append(PlannedTrial(cfg, h, "pending", reason=reason))
    return out


def rerun_reason(cfg: TrialConfig, row: dict[str, Any] | None) -> str | None:
    """Why ``cfg`` runs although ``row``, a finished row of a trial of the same name and seed, is
    stored under another config hash: the plugin entries whose source changed (each with the file it
    is registered from), or the config keys that changed. ``None`` without a row."""
    if row is None:
        return None
    try:
        old = json.loads(row.get("config_json") or "")
    except (TypeError, ValueError):
        return "the stored row of this trial has another config"
    changes = config_changes(old, trial_to_dict(cfg))
    plugins = [k for k, _, _ in changes if k.startswith("plugin_sources.")]
    if plugins and len(plugins) == len(changes):
        entries = []
        for k in plugins:
            registry, _, name = k[len("plugin_sources.") :].partition(":")
            entries.append(f"{registry} {name!r} ({_origin(registry, name)})")
        return f"plugin changed since the stored row: {'; '.join(entries)}"
    shown = [f"{k} {a!r} -> {b!r}" for k, a, b in changes if not k.startswith("plugin_sources.")][:3]
    more = len(changes) - len(shown)
    return "config changed since the stored row: " + ", ".join(shown) + (f" (+{more} more)" if more else "")


def _origin(registry: str, name: str) -> str:
    try:
        return ALL_REGISTRIES[registry].origin(name)
    except KeyError:
        return "not registered"


def init_ray(address: str | None = None) -> bool:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start an embedded local Ray bound to 127.0.0.1
    with the dashboard off. Returns whether this call started Ray (so the caller shuts it down)."""
    if ray.is_initialized():
        return False
    address = cluster_address(address)
    quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
    env = {"RAY_TRAIN_V2_ENABLED": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    if address:
        if address.split("://")[-1].split(":")[0] in ("127.0.0.1", "localhost"):
            _loopback_only()  # a cluster started on this machine with --node-ip-address=127.0.0.1
        # No runtime_env here: under `ray job submit` it would replace the job's (its working_dir);
        # the workers choose their accelerator themselves (harness.task.distributed.prepare_accelerator).
        ray.init(address=address, **quiet)
        return True
    _loopback_only()
    # address="local": a new instance of our own, even when a cluster of someone else's runs on this
    # machine (a bare ray.init() would join it, with its resources and its other jobs)
    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env={"env_vars": env},
        **quiet,
    )
    return True


def _loopback_only() -> None:
    """Ray resolves 127.0.0.1 to the machine's routable address unless told this is a local-only
    node (the switch it uses on macOS/Windows); its servers then bind to the loopback address."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _quiet_tune() -> None:
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # no CSV/JSON/TensorBoard per trial
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR)


class TrialDirname:
    """Tune's folder of a trial: its name made a plain name (a crossed trial's name holds every
    axis label), then its config hash, which keeps it unique. Tune's namer sees the payload's hash,
    not its spec (``harness.run.rows.TrialSpec``), so the names come by hash."""

    def __init__(self, names: dict[str, str]) -> None:
        self.names = names

    def __call__(self, trial: Any) -> str:
        h = tune_trial_hash(trial) or "?"
        return f"{safe_name(self.names.get(h, 'trial'), 80)}-{safe_name(h, 19)}"


def run_grid(
    trials: list[TrialConfig],
    *,
    results: str = "results",
    experiment: str = "default",
    address: str | None = None,
    max_concurrent: int | None = None,
    rerun: bool = False,
    progress: bool = True,
    source: str | None = None,
    track: Any = None,
    results_shared: bool = False,
    report_files: Callable[[str, Path], list[Path]] | None = None,
    comparisons: dict[str, Any] | None = None,
    on_plan: Callable[[list[PlannedTrial]], None] | None = None,
) -> RunSummary:
    """Run ``trials`` into ``results/<experiment>`` (see the module docstring). ``track``: a
    ``harness.run.tracking.TrackingSpec`` or its text (``mlflow``, ``mlflow=URI``, ``wandb``). On a cluster
    (``address``, ``RAY_ADDRESS``) ``results`` must be a store every node sees (``results_problem``);
    ``SharedResultsError`` otherwise, before anything runs. ``report_files(experiment_uri, folder)``
    writes the experiment's report into ``folder`` for the tracked parent run. ``comparisons``: the
    grid's ``Comparisons.to_dict()``, kept in ``experiment.json`` for the report. ``on_plan(planned)``
    is called once the trials are planned, before any runs (the command line prints why trials rerun)."""
    track = tracking.parse_track(track)  # a bad value fails before anything is written
    t_start = time.time()
    problem = results_problem(results, cluster_address(address), shared=results_shared)
    if problem is not None:
        raise SharedResultsError(problem)
    _quiet_tune()
    store = ResultsStore(results)
    exp = store.experiment(experiment)
    planned = plan(trials, store, experiment, rerun=rerun)
    if on_plan is not None:
        on_plan(planned)
    for p in planned:
        if p.state == "reused":
            exp.copy_trial_from(store.experiment(p.reused_from), p.config_hash)
    announce_stored(experiment, planned)
    pending = [p for p in planned if p.state == "pending"]
    for p in pending:
        exp.write_config(p.config_hash, trial_to_dict(p.cfg))

    previous = exp.read_manifest() or {}
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    prev_tune = previous.get("tune") if isinstance(previous.get("tune"), dict) else {}
    pending_hashes = sorted(p.config_hash for p in pending)
    # The previous run's Tune folder is a name read back from the store: restored only when plain.
    # Tune restores a trial with the config it was first given; a pending trial whose unhashed
    # settings changed since (resources.retries, timeout_s) starts afresh with the new ones.
    digests = {p.config_hash: _digest(trial_to_dict(p.cfg)) for p in pending}
    prev_digests = prev_tune.get("digests") if isinstance(prev_tune.get("digests"), dict) else {}
    restorable = (
        bool(pending_hashes)
        and not rerun
        and name_problem(prev_tune.get("name")) is None
        and not prev_tune.get("finished")
        and prev_tune.get("format") == _TUNE_FORMAT
        and set(pending_hashes) <= set(prev_tune.get("trials") or [])
        and all(prev_digests.get(h) == d for h, d in digests.items())
    )
    tune_name = prev_tune["name"] if restorable else f"tune-{run_id}"
    manifest = {
        "name": experiment,
        "source": source,
        "run_id": run_id,
        "rerun": rerun,
        "git_commit": project_commit(),
        "created": previous.get("created", t_start),
        "updated": t_start,
        "trials": [
            {
                "name": p.name,
                "config_hash": p.config_hash,
                "workers": p.cfg.resources.workers,
                "state": p.state,
                **({"reused_from": p.reused_from} if p.reused_from else {}),
                **({"reason": p.reason} if p.reason else {}),
            }
            for p in planned
        ],
        **({"report": comparisons} if comparisons is not None else {}),
        "tune": {
            "name": tune_name,
            "trials": prev_tune.get("trials") if restorable else pending_hashes,
            "digests": {**prev_digests, **digests} if restorable else digests,
            "finished": False,
            "format": _TUNE_FORMAT,
        },
    }
    exp.write_manifest(manifest)
    summary = RunSummary(experiment, exp.uri, planned)
    if track is not None and planned:
        summary.tracking = _track_grid(track, exp, planned, manifest, source)
    if pending:
        summary.restored = _run_tune(
            pending, exp, manifest, address, max_concurrent, progress, tune_name, restorable, summary.tracking
        )
        # Stopped early (Ctrl-C: Tune saves its state and returns)? Then the next run restores it.
        manifest["tune"]["finished"] = all(exp.read_row(p.config_hash) is not None for p in pending)
    for p in planned:
        row = exp.read_row(p.config_hash)
        summary.states[p.config_hash] = row.get("status", "?") if row else "pending"
    # experiment.json ends as the store does: each trial's state is its row's (pending: no row)
    for entry in manifest["trials"]:
        entry["state"] = summary.states.get(entry["config_hash"], entry["state"])
    manifest["updated"] = time.time()
    exp.write_manifest(manifest)
    tracking.finish_grid(summary.tracking, exp.uri, summary.states, report_files)
    summary.wall_s = time.time() - t_start
    return summary


def _track_grid(
    track: tracking.TrackingSpec,
    exp: Experiment,
    planned: list[PlannedTrial],
    manifest: dict[str, Any],
    source: str | None,
) -> tracking.TrackRef:
    """Open the grid's tracked run and log one run per trial whose row came from the store, so the
    grid has a run per trial even when none runs (the trials that run log their own)."""
    stored = [p for p in planned if p.state in ("done", "reused")]
    ref = tracking.start_grid(
        track,
        exp.name,
        exp.uri,
        harness_run_id=manifest["run_id"],
        git_commit=manifest["git_commit"],
        source=source,
        trials=len(planned),
        reused=len(stored),
    )
    for p in stored:
        row = exp.read_row(p.config_hash)
        if row is not None:
            tracking.log_reused(ref, row, p.reused_from or exp.name)
    return ref


def _run_tune(
    pending: list[PlannedTrial],
    exp: Experiment,
    manifest: dict[str, Any],
    address: str | None,
    max_concurrent: int | None,
    progress: bool,
    tune_name: str,
    restorable: bool,
    track: tracking.TrackRef | None = None,
) -> bool:
    started = init_ray(address)
    try:
        context = TrialContext(
            exp.store_uri,
            exp.name,
            RunInfo(manifest["run_id"], manifest["git_commit"]),
            rerun=manifest["rerun"],
            track=track,
        )

        by_hash = {p.config_hash: p.cfg for p in pending}

        def resources(config: dict[str, Any]) -> tune.PlacementGroupFactory:
            h = config["trial"]["config_hash"]
            # a restored trial this run did not plan (its row landed after Tune's last save): the
            # config the store keeps for it
            cfg = by_hash.get(h) or trial_from_dict(exp.read_json(exp.trial_path(h, "config.json")) or {})
            return trial_placement_group(cfg)

        specs = {p.config_hash: TrialSpec(p.cfg, p.config_hash) for p in pending}
        trainable = tune.with_resources(
            tune.with_parameters(trial_trainable, context=context, specs=specs), resources
        )
        tune_path = join_uri(exp.uri, tune_name)
        restored = False
        if restorable and tune.Tuner.can_restore(tune_path):
            log.info("resuming the interrupted run from %s", tune_path)
            tuner = tune.Tuner.restore(
                tune_path,
                trainable=trainable,
                resume_unfinished=True,
                resume_errored=False,
                restart_errored=True,
            )
            restored = True
        else:
            payloads = [tune_payload(p.config_hash) for p in pending]
            retries = max((p.cfg.resources.retries for p in pending), default=0)
            if max_concurrent is None:
                max_concurrent = _default_concurrency(pending, ray.cluster_resources())
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(payloads)},
                tune_config=tune.TuneConfig(
                    max_concurrent_trials=max_concurrent,
                    reuse_actors=True,
                    trial_dirname_creator=TrialDirname({h: cfg.name for h, cfg in by_hash.items()}),
                ),
                run_config=tune.RunConfig(
                    name=tune_name,
                    storage_path=exp.uri,
                    verbose=0,
                    log_to_file=True,
                    failure_config=tune.FailureConfig(max_failures=retries),
                    # The recorder writes a dead trial's row before the progress view reads it.
                    callbacks=[
                        DeadTrialRecorder(exp.store_uri, exp.name),
                        GridCallback(exp.store_uri, exp.name, show=progress),
                    ],
                ),
            )
        tuner.fit()
        return restored
    finally:
        if started:
            ray.shutdown()


def _default_concurrency(pending: list[PlannedTrial], cluster: dict[str, float]) -> int | None:
    """A multi-worker trial's Tune function reserves no CPU (its Ray Train workers do), so Tune alone
    would start every such trial at once and leave most waiting for workers while their time limits
    run (a worker group waits for its workers until its trial's deadline: ``harness.run.trial``). Cap
    the trials in flight at what the cluster could run side by side if each were the largest of
    them, so that a 2-worker trial next to a 1-worker one never waits for a CPU the other holds;
    ``None`` (Tune's own accounting) when every trial runs in one process."""
    if all(p.cfg.resources.workers <= 1 for p in pending):
        return None
    limits = []
    for key, per in (
        ("CPU", lambda r: r.workers * r.cpus_per_worker),
        ("GPU", lambda r: r.workers * r.gpus_per_worker),
    ):
        need = max(per(p.cfg.resources) for p in pending)
        if need > 0:
            limits.append(int(cluster.get(key, 0) // need))
    return max(1, min(limits)) if limits else None


def _digest(cfg_dict: dict[str, Any]) -> str:
    """Hash of a trial's whole config, the settings that ``config_hash`` leaves out included."""
    return hashlib.sha256(json.dumps(cfg_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]
