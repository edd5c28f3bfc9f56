"""One trial: a Ray Tune trial that runs a DeepSpeed job under Ray Train and writes one result row.

``trial_trainable(config, context)`` is the Tune function (one call per grid point; ``config["trial"]``
holds its config hash and ``specs`` the typed ``TrialSpec`` of each). It skips a trial whose row is already in the store, then runs up to
``resources.retries + 1`` attempts of ``harness.run.worker.train_worker`` (with ``train.checkpoint_every``
an attempt resumes from the last checkpoint an earlier attempt or run saved; a done trial's
checkpoints are removed):

- ``resources.workers > 1``: a Ray Train ``TorchTrainer`` starts that many workers (``ScalingConfig``;
  gloo on CPU, nccl on GPU via ``TorchConfig``), each runs ``train_worker`` data-parallel under DeepSpeed;
- one worker: ``train_worker`` runs in the Tune trial's own process on a one-process group kept for
  the life of the process (Tune reuses it for the next trial with the same resources), which saves
  the ~15 s of starting a worker group and most of DeepSpeed's import and setup.

The trial adds provenance and timing columns (``harness.run.rows``) and writes the row: ``done``
(with ``measure_failed``/``measure_error`` if a measurement after training failed), or ``failed``
with the error and the traceback's tail (an exception, a NaN loss, an out-of-memory error, a worker
that died; ``error.txt`` keeps the whole traceback), or ``timeout`` (a watchdog writes the row and ends the trial's process past
``resources.timeout_s``). Overhead = wall time - (training + evaluation + benchmark time).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from ray import tune
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from harness.config import trial_from_dict
from harness.errors import full_traceback
from harness.results import HEARTBEAT_S, Experiment, join_uri
from harness.run import tracking
from harness.run.placement import placement_strategy, release_placement_groups
from harness.run.rows import (
    TRACEBACK_LINES,
    RunInfo,
    TrialSpec,
    base_row,
    error_message,
    error_tail,
    error_type,
    failure_row,
    node_id,
)
from harness.run.worker import WorkerJob, checkpoint_uri, train_worker
from harness.task.checkpoint import Checkpointer

__all__ = ["TrialContext", "trial_trainable"]


@dataclass
class TrialContext:
    """What every trial of one ``run`` shares (passed with ``tune.with_parameters``)."""

    store_uri: str
    experiment: str
    run: RunInfo
    rerun: bool = False  # --rerun: a done row of an earlier run does not count
    track: tracking.TrackRef | None = None  # --track: where the trials log (harness.run.tracking)
    track_run: str | None = None  # the trial's own run there (set in the trial's process)


def trial_trainable(config: dict[str, Any], context: TrialContext, specs: dict[str, TrialSpec]) -> None:
    """Ray Tune function of one grid point: ``config["trial"]`` is its ``tune_payload`` (the config
    hash), ``specs`` the run's pending trials by hash."""
    h = config["trial"]["config_hash"]
    exp = Experiment(context.store_uri, context.experiment)
    existing = exp.read_row(h)
    if existing is not None and (
        (existing.get("status") == "done" and not context.rerun)
        or existing.get("run_id") == context.run.run_id
    ):
        tune.report({"status": existing.get("status"), "skipped": True})  # restored / re-scheduled
        return
    spec = specs.get(h)
    if spec is None:  # a restored trial this run did not plan: the config the store keeps for it
        spec = TrialSpec(trial_from_dict(exp.read_json(exp.trial_path(h, "config.json")) or {}), h)

    if context.track is not None:
        context = replace(context, track_run=tracking.start_trial(context.track, spec.cfg, spec.config_hash))
    row: dict[str, Any] = {}
    first, last = _next_attempt(exp, h, context.run.run_id), spec.cfg.resources.retries + 1
    if first > last:  # Tune restarted a trial whose process died in its last attempt
        row = failure_row(spec, context.run, status="failed", error_type="TrialProcessLost",
                          error=f"the trial's process ended during attempt {last} of {last} (its node died?); "
                          "no attempt is left", tb="", attempt=last, start=time.time())  # fmt: skip
    for attempt in range(first, last + 1):
        exp.write_bytes(
            exp.trial_path(h, _ATTEMPT),
            json.dumps({"run_id": context.run.run_id, "attempt": attempt}).encode(),
        )
        row = _run_attempt(spec, context, exp, attempt)
        if row["status"] == "done":
            break
    points = row.pop("_track_points", None)
    exp.write_row(spec.config_hash, row)
    if row["status"] == "done" and spec.cfg.train.checkpoint_every:  # a finished trial keeps none
        Checkpointer(checkpoint_uri(spec, context.store_uri, context.experiment), 1).clear()
    tracking.finish_trial(context.track, context.track_run, row, points)
    tune.report({"status": row["status"], "wall_s": row.get("wall_s"), "overhead_s": row.get("overhead_s")})


_ATTEMPT = "attempt.json"  # of a trial: the run and the attempt that last started


def _next_attempt(exp: Experiment, h: str, run_id: str) -> int:
    """The attempt this call of the trial starts with: 1, or the one after the attempt of this run
    that last started. Tune restarts a trial whose process died with its node (its own retry, not
    this function's); that attempt counts, so ``resources.retries`` bounds both kinds together."""
    last = exp.read_json(exp.trial_path(h, _ATTEMPT))
    if isinstance(last, dict) and last.get("run_id") == run_id and isinstance(last.get("attempt"), int):
        return last["attempt"] + 1
    return 1


class _Watchdog:
    """Heartbeat to the store while the trial runs; past the deadline, writes a ``timeout`` row and
    ends the Tune trial's process (a stuck forward cannot be interrupted from Python). A multi-worker
    trial's workers stop themselves first (``harness.run.worker``); this is its last resort."""

    def __init__(self, exp: Experiment, h: str, timeout_s: float, on_timeout, info: dict[str, Any]) -> None:
        self.exp, self.h, self.timeout_s, self.on_timeout, self.info = exp, h, timeout_s, on_timeout, info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="trial-watchdog")

    def __enter__(self) -> _Watchdog:
        self._start = time.monotonic()
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()

    def _beat(self) -> None:
        with contextlib.suppress(Exception):
            self.exp.heartbeat(self.h, self.info)

    def _run(self) -> None:
        while True:
            remaining = self.timeout_s - (time.monotonic() - self._start)
            if self._stop.wait(max(0.0, min(HEARTBEAT_S, remaining))):
                return
            if time.monotonic() - self._start >= self.timeout_s:
                try:
                    self.on_timeout()
                finally:
                    os._exit(3)
                return  # not reached (os._exit does not return)
            self._beat()


# A multi-worker trial is stopped by its workers: each ends its process at the deadline once its
# function runs, and Ray Train then removes the worker group and its placement group. A worker group
# still starting at the deadline gets there later (its actors import torch and DeepSpeed: over two
# minutes for two workers on a loaded 2-core machine). Ending the trial's process before that ends
# Ray Train's controller with it, and the placement group it made outlives it (Ray scopes it to the
# job: its CPUs stay taken until the run ends and every later multi-worker trial waits for them), so
# the trial's own watchdog, the last resort, waits this much longer.
_WORKER_STOP_GRACE_S = 300.0


def _run_attempt(spec: TrialSpec, context: TrialContext, exp: Experiment, attempt: int) -> dict[str, Any]:
    res = spec.cfg.resources
    h = spec.config_hash
    start = time.time()
    deadline = start + res.timeout_s
    t0 = time.perf_counter()
    msg = f"trial {spec.cfg.name!r} exceeded resources.timeout_s={res.timeout_s:g} s (attempt {attempt})"
    thread = threading.get_ident()

    def _failure(status: str, error: str, etype: str, tb: str) -> dict[str, Any]:
        return failure_row(
            spec,
            context.run,
            status=status,
            error=error,
            error_type=etype,
            tb=tb,
            attempt=attempt,
            start=start,
        )

    def _timeout() -> None:
        stack = "".join(traceback.format_stack(sys._current_frames().get(thread)))
        tail = "\n".join(stack.splitlines()[-TRACEBACK_LINES:])
        exp.write_text(h, "error.txt", f"{msg}\n\n{stack}")
        row = _failure("timeout", msg, "Timeout", tail)
        exp.write_row(h, row)
        tracking.finish_trial(context.track, context.track_run, row)
        if res.workers > 1:  # the process ends with Ray Train's controller: free what it cannot
            release_placement_groups(exp, h)

    info = {
        "attempt": attempt,
        "start_time": start,
        "run_id": context.run.run_id,
        "pid": os.getpid(),
        # where it runs, for `spa-harness status` while it does (a row says it once written)
        "hostname": socket.gethostname(),
        "node_id": node_id(),
        "git_commit": context.run.git_commit,
    }
    backstop = res.timeout_s if res.workers <= 1 else res.timeout_s + _WORKER_STOP_GRACE_S
    with _Watchdog(exp, h, backstop, _timeout, info):
        try:
            result, startup_s = _fit(spec, context, attempt, deadline)
        except Exception as e:  # the trial failed; the grid goes on
            tb = error_tail(e)  # the row's tail; error.txt keeps the whole traceback
            timed_out = time.time() >= deadline  # the workers ended themselves at the deadline
            exp.write_text(h, "error.txt", (f"{msg}\n\n" if timed_out else "") + full_traceback(e))
            if timed_out:
                return _failure("timeout", msg, "Timeout", tb)
            return _failure("failed", error_message(e, exp.trial_uri(h, "error.txt")), error_type(e), tb)
    wall = time.perf_counter() - t0
    end = time.time()
    work = sum(
        float(result.get(k) or 0.0) for k in ("train_time_s", "eval_time_s", "bench_time_s", "paired_time_s")
    )
    row = base_row(spec, context.run, attempt)
    row.update(result)
    row.update(
        status="done",
        error=None,
        error_type=None,
        traceback=None,
        start_time=start,
        end_time=end,
        wall_s=wall,
        work_s=work,
        overhead_s=wall - work,
        startup_s=startup_s,
    )
    measure_tb = row.pop("_measure_traceback", None)  # a measurement failed after training
    if measure_tb:
        exp.write_text(h, "error.txt", measure_tb)
    else:
        exp.delete(exp.trial_path(h, "error.txt"))
    return row


def _fit(
    spec: TrialSpec, context: TrialContext, attempt: int, deadline: float
) -> tuple[dict[str, Any], float]:
    """Run ``train_worker``: in this process for one worker, under Ray Train's ``TorchTrainer`` for
    several; rank 0's columns and the time from launch until the worker function started."""
    track = (context.track, context.track_run) if context.track is not None and context.track_run else None
    job = WorkerJob(spec, context.store_uri, context.experiment, launched=time.time(), track=track)
    if spec.cfg.resources.workers <= 1:
        row = train_worker({"job": job})
    else:
        row = _fit_ray_train(replace(job, deadline=deadline), context, attempt)
    if not isinstance(row, dict):
        raise RuntimeError(f"rank 0 returned no result row (got {type(row).__name__})")
    startup = row.pop("_worker_started") - row.pop("_launched")
    return row, startup


def _fit_ray_train(job: WorkerJob, context: TrialContext, attempt: int) -> Any:
    res = job.spec.cfg.resources
    use_gpu = res.gpus_per_worker > 0
    per_worker = {"CPU": float(res.cpus_per_worker)}
    if use_gpu:
        per_worker["GPU"] = float(res.gpus_per_worker)
    exp = Experiment(context.store_uri, context.experiment)
    release_placement_groups(exp, job.spec.config_hash)
    # One attempt per fit: the trial's own loop retries (resources.retries). Ray Train's defaults
    # would retry a worker group that cannot start (no resources: a node is gone) without end.
    failure = FailureConfig(max_failures=0, controller_failure_limit=0, max_preemption_failures=0)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=res.workers,
            use_gpu=use_gpu,
            resources_per_worker=per_worker,
            placement_strategy=placement_strategy(job.spec.cfg),
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"train-{job.spec.config_hash}-{context.run.run_id}-a{attempt}",
            storage_path=join_uri(exp.uri, "train"),
            failure_config=failure,
        ),
    )
    with _worker_group_may_wait_until(job.deadline):
        result = trainer.fit()  # raises TrainingFailedError (with the worker's traceback) if a worker failed
    return result.return_value


START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


@contextlib.contextmanager
def _worker_group_may_wait_until(deadline: float) -> Iterator[None]:
    """Ray Train fails a fit whose workers have not all started within ``START_TIMEOUT_VAR`` (60 s by
    default). Workers that import torch and DeepSpeed on a busy node, or that wait for the CPUs of the
    previous trial's placement group, can take longer; the trial's ``resources.timeout_s`` is the
    bound the grid set, so the worker group may wait until the trial's deadline. A value the user set
    is kept. ``TorchTrainer.fit`` reads the variable in this process and passes it to its controller."""
    if not math.isfinite(deadline) or START_TIMEOUT_VAR in os.environ:
        yield
        return
    # rounded up: Ray Train's limit ends after the deadline, so the trial is recorded as a timeout
    os.environ[START_TIMEOUT_VAR] = str(max(1, math.ceil(deadline - time.time())))
    try:
        yield
    finally:
        os.environ.pop(START_TIMEOUT_VAR, None)
