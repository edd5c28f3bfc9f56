"""Fixtures shared by the test packages: the compiled FlexAttention path forced onto the CPU."""

from __future__ import annotations

import pytest
import torch


class CompiledFlex:
    """What the compiled FlexAttention path compiled while a test ran (``compiled_on_cpu``)."""

    def __init__(self, counter) -> None:
        self.counter = counter

    @property
    def graphs(self) -> int:
        """Graphs Dynamo compiled (a restart of its analysis hands the backend an empty one too, not
        counted)."""
        return sum(1 for gm in self.counter.graphs if len(gm.graph.nodes))


@pytest.fixture
def compiled_on_cpu(monkeypatch):
    """Forces ``kernels.flex_attention`` onto its compiled path on CPU, through Dynamo with the
    ``aot_eager`` backend (Inductor's FlexAttention kernel needs a GPU; its forward runs on CPU this
    way, backward not); yields a ``CompiledFlex``."""
    from torch._dynamo.testing import CompileCounterWithBackend

    import kernels.flex_attention as flex

    counter = CompileCounterWithBackend("aot_eager")
    monkeypatch.setattr(flex, "_COMPILE_BACKEND", counter)
    monkeypatch.setattr(flex, "_compiled_here", lambda q: True)
    torch._dynamo.reset()
    yield CompiledFlex(counter)
    torch._dynamo.reset()
