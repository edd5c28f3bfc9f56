"""Fixtures shared by the test packages: the compiled FlexAttention path forced onto the CPU; a check
that pytest-xdist keeps each ``xdist_group`` on one worker."""

from __future__ import annotations

import pytest
import torch


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``scripts/test.sh`` runs the tests that start a Ray (an embedded one, or a two-node cluster)
    under ``--dist loadgroup`` so that each group runs on one worker, one test at a time. pytest-xdist
    3.8 groups a test by renaming its node id to ``test@group`` on the worker; under pytest 9.2 the
    rename no longer takes (pytest-dev/pytest-xdist#1386) and the groups silently spread over the
    workers: two embedded Rays and two clusters at once on 2 cores, whose trials then miss Ray Train's
    start timeouts. Such a test fails at once, saying why."""
    if getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group"):
        if "@" not in item.nodeid:
            pytest.fail(
                f"--dist loadgroup did not keep this test in its xdist_group: pytest {pytest.__version__} "
                "with this pytest-xdist loses the groups (pytest-dev/pytest-xdist#1386); pyproject.toml "
                "pins a pytest that keeps them",
                pytrace=False,
            )


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
