"""Placement groups of a trial's Ray Train attempts: where their workers go (``placement_strategy``),
rank 0 records its group in the store, and the trial removes the groups of earlier attempts before it
retries, and its own before its watchdog ends its process (the last resort of a stuck trial).

Ray ties a placement group to the job, not to the Train controller that made it: when a node dies
with the trial's process, the dead attempt's group keeps the CPUs it holds on the surviving nodes,
and the retry would wait for them until its timeout.
"""

from __future__ import annotations

import contextlib
import json
import logging

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

from harness.config import TrialConfig
from harness.results import Experiment

__all__ = ["placement_strategy", "record_placement_group", "release_placement_groups"]

log = logging.getLogger(__name__)

_PLACEMENT_GROUPS = "placement_groups.json"  # of a trial: its Ray Train attempts' placement groups


def placement_strategy(cfg: TrialConfig) -> str:
    """``STRICT_PACK`` for a trial of several GPU workers: all its GPUs on one node, or the trial
    waits (Ray's default soft ``PACK`` lets an 8-GPU trial straddle nodes, where NCCL's all-reduce
    crosses the network every step); ``PACK`` otherwise (CPU workers may spread when one node is full)."""
    r = cfg.resources
    return "STRICT_PACK" if r.workers > 1 and r.gpus_per_worker > 0 else "PACK"


def release_placement_groups(exp: Experiment, h: str) -> None:
    """Remove the placement groups that attempts of trial ``h`` recorded and Ray still holds."""
    recorded = exp.read_json(exp.trial_path(h, _PLACEMENT_GROUPS)) or []
    table = ray.util.placement_group_table()
    for pg_id in recorded if isinstance(recorded, list) else []:
        if table.get(pg_id, {}).get("state") not in (None, "REMOVED"):
            with contextlib.suppress(Exception):
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
                log.warning("trial %s: removed placement group %s of an earlier attempt", h, pg_id)
    exp.delete(exp.trial_path(h, _PLACEMENT_GROUPS))


def record_placement_group(exp: Experiment, h: str) -> None:
    """Rank 0 of a Ray Train attempt notes its placement group for ``release_placement_groups``."""
    pg = ray.util.get_current_placement_group()
    if pg is None:
        return
    recorded = exp.read_json(exp.trial_path(h, _PLACEMENT_GROUPS))
    recorded = recorded if isinstance(recorded, list) else []
    exp.write_bytes(exp.trial_path(h, _PLACEMENT_GROUPS), json.dumps([*recorded, pg.id.hex()]).encode())
