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
    # default: one parallel region (C++ kernels, pack) gets torch's threads, many small calls get 1;
    # a number applies to both, never above torch's
    expected = {"0": (total, total), "1": (1, 1), "64": (total, total), None: (1, total)}[setting]
    assert (cpu_op_thread_count(), cpu_op_thread_count(single_region=True)) == expected
    for single_region, n in zip((False, True), expected):
        with cpu_op_threads(torch.zeros(1), single_region=single_region):
            assert torch.get_num_threads() == n
        assert torch.get_num_threads() == total


def test_cpu_op_thread_count_rejects_junk(monkeypatch):
    monkeypatch.setenv(THREADS_ENV_VAR, "two")
    with pytest.raises(ValueError, match=THREADS_ENV_VAR):
        cpu_op_thread_count()
