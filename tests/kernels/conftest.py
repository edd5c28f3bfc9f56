"""Kernel tests run without a GPU: Triton kernels go through the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before the kernels are jit-decorated (``kernels`` imports its Triton
modules lazily, so setting it here, before any test runs, is enough). With a GPU present the same tests
also run natively on CUDA tensors (the ``device`` fixture).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def triton_ok(device) -> bool:
    from kernels import triton_available

    return triton_available() and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")


def skip_unless_triton(impl: str, device) -> None:
    if impl == "triton" and not triton_ok(device):
        pytest.skip("triton not importable, or CPU tensors without TRITON_INTERPRET=1")
