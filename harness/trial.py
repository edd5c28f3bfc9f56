"""One trial: a Ray Tune trial that runs a DeepSpeed job under Ray Train and writes one result row.

``trial_trainable(config, context)`` is the Tune function (one call per grid point). It skips a
trial whose row is already in the store, then runs up to ``resources.retries + 1`` attempts of
``train_worker``:

- ``resources.workers > 1``: a Ray Train ``TorchTrainer`` starts that many workers (``ScalingConfig``;
  gloo on CPU, nccl on GPU via ``TorchConfig``), each runs ``train_worker`` data-parallel under DeepSpeed;
- one worker: ``train_worker`` runs in the Tune trial's own process on a one-process group kept for
  the life of the process (Tune reuses it for the next trial with the same resources), which saves
  the ~15 s of starting a worker group and most of DeepSpeed's import and setup.

``train_worker`` trains and evaluates (``harness.task.train.train_variant`` with a
``DeepSpeedBackend``), measures (``harness.measure``) and returns, on rank 0, the metric columns.
The trial adds provenance and timing columns and writes the row: ``done``, or ``failed`` with the
error and the traceback's tail (an exception, a NaN loss, an out-of-memory error, a worker that
died), or ``timeout`` (a watchdog writes the row and ends the trial's process past
``resources.timeout_s``). Overhead = wall time - (training + evaluation + benchmark time).

The trial's whole life in one file (about 600 lines): attempts, the watchdog, the worker and the
rows share the trial's context and error handling.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, replace
from typing import Any

from harness import tracking
from harness.config import flatten_config
from harness.errors import describe, root_cause
from harness.results import HEARTBEAT_S, Experiment, join_uri

__all__ = ["TrialContext", "trial_trainable", "train_worker", "failure_row", "error_tail", "node_id"]

_TRACEBACK_LINES = 40
log = logging.getLogger(__name__)


@dataclass
class TrialContext:
    """What every trial of one ``run`` shares (passed with ``tune.with_parameters``)."""

    store_uri: str
    experiment: str
    run_id: str
    git_commit: str
    rerun: bool = False  # --rerun: a done row of an earlier run does not count
    track: tracking.TrackRef | None = None  # --track: where the trials log (harness.tracking)
    track_run: str | None = None  # the trial's own run there (set in the trial's process)


def error_tail(exc: BaseException, lines: int = _TRACEBACK_LINES) -> str:
    tb = "".join(traceback.format_exception(exc))
    return "\n".join(tb.rstrip().splitlines()[-lines:])


def _error_type(exc: BaseException) -> str:
    """The root cause's type name (Ray wraps a worker's exception in a TrainingFailedError)."""
    return type(root_cause(exc)).__name__


def _error_message(exc: BaseException, traceback_path: str | None = None) -> str:
    """``Type: message [in func at file:line; full traceback: PATH]`` (``harness.errors.describe``:
    the innermost frame of user code, e.g. the plugin that raised), ``out of memory: `` first for
    an out-of-memory error."""
    return describe(exc, traceback_path=traceback_path, prefix="out of memory: " if _is_oom(exc) else "")


def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return isinstance(exc, MemoryError) or "OutOfMemory" in text or "out of memory" in text.lower()


def node_id() -> str | None:
    """Ray's id of the node this process runs on (``None`` outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:
        return None


# --------------------------------------------------------------------------------------------------
# rows


def _base_row(
    cfg_dict: dict[str, Any], config_hash: str, context: TrialContext, attempt: int
) -> dict[str, Any]:
    from harness.provenance import package_versions

    row: dict[str, Any] = {
        "name": cfg_dict.get("name"),
        "config_hash": config_hash,
        "seed": cfg_dict.get("seed"),
        "run_id": context.run_id,
        "attempt": attempt,
        "git_commit": context.git_commit,
        "config_json": json.dumps(cfg_dict, sort_keys=True),
        "workers": cfg_dict.get("resources", {}).get("workers"),
    }
    row.update({f"{k}_version": v for k, v in package_versions().items()})
    row.update(node_id=node_id(), hostname=socket.gethostname())  # where the Tune trial's process ran
    # The baseline's model and head stay in config_json; the row names it in speedup_baseline.
    row.update(flatten_config({k: v for k, v in cfg_dict.items() if k not in ("baseline", "axis")}))
    row.update({f"axis.{k}": v for k, v in (cfg_dict.get("axis") or {}).items()})  # the report's axis tables
    return row


def failure_row(
    cfg_dict: dict[str, Any],
    config_hash: str,
    context: TrialContext,
    *,
    status: str,
    error: str,
    error_type: str,
    tb: str,
    attempt: int,
    start: float,
    end: float | None = None,
) -> dict[str, Any]:
    end = end if end is not None else time.time()
    row = _base_row(cfg_dict, config_hash, context, attempt)
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


# --------------------------------------------------------------------------------------------------
# the Tune function


def trial_trainable(config: dict[str, Any], context: TrialContext) -> None:
    """Ray Tune function of one grid point; ``config["trial"]`` holds ``config`` (the resolved trial
    config dict) and ``config_hash``."""
    from ray import tune

    payload = config["trial"]
    cfg_dict, h = payload["config"], payload["config_hash"]
    exp = Experiment(context.store_uri, context.experiment)
    existing = exp.read_row(h)
    if existing is not None and (
        (existing.get("status") == "done" and not context.rerun) or existing.get("run_id") == context.run_id
    ):
        tune.report({"status": existing.get("status"), "skipped": True})  # restored / re-scheduled
        return

    retries = int(cfg_dict.get("resources", {}).get("retries", 0))
    if context.track is not None:
        context = replace(context, track_run=tracking.start_trial(context.track, cfg_dict, h))
    row: dict[str, Any] = {}
    for attempt in range(1, retries + 2):
        row = _run_attempt(cfg_dict, h, context, exp, attempt)
        if row["status"] == "done":
            break
    points = row.pop("_track_points", None)
    exp.write_row(h, row)
    tracking.finish_trial(context.track, context.track_run, row, points)
    tune.report({"status": row["status"], "wall_s": row.get("wall_s"), "overhead_s": row.get("overhead_s")})


class _Watchdog:
    """Heartbeat to the store while the trial runs; past the deadline, writes a ``timeout`` row and
    ends the Tune trial's process (a stuck forward cannot be interrupted from Python). A multi-worker
    trial's workers stop themselves first (``_end_process_at``); this is its last resort."""

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


# A multi-worker trial is stopped by its workers (each ends its process at the deadline, so Ray
# Train tears the worker group and its placement group down); the trial's own watchdog waits this
# much longer before it ends the trial's process as a last resort.
_WORKER_STOP_GRACE_S = 60.0


def _run_attempt(
    cfg_dict: dict[str, Any], h: str, context: TrialContext, exp: Experiment, attempt: int
) -> dict[str, Any]:
    res = cfg_dict.get("resources", {})
    timeout_s = float(res.get("timeout_s") or math.inf)
    workers = int(res.get("workers", 1))
    start = time.time()
    deadline = start + timeout_s
    t0 = time.perf_counter()
    msg = f"trial {cfg_dict.get('name')!r} exceeded resources.timeout_s={timeout_s:g} s (attempt {attempt})"
    thread = threading.get_ident()

    def _timeout() -> None:
        stack = "".join(traceback.format_stack(sys._current_frames().get(thread)))
        tail = "\n".join(stack.splitlines()[-_TRACEBACK_LINES:])
        exp.write_text(h, "error.txt", f"{msg}\n\n{tail}\n")
        row = failure_row(
            cfg_dict,
            h,
            context,
            status="timeout",
            error=msg,
            error_type="Timeout",
            tb=tail,
            attempt=attempt,
            start=start,
        )
        exp.write_row(h, row)
        tracking.finish_trial(context.track, context.track_run, row)

    info = {"attempt": attempt, "start_time": start, "run_id": context.run_id, "pid": os.getpid()}
    backstop = timeout_s if workers <= 1 else timeout_s + _WORKER_STOP_GRACE_S
    with _Watchdog(exp, h, backstop, _timeout, info):
        try:
            result, startup_s = _fit(cfg_dict, h, context, attempt, deadline)
        except Exception as e:  # the trial failed; the grid goes on
            tb = error_tail(e)
            timed_out = time.time() >= deadline  # the workers ended themselves at the deadline
            exp.write_text(h, "error.txt", (f"{msg}\n\n" if timed_out else "") + tb + "\n")
            if timed_out:
                return failure_row(
                    cfg_dict,
                    h,
                    context,
                    status="timeout",
                    error=msg,
                    error_type="Timeout",
                    tb=tb,
                    attempt=attempt,
                    start=start,
                )
            return failure_row(
                cfg_dict,
                h,
                context,
                status="failed",
                error=_error_message(e, exp.trial_uri(h, "error.txt")),
                error_type=_error_type(e),
                tb=tb,
                attempt=attempt,
                start=start,
            )
    wall = time.perf_counter() - t0
    end = time.time()
    work = sum(
        float(result.get(k) or 0.0) for k in ("train_time_s", "eval_time_s", "bench_time_s", "paired_time_s")
    )
    row = _base_row(cfg_dict, h, context, attempt)
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
    exp.delete(exp.trial_path(h, "error.txt"))
    return row


def _fit(
    cfg_dict: dict[str, Any], h: str, context: TrialContext, attempt: int, deadline: float = math.inf
) -> tuple[dict[str, Any], float]:
    """Run ``train_worker``: in this process for one worker, under Ray Train's ``TorchTrainer`` for
    several; rank 0's columns and the time from launch until the worker function started."""
    res = cfg_dict.get("resources", {})
    workers = int(res.get("workers", 1))
    loop_config = {
        "config": cfg_dict,
        "config_hash": h,
        "store_uri": context.store_uri,
        "experiment": context.experiment,
        "launched": time.time(),
    }
    if context.track is not None and context.track_run is not None:
        loop_config["track"] = (context.track, context.track_run)
    if workers <= 1:
        row = train_worker(loop_config)
    else:
        row = _fit_ray_train({**loop_config, "deadline": deadline}, res, context, attempt)
    if not isinstance(row, dict):
        raise RuntimeError(f"rank 0 returned no result row (got {type(row).__name__})")
    startup = row.pop("_worker_started") - row.pop("_launched")
    return row, startup


def _fit_ray_train(
    loop_config: dict[str, Any], res: dict[str, Any], context: TrialContext, attempt: int
) -> Any:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = float(res.get("gpus_per_worker", 0)) > 0
    per_worker = {"CPU": float(res.get("cpus_per_worker", 1))}
    if use_gpu:
        per_worker["GPU"] = float(res["gpus_per_worker"])
    exp = Experiment(context.store_uri, context.experiment)
    _release_placement_groups(exp, loop_config["config_hash"])
    # One attempt per fit: the trial's own loop retries (resources.retries). Ray Train's defaults
    # would retry a worker group that cannot start (no resources: a node is gone) without end.
    failure = FailureConfig(max_failures=0, controller_failure_limit=0, max_preemption_failures=0)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=int(res["workers"]), use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"train-{loop_config['config_hash']}-{context.run_id}-a{attempt}",
            storage_path=join_uri(exp.uri, "train"),
            failure_config=failure,
        ),
    )
    result = trainer.fit()  # raises TrainingFailedError (with the worker's traceback) if a worker failed
    return result.return_value


_PLACEMENT_GROUPS = "placement_groups.json"  # of a trial: its Ray Train attempts' placement groups


def _release_placement_groups(exp: Experiment, h: str) -> None:
    """Remove the placement groups of this trial's earlier attempts. Ray ties a placement group to
    the job, not to the Train controller that made it: when a node dies with the trial's process,
    the dead attempt's group keeps the CPUs it holds on the surviving nodes, and the retry would
    wait for them until its timeout."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    recorded = exp.read_json(exp.trial_path(h, _PLACEMENT_GROUPS)) or []
    table = ray.util.placement_group_table()
    for pg_id in recorded if isinstance(recorded, list) else []:
        if table.get(pg_id, {}).get("state") not in (None, "REMOVED"):
            with contextlib.suppress(Exception):
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
                log.warning("trial %s: removed placement group %s of an earlier attempt", h, pg_id)
    exp.delete(exp.trial_path(h, _PLACEMENT_GROUPS))


def _record_placement_group(exp: Experiment, h: str) -> None:
    """Rank 0 of a Ray Train attempt notes its placement group for ``_release_placement_groups``."""
    import ray

    pg = ray.util.get_current_placement_group()
    if pg is None:
        return
    recorded = exp.read_json(exp.trial_path(h, _PLACEMENT_GROUPS))
    recorded = recorded if isinstance(recorded, list) else []
    exp.write_bytes(exp.trial_path(h, _PLACEMENT_GROUPS), json.dumps([*recorded, pg.id.hex()]).encode())


# --------------------------------------------------------------------------------------------------
# the Ray Train worker


def train_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Per-worker function: train, evaluate and measure under DeepSpeed; rank 0 returns its columns."""
    started = time.time()
    from harness.distributed import init_process_group, prepare_accelerator

    device = prepare_accelerator()  # before deepspeed is imported: DS_ACCELERATOR=cpu without CUDA
    # In the Tune trial's own process: a one-process group, made once and kept for the trials that
    # Tune runs next in this process (DeepSpeed caches its groups); Ray Train made one otherwise.
    init_process_group(device)
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if math.isfinite(config.get("deadline", math.inf)):
        _end_process_at(config["deadline"])
    exp = Experiment(config["store_uri"], config["experiment"])
    h = config["config_hash"]
    if rank == 0 and "deadline" in config:  # a Ray Train worker (a one-worker trial has no group)
        with contextlib.suppress(Exception):
            _record_placement_group(exp, h)
    log_name = "log.txt" if rank == 0 else f"log.rank{rank}.txt"
    with tempfile.TemporaryDirectory() as tmp, _captured_log(os.path.join(tmp, "log.txt")) as log_path:
        try:
            with torch_threads(config["config"].get("resources", {})):
                return _train_and_measure(
                    config["config"], rank, world, device, started, config["launched"], config.get("track")
                )
        finally:
            with contextlib.suppress(Exception):
                with open(log_path, encoding="utf-8", errors="replace") as f:
                    exp.write_text(h, log_name, f.read())


def _train_and_measure(
    cfg_dict: dict[str, Any],
    rank: int,
    world: int,
    device,
    started: float,
    launched: float,
    track: tuple[Any, str] | None = None,
) -> dict[str, Any] | None:
    from harness.config import trial_from_dict
    from harness.distributed import DeepSpeedBackend
    from harness.measure import measure, reset_peak_memory
    from harness.plugins import load_entry_point_plugins, load_plugins
    from harness.provenance import environment
    from harness.task.train import train_variant

    cfg = trial_from_dict(cfg_dict)
    load_entry_point_plugins()  # idempotent: what the driver loaded to expand the grid, here too
    load_plugins(cfg.plugins)
    reset_peak_memory(device)
    logging.getLogger("harness").info("trial %s on rank %d of %d, device %s", cfg.name, rank, world, device)
    backend = DeepSpeedBackend(device)
    t_ready = time.time()
    on_log = tracking.step_logger(*track) if track is not None and rank == 0 else None
    metrics = train_variant(cfg, backend=backend, progress=False, on_log=on_log)
    # data + model build and DeepSpeed setup inside train_variant: what its own timers leave out
    prep = time.time() - t_ready - metrics.get("train_time_s", 0.0) - metrics.get("eval_time_s", 0.0)
    dp_diff = _replica_divergence(backend)
    metrics.update(measure(cfg, backend, backend.model))  # peak memory included
    if rank != 0:
        return None
    metrics.update(environment(device, world))
    metrics.update(
        world_size=world,
        dp_param_max_diff=dp_diff,
        deepspeed_setup_s=backend.setup_s,
        worker_import_s=t_ready - started,
        prep_s=prep - backend.setup_s,
        zero_stage=backend.ds_config["zero_optimization"]["stage"],
        precision=(
            "bf16"
            if "torch_autocast" in backend.ds_config
            else "fp16"
            if "fp16" in backend.ds_config
            else "fp32"
        ),
        _worker_started=started,
        _launched=launched,
    )
    if on_log is not None:
        metrics["_track_points"] = on_log.points  # for a tracker that logs the curve when the trial ends
    return metrics


@contextlib.contextmanager
def torch_threads(resources: dict[str, Any]):
    """torch's intra-op threads = the worker's CPUs (``cpus_per_worker``, at least 1) for the trial,
    restored after. Ray sets ``OMP_NUM_THREADS`` per task, but torch reads it once, when a process
    first imports it (``test_torch_reads_omp_num_threads_only_at_import``), and Tune and Ray reuse
    worker processes."""
    import torch

    prev = torch.get_num_threads()
    n = max(1, int(float(resources.get("cpus_per_worker", 1))))
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(prev)


def _end_process_at(deadline: float) -> None:
    """A Ray Train worker past its trial's deadline ends its process; the controller sees the worker
    die and shuts the group down cleanly (releasing its placement group), and the trial records
    the timeout."""

    def _run() -> None:
        time.sleep(max(0.0, deadline - time.time()))
        os._exit(3)

    threading.Thread(target=_run, daemon=True, name="trial-deadline").start()


def _replica_divergence(backend) -> float:
    """Largest difference between ranks of a parameter checksum after training: 0 when the
    data-parallel replicas stayed in step (each rank saw its own share of the data)."""
    import torch
    import torch.distributed as dist

    with backend.gathered_parameters(), torch.no_grad():
        checksum = (
            sum(p.detach().double().sum() for p in backend.model.parameters()).reshape(1).to(backend.device)
        )
    if backend.world_size == 1:
        return 0.0
    sums = [torch.zeros_like(checksum) for _ in range(backend.world_size)]
    dist.all_gather(sums, checksum)
    values = torch.cat(sums)
    return float(values.max() - values.min())


@contextlib.contextmanager
def _captured_log(path: str):
    """Python logging, warnings and prints of this worker into ``path`` (uploaded to the store)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    loggers = [logging.getLogger(), logging.getLogger("DeepSpeed")]  # DeepSpeed's does not propagate
    old_levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
    logging.getLogger("harness").setLevel(logging.INFO)
    logging.captureWarnings(True)
    stream = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (closed below)
    tee = _Tee(stream, sys.stdout)
    try:
        with contextlib.redirect_stdout(tee), contextlib.redirect_stderr(_Tee(stream, sys.stderr)):
            yield path
    finally:
        for lg, lvl in zip(loggers, old_levels):
            lg.removeHandler(handler)
            lg.setLevel(lvl)
        logging.captureWarnings(False)
        handler.close()
        stream.close()


class _Tee(io.TextIOBase):
    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            with contextlib.suppress(Exception):
                st.write(s)
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            with contextlib.suppress(Exception):
                st.flush()


def context_dict(context: TrialContext) -> dict[str, Any]:
    return asdict(context)
