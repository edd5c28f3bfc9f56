"""scripts/stop_ray_node.py: it stops the processes of the nodes whose temp dir it is given (by Ray's
options on their command lines, the head's client server by node id, and everything they started),
and leaves alone a process of another node, one that only mentions the folder, and itself."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "stop_ray_node.py"

# A process that starts a child and sleeps; its arguments stand in for a Ray process's options.
_PARENT = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
_SLEEP = "import time; time.sleep(120)"


def _start(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args])


def _children(p: subprocess.Popen) -> list[psutil.Process]:
    deadline = time.time() + 20
    while time.time() < deadline:
        kids = psutil.Process(p.pid).children()
        if kids:
            return kids
        time.sleep(0.1)
    raise AssertionError("the child did not start")


def test_only_the_named_nodes_processes_are_stopped(tmp_path):
    node_dir, other_dir = tmp_path / "ray-n1", tmp_path / "ray-n10"  # one name a prefix of the other
    node_id = "ab" * 28
    raylet = _start(_PARENT, f"--temp_dir={node_dir}", f"--node_id={node_id}")
    gcs = _start(_SLEEP, f"--log_dir={node_dir}/session_x/logs")
    client_server = _start(_SLEEP, f"--node-id={node_id}")
    other_node = _start(_SLEEP, f"--temp-dir={other_dir}", "--node-id=" + "cd" * 28)
    reader = _start(_SLEEP, f"{node_dir}/session_x/logs/raylet.out")  # `less DIR/...`: not Ray's
    procs = [raylet, gcs, client_server, other_node, reader]
    try:
        (worker,) = _children(raylet)
        listed = subprocess.run(
            [sys.executable, str(SCRIPT), "--dry-run", str(node_dir)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        pids = {int(line.split()[0]) for line in listed.stdout.splitlines()[1:]}
        assert pids == {raylet.pid, worker.pid, gcs.pid, client_server.pid}, listed.stdout
        assert raylet.poll() is None  # a dry run stops nothing

        done = subprocess.run(
            [sys.executable, str(SCRIPT), "--grace", "5", str(node_dir) + "/"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0 and "stopped" in done.stdout, done.stdout + done.stderr
        for p in (raylet, gcs, client_server):
            assert p.wait(timeout=10) is not None
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
        assert other_node.poll() is None and reader.poll() is None

        again = subprocess.run(
            [sys.executable, str(SCRIPT), str(node_dir)], capture_output=True, text=True, timeout=60
        )
        assert again.returncode == 1 and "no Ray process" in again.stderr
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
