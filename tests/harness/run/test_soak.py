"""Driver loss soak: ``spa-harness run`` killed (driver and its process group, SIGKILL) at several
moments of a small grid, and run again plainly each time, ends with every trial done exactly once.

The grid is three single-worker smoke trials on an embedded local Ray, one at a time. The driver is
killed while the first trial runs (no row yet), then after one row, then after two; the fourth run
restores the interrupted Tune run and finishes. At the end every trial has one ``done`` row, a row
that was done before a kill is byte for byte the same afterwards (its trial was not trained again),
and no process of any of these runs
(Ray's GCS, raylet, workers, the trial processes) is left once its driver is gone.
"""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from harness.results import load

ROOT = Path(__file__).resolve().parents[3]

# The "ray" xdist group runs every test that starts Ray on one worker, one at a time (scripts/test.sh).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

GRID = """\
name: soak
base:
  preset: micro
  model.spa.selection: topk
  data: {image_size: 64, num_train: 48, num_val: 16}
  # long enough (a few seconds) that a kill seen while a trial runs lands before its row does
  train: {steps: 40, batch_size: 4, warmup_steps: 1, log_every: 10}
  bench: {batch_size: 2, warmup: 1, repeats: 3}
resources: {workers: 1, cpus_per_worker: 1, timeout_s: 300}
axes:
  model.spa.ratio: [0.25, 0.5, 0.75]
"""
N_TRIALS = 3
_MARK = "SPA_SOAK_RUN"  # every process a soak driver starts inherits this variable from it


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)  # an embedded local Ray, as the e2e tests run it
    e["SPA_HARNESS_CACHE"] = str(tmp_path / "data-cache")
    e["DS_ACCELERATOR"] = "cpu"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def _marked_processes(mark: str) -> list[tuple[int, str]]:
    """Live processes whose environment carries ``_MARK=mark``: those one soak driver started."""
    needle = f"{_MARK}={mark}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # a zombie holds nothing
                    continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        found.append((int(pid), cmd))
    return found


def _since(path: Path, t: float) -> bool:
    """Whether ``path`` was written at or after ``t`` (a heartbeat of this driver's trial, not a killed one's)."""
    try:
        return path.stat().st_mtime >= t
    except FileNotFoundError:  # its row landed meanwhile
        return False


def _rows(trials: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted(trials.glob("*/row.json"))}


def _run_then_kill(
    cmd: list[str], env: dict, trials: Path, rows_before_kill: int, timeout: float = 420
) -> None:
    """Start a driver, wait until ``rows_before_kill`` rows exist and a trial runs after them, then
    SIGKILL the driver's process group; wait until every process it started is gone."""
    mark = uuid.uuid4().hex
    started = time.time()
    log = trials.parent.parent / f"driver-{rows_before_kill}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    driver = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**env, _MARK: mark},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert driver.poll() is None, "the driver ended before it could be killed"
            rows = _rows(trials)
            running = [
                p for p in trials.glob("*/running.json") if p.parent.name not in rows and _since(p, started)
            ]
            if len(rows) >= rows_before_kill and running:
                break
            time.sleep(0.3)
        else:
            found = sorted(str(p.relative_to(trials)) for p in trials.glob("*/*"))
            pytest.fail(
                f"no trial ran after {rows_before_kill} rows within {timeout} s; trial files: {found}; "
                f"driver output:\n{log.read_text()[-3000:]}"
            )
        started_here = [cmd for _, cmd in _marked_processes(mark)]
        assert any("raylet" in c for c in started_here), started_here  # what must not outlive the driver
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything in its group, no cleanup
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    deadline = time.time() + 60
    while (left := _marked_processes(mark)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the killed run are left: {left}"


def test_driver_killed_three_times_each_trial_done_once(tmp_path, env):
    t0 = time.time()
    grid = tmp_path / "soak.yaml"
    grid.write_text(GRID)
    store = tmp_path / "results"
    trials = store / "soak" / "trials"
    cmd = [
        sys.executable,
        "-m",
        "harness.cli",
        "run",
        str(grid),
        "--results",
        str(store),
        "--max-concurrent",
        "1",
        "--no-progress",
        "--no-report",
    ]

    kept: dict[str, bytes] = {}  # rows done before a kill: byte for byte the same ever after
    for n in range(N_TRIALS):
        _run_then_kill(cmd, env, trials, n)
        rows = _rows(trials)
        assert {h: rows[h] for h in kept} == kept, "a finished trial was trained again"
        kept.update({h: b for h, b in rows.items() if json.loads(b)["status"] == "done"})
        assert len(kept) >= n

    mark = uuid.uuid4().hex
    last = subprocess.run(
        cmd, cwd=ROOT, env={**env, _MARK: mark}, capture_output=True, text=True, timeout=400
    )
    assert last.returncode == 0, last.stdout[-3000:] + last.stderr[-3000:]
    if len(kept) < N_TRIALS:
        assert "(resumed)" in last.stdout  # Tuner.restore of the interrupted run, not a fresh one
    else:  # the last kill landed after the running trial had stored its row: nothing is left to run
        assert f"{N_TRIALS} trial(s) already done in this experiment, kept" in last.stdout, last.stdout
    rows = _rows(trials)
    assert len(rows) == N_TRIALS and all(json.loads(b)["status"] == "done" for b in rows.values())
    assert {h: rows[h] for h in kept} == kept, "a finished trial was trained again"
    df = load(store, dedupe=False)
    assert len(df) == N_TRIALS and df["config_hash"].is_unique and set(df["status"]) == {"done"}
    assert (df["attempt"] == 1).all()
    deadline = time.time() + 60
    while (left := _marked_processes(mark)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the finished run are left: {left}"
    print(f"soak: {time.time() - t0:.0f} s, run ids of the rows: {sorted(df['run_id'])}")
