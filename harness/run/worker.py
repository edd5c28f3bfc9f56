"""The Ray Train worker of a trial: train, evaluate and measure one variant under DeepSpeed.

``train_worker({"job": WorkerJob})`` runs on every rank (in the Tune trial's own process for a
one-worker trial): it picks the accelerator, joins the process group, trains and evaluates
(``harness.task.train.train_variant`` with a ``DeepSpeedBackend``), measures (``harness.task.measure``)
and returns, on rank 0, the metric columns. Each rank's log (Python logging, warnings, prints)
goes to the trial's folder in the store.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from harness.plugins import check_plugin_sources, load_entry_point_plugins, load_plugins
from harness.provenance import environment
from harness.results import Experiment
from harness.run import tracking
from harness.run.placement import record_placement_group
from harness.run.rows import TrialSpec
from harness.task.distributed import DeepSpeedBackend, init_process_group, prepare_accelerator
from harness.task.measure import measure, reset_peak_memory
from harness.task.train import train_variant

__all__ = ["WorkerJob", "train_worker", "torch_threads"]


@dataclass(frozen=True)
class WorkerJob:
    """What every rank of one attempt receives (Ray Train's ``train_loop_config["job"]``)."""

    spec: TrialSpec
    store_uri: str
    experiment: str
    launched: float  # when the attempt was launched: the worker's start-up time is measured from it
    track: tuple[Any, str] | None = None  # (TrackRef, the trial's run id) with --track
    deadline: float = math.inf  # a Ray Train worker ends its process past it (resources.timeout_s)


def train_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Per-worker function: train, evaluate and measure under DeepSpeed; rank 0 returns its columns."""
    started = time.time()
    job: WorkerJob = config["job"]
    device = prepare_accelerator()  # before deepspeed is imported: DS_ACCELERATOR=cpu without CUDA
    # In the Tune trial's own process: a one-process group, made once and kept for the trials that
    # Tune runs next in this process (DeepSpeed caches its groups); Ray Train made one otherwise.
    init_process_group(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    ray_train = math.isfinite(job.deadline)  # a one-worker trial runs in the Tune trial's process
    if ray_train:
        _end_process_at(job.deadline)
    exp = Experiment(job.store_uri, job.experiment)
    h = job.spec.config_hash
    if rank == 0 and ray_train:
        with contextlib.suppress(Exception):
            record_placement_group(exp, h)
    log_name = "log.txt" if rank == 0 else f"log.rank{rank}.txt"
    with tempfile.TemporaryDirectory() as tmp, _captured_log(os.path.join(tmp, "log.txt")) as log_path:
        try:
            with torch_threads(job.spec.cfg.resources.cpus_per_worker):
                return _train_and_measure(job, rank, world, device, started)
        finally:
            with contextlib.suppress(Exception):
                with open(log_path, encoding="utf-8", errors="replace") as f:
                    exp.write_text(h, log_name, f.read())


def _train_and_measure(
    job: WorkerJob, rank: int, world: int, device: torch.device, started: float
) -> dict[str, Any] | None:
    cfg = job.spec.cfg
    load_entry_point_plugins()  # idempotent: what the driver loaded to expand the grid, here too
    load_plugins(cfg.plugins)
    check_plugin_sources(cfg)  # the plugins as the trial's config (and hash) was made with them
    reset_peak_memory(device)
    logging.getLogger("harness").info("trial %s on rank %d of %d, device %s", cfg.name, rank, world, device)
    backend = DeepSpeedBackend(device)
    t_ready = time.time()
    on_log = tracking.step_logger(*job.track) if job.track is not None and rank == 0 else None
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
        _launched=job.launched,
    )
    if on_log is not None:
        metrics["_track_points"] = on_log.points  # for a tracker that logs the curve when the trial ends
    return metrics


@contextlib.contextmanager
def torch_threads(cpus_per_worker: float):
    """torch's intra-op threads = the worker's CPUs (``cpus_per_worker``, at least 1) for the trial,
    restored after. Ray sets ``OMP_NUM_THREADS`` per task, but torch reads it once, when a process
    first imports it (``test_torch_reads_omp_num_threads_only_at_import``), and Tune and Ray reuse
    worker processes."""
    prev = torch.get_num_threads()
    n = max(1, int(cpus_per_worker))
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
