"""kernels/_dispatch.py: the thread count the CPU ops run with (the implementation switch itself is
tested with the ops, in test_varlen_attention.py)."""

import pytest
import torch

from kernels._dispatch import THREADS_ENV_VAR, cpu_op_thread_count, cpu_op_threads


@pytest.mark.parametrize("setting", ["0", "1", "64", None])
def test_cpu_op_thread_count(monkeypatch, setting):
    total = torch.get_num_threads()
    if setting is None:
        monkeypatch.delenv(THREADS_ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(THREADS_ENV_VAR, setting)
    expected = {"0": total, "1": 1, "64": total, None: 1}[setting]  # default 1; never above torch's
    assert cpu_op_thread_count() == expected
    with cpu_op_threads(torch.zeros(1)):
        assert torch.get_num_threads() == expected
    assert torch.get_num_threads() == total
