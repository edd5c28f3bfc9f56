"""harness/task/backend.py: the TrainBackend protocol, TorchBackend (its schedule: test_optim.py)."""

from __future__ import annotations

import pytest
import torch

from harness.config import trial_from_dict
from harness.task.backend import TorchBackend, TrainBackend, autocast_dtype


def test_autocast_dtype():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        autocast_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="unknown"):
        autocast_dtype("int8", cpu)


def test_torch_backend_accumulates_then_steps():
    cfg = trial_from_dict({"train": {"grad_accum": 2, "lr": 0.1, "warmup_steps": 0, "steps": 10}})
    backend = TorchBackend("cpu")
    assert isinstance(backend, TrainBackend) and backend.is_main and backend.world_size == 1
    model = torch.nn.Linear(2, 1)
    module = backend.setup(model, cfg)
    before = model.weight.detach().clone()
    for i in range(2):
        with backend.autocast():
            loss = module(torch.ones(1, 2)).sum()
        backend.backward(loss)
        backend.step()
        changed = not torch.equal(before, model.weight)
        assert changed == (i == 1)  # the optimizer steps at every second micro-batch
    assert backend.lr < 0.1  # the cosine schedule moved
    assert backend.all_reduce_mean(3.0) == 3.0
    s1 = list(backend.sampler(range(10), True, seed=3))
    assert sorted(s1) == list(range(10)) and s1 == list(backend.sampler(range(10), True, seed=3))
    assert backend.sampler(range(10), False, seed=3) is None
