"""Provenance columns of a result row: where and with what a trial ran.

``project_commit()`` runs in the driver (a cluster node running the trial may hold the code without
its ``.git``; so does the driver of a Ray job, whose working_dir upload leaves ``.git`` out: there the
commit comes from ``SPA_HARNESS_GIT_COMMIT``, set in the job's runtime env at submission);
``environment(device, workers)`` runs in the trial and reads package versions from
their metadata, so it imports none of them.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

__all__ = [
    "PACKAGES",
    "COMMIT_ENV",
    "project_commit",
    "package_versions",
    "device_name",
    "environment",
    "node_label",
    "short_commit",
]

PACKAGES = ("torch", "deepspeed", "ray", "fvcore", "triton")
_ROOT = Path(__file__).resolve().parent.parent
COMMIT_ENV = "SPA_HARNESS_GIT_COMMIT"  # the submitted tree's commit, for a checkout without .git


def project_commit() -> str:
    """``git rev-parse HEAD`` of the project checkout, ``+dirty`` when tracked files differ; outside
    a git checkout ``$SPA_HARNESS_GIT_COMMIT`` (what ``ray job submit`` passed in), else ``unknown``."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get(COMMIT_ENV, "").strip() or "unknown"


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device: Any) -> str:
    """``cuda:0 (NVIDIA A100-SXM4-40GB)`` or ``cpu (<model name>, <n> threads)``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({model}, {torch.get_num_threads()} threads)"


def environment(device: Any, workers: int) -> dict[str, Any]:
    """Versions, device, host and worker count: the environment columns of a row."""
    row: dict[str, Any] = {f"{name}_version": v for name, v in package_versions().items()}
    row.update(
        python_version=platform.python_version(),
        device=device_name(device),
        workers=workers,
        hostname=socket.gethostname(),
    )
    return row


def _given(value: Any) -> bool:
    """Not None, NaN (a column of a DataFrame where a row lacks it) or empty."""
    return value is not None and value == value and value != ""


def node_label(hostname: Any, node_id: Any) -> str:
    """``host (node 1a2b3c4d)``: the host and the first 8 hex digits of Ray's node id (56 in all;
    two nodes on one machine share the host), either alone when the other is unknown."""
    host = str(hostname) if _given(hostname) else ""
    node = f"node {str(node_id)[:8]}" if _given(node_id) else ""
    return f"{host} ({node})" if host and node else host or node


def short_commit(commit: Any) -> str:
    """A git commit's first 12 hex digits, with its ``+dirty`` mark; other values as they are."""
    if not _given(commit):
        return ""
    head, plus, rest = str(commit).partition("+")
    return (head[:12] if len(head) == 40 else head) + plus + rest
