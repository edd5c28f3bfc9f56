"""Fixtures shared by the harness tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def one_process_group():
    """One one-process group for the whole test session, as in a trial process: DeepSpeed caches its
    groups, so a group destroyed and made again would leave it holding a dead one (harness.run.trial
    likewise makes one per process and keeps it)."""
    import torch.distributed as dist

    from harness.task.distributed import init_process_group, prepare_accelerator

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.pop(k) for k in keys if k in os.environ}
    made = init_process_group(prepare_accelerator())
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    yield
    if made:
        dist.destroy_process_group()
    for k in keys:
        os.environ.pop(k, None)
    os.environ.update(saved)
