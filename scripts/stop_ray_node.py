"""Stop the Ray node(s) started with ``--temp-dir DIR`` on this machine, and nothing else.

    python scripts/stop_ray_node.py /tmp/ray-n2 /tmp/ray-n1     # the second node, then the head
    python scripts/stop_ray_node.py --dry-run /tmp/ray-n1       # list what would be stopped

``ray stop`` ends every Ray process of the machine: on a machine that runs the two nodes of
docs/cluster.md beside other Ray instances (someone's tests, another cluster), that is more than
was started. A node's processes are found by what Ray writes on their command lines:

- the processes ``ray start`` (or ``ray._private.node.Node``) launches name the node's temp dir in
  one of Ray's options (``--temp-dir=DIR``, ``--session-dir=DIR/session_...``, ``--log_dir=...``:
  gcs_server, raylet, dashboard, monitor, log_monitor); the head's client server names the node by
  id (``--node-id=``, the raylet's ``--node_id``);
- everything those processes started: dashboard modules, the raylet's agents and workers (Tune
  trials, Ray Train workers, a job's supervisor and its driver).

Only this user's processes are considered, and only Ray's options count (a ``less DIR/...`` on a
log file is not a node's process). Each PID is printed with its name; they get SIGTERM, and SIGKILL
after ``--grace`` seconds if still there. Exit status 0 when something was stopped (or listed), 1
when no process of these nodes was found.
"""

from __future__ import annotations

import argparse
import os
import sys

import psutil

# Ray's options that hold a node's temp dir or a path inside it.
_DIR_OPTIONS = (
    "--temp-dir",
    "--temp_dir",
    "--session-dir",
    "--session_dir",
    "--log_dir",
    "--log-dir",
    "--logs-dir",
)


def _names_dir(cmdline: list[str], temp_dir: str) -> bool:
    for arg in cmdline:
        option, eq, value = arg.partition("=")
        if (
            eq
            and option in _DIR_OPTIONS
            and (value.rstrip("/") == temp_dir or value.startswith(temp_dir + "/"))
        ):
            return True
    return False


def _option(cmdline: list[str], *names: str) -> str | None:
    for arg in cmdline:
        option, eq, value = arg.partition("=")
        if eq and option in names:
            return value
    return None


def node_processes(temp_dirs: list[str]) -> list[psutil.Process]:
    """The processes of the nodes started with these temp dirs, parents before their children."""
    dirs = [os.path.abspath(d).rstrip("/") for d in temp_dirs]
    me = psutil.Process()
    mine = {me.pid, *(p.pid for p in me.parents())}  # this script names the dirs too
    user = me.username()
    procs = []
    for p in psutil.process_iter(["pid", "username", "cmdline"]):
        if p.info["username"] == user and p.info["pid"] not in mine and p.info["cmdline"]:
            procs.append(p)
    roots = [p for p in procs if any(_names_dir(p.info["cmdline"], d) for d in dirs)]
    node_ids = {_option(p.info["cmdline"], "--node_id") for p in roots} - {None}
    roots += [
        p
        for p in procs
        if p not in roots and _option(p.info["cmdline"], "--node-id", "--node_id") in node_ids
    ]
    found: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            family = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in family:
            if p.pid not in mine:
                found.setdefault(p.pid, p)
    return list(found.values())


def _describe(p: psutil.Process) -> str:
    try:
        name = p.name()
        cmd = p.cmdline()
    except psutil.Error:
        return f"{p.pid} (gone)"
    # a Ray worker renames itself (ray::RayTrainWorker); a binary is named by its path's last part
    label = name if name.startswith("ray::") or not cmd else os.path.basename(cmd[0])
    if label in ("python", "python3") or label.startswith("python3."):
        label = next((os.path.basename(a) for a in cmd[1:] if a.endswith(".py")), " ".join(cmd[:3]))
    return f"{p.pid} {label}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("temp_dirs", nargs="+", metavar="TEMP_DIR", help="a node's --temp-dir")
    parser.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("--dry-run", action="store_true", help="list the processes; stop nothing")
    args = parser.parse_args(argv)
    procs = node_processes(args.temp_dirs)
    if not procs:
        print(f"no Ray process of {', '.join(args.temp_dirs)} found", file=sys.stderr)
        return 1
    print(("would stop" if args.dry_run else "stopping") + f" {len(procs)} processes:")
    for p in procs:
        print("  " + _describe(p))
    if args.dry_run:
        return 0
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=args.grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
    print(f"stopped ({len(alive)} needed SIGKILL)" if alive else "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
