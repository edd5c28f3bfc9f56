"""Host syncs of an SPA step, counted on CPU with the stand-in for CUDA's sync debug mode
(``tests/_syncs.py``): what each function of spa_core reads back from the device.

Budget, per call: selection (every policy, training and evaluation) 0; pack 1 (the kept counts, which
every size after it needs); unpack 0; the SPA block's forward 1 (its pack's) with the GPU's attention
path (FlexAttention: its layout and block mask are built on the device; the kernel itself is not
counted here); the backward 0; a Swin block 0 once its cached index and mask are on the device.
These are the budgets of a trial's steady state: the contracts' value rules (``spa_core.contracts``)
read results back on purpose during each entry's first ``VALUE_CHECKS`` calls, so the budgets are
counted with the value rules done (``test_value_rules_stop_syncing_after_the_first_calls``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import spa_core.strategies  # noqa: F401  (registers the pack strategies)
from spa_core import contracts
from spa_core.block import SPABlock, SwinBlock
from spa_core.config import SPAConfig
from spa_core.pack import pack, unpack
from spa_core.registry import PACK_STRATEGIES, SELECTION_POLICIES
from spa_core.select import select_tokens
from tests._syncs import count_host_syncs

STRATEGIES = list(PACK_STRATEGIES)


@pytest.fixture(autouse=True)
def steady_state_contracts():
    """The contracts as in a trial's steady state: shape rules only (their value rules are done)."""
    with contracts.checking("off"):
        yield


def test_value_rules_stop_syncing_after_the_first_calls():
    """In the default mode the value rules read back on each entry's first VALUE_CHECKS calls of a
    trial, then never: the steady state the budgets below hold for."""
    scores = torch.randn(2, 64)
    cfg = SPAConfig(selection="topk", ratio=0.5)
    with contracts.checking("first"):
        contracts.reset()
        with count_host_syncs() as first:
            select_tokens(scores, cfg, training=True)
        for _ in range(contracts.VALUE_CHECKS):
            select_tokens(scores, cfg, training=True)
        with count_host_syncs() as later:
            select_tokens(scores, cfg, training=True)
    assert len(first.seen) > 0 and later.seen == [], (first.seen, later.seen)


@pytest.fixture(autouse=True)
def host_layouts_uncounted(monkeypatch):
    """The pack makes its sequence layouts on the host, from the counts it read (``torch.tensor`` of
    a list; ``spa_core/pack.py``), and copies them over once: host work on a GPU, but CPU ops like
    any other here, so they run outside the count."""
    import spa_core.pack as pack_module

    def outside(fn):
        def run(counts, *args, **kwargs):
            syncs = _ACTIVE[-1] if _ACTIVE else None
            with syncs.outside() if syncs is not None else contextlib.nullcontext():
                return fn(counts, *args, **kwargs)

        return run

    for name in ("container_seqlens", "cu_seqlens_from_counts"):
        monkeypatch.setattr(pack_module, name, outside(getattr(pack_module, name)))


_ACTIVE: list = []


@contextlib.contextmanager
def counted():
    """``count_host_syncs`` that the fixtures above and the tests' stand-ins can reach."""
    with count_host_syncs() as syncs:
        _ACTIVE.append(syncs)
        try:
            yield syncs
        finally:
            _ACTIVE.pop()


def test_the_stand_in_sees_what_syncs_a_gpu():
    # the proxy itself: each of these waits for a GPU; each is one count, in order, and a plain op none
    t = torch.tensor([0, 3, 0, 2])
    with count_host_syncs() as syncs:
        t + 1
        torch.nonzero_static(t, size=2)
        t.nonzero()
        int(t.sum())
        t.tolist()
        bool((t > 0).any())
        t[t > 0]
        torch.unique(t)
        torch.repeat_interleave(t)
        torch.zeros(2).to("meta")
    assert [what for what, _ in syncs.seen] == [
        "nonzero",
        "_local_scalar_dense",
        "tolist",
        "_local_scalar_dense",
        "boolean mask index",
        "_unique2",
        "repeat_interleave without output_size",
        "copy cpu -> meta",
    ]
    assert all(where.startswith("?") or "tests" not in where for _, where in syncs.seen)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("policy", sorted(SELECTION_POLICIES))
def test_selection_reads_nothing_back(policy, training):
    scores = torch.randn(3, 49)
    tokens = torch.randn(3, 49, 8)
    g = torch.Generator().manual_seed(0)  # on the scores' device, as SPABlock passes it
    with count_host_syncs() as syncs:
        sel = select_tokens(
            scores, SPAConfig(selection=policy), training=training, generator=g, tokens=tokens
        )
    assert sel.mask.shape == (3, 49)
    assert len(syncs) == 0, syncs.seen


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_pack_reads_the_counts_once_and_unpack_nothing(strategy, ordered):
    x = torch.randn(4, 36, 8)
    mask = torch.rand(4, 36, generator=torch.Generator().manual_seed(1)) < 0.4
    mask[1] = False  # an image that keeps nothing
    order = torch.randperm(36, generator=torch.Generator().manual_seed(2)) if ordered else None
    with counted() as syncs:
        packed = pack(x, mask, strategy, cfg=SPAConfig(container_len=9), order=order)
    assert [what for what, _ in syncs.seen] == ["tolist"], syncs.seen
    assert "spa_core/pack.py" in syncs.seen[0][1]
    with count_host_syncs() as syncs:
        unpack(packed, packed.tokens * 2, x, add=True)
    assert len(syncs) == 0, syncs.seen


def _spa_block(strategy, mlp_on="all", selection="gate", attn_impl="triton"):
    torch.manual_seed(0)
    cfg = SPAConfig(selection=selection, pack=strategy, mlp_on=mlp_on, attn_impl=attn_impl, threshold=0.45)
    blk = SPABlock(16, 2, 4, cfg, shift=2, drop_path=0.1)
    blk.generator = torch.Generator().manual_seed(0)
    return blk


@pytest.mark.parametrize("mlp_on", ["all", "selected"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_spa_block_forward_reads_back_once(strategy, mlp_on, monkeypatch):
    """The block's forward on the GPU's attention path (FlexAttention; forced on CPU, where its eager
    kernel runs uncounted): one read, the pack's."""
    import kernels.flex_attention as flex

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the dispatcher pick "triton" on CPU tensors
    eager = flex._eager_flex_attention

    def kernel_uncounted(*args, **kwargs):
        with _ACTIVE[-1].outside() if _ACTIVE else contextlib.nullcontext():
            return eager(*args, **kwargs)

    monkeypatch.setattr(flex, "_eager_flex_attention", kernel_uncounted)
    blk = _spa_block(strategy, mlp_on).train()
    x = torch.randn(3, 8, 8, 16)
    with torch.no_grad():
        blk(x)  # the caches (window order, places) are made on the first call
        with counted() as syncs:
            y, info = blk(x)
    assert 0 < int(info.counts.sum()) < 3 * 64  # a real selection: some kept, some not
    assert [what for what, _ in syncs.seen] == ["tolist"], syncs.seen


@pytest.mark.parametrize("strategy", ["pad", "mask"])
def test_spa_block_backward_reads_nothing_back(strategy):
    # the strategies whose attention is SDPA's (FlexAttention's backward is its compiled kernel)
    blk = _spa_block(strategy, attn_impl="torch").train()
    x = torch.randn(3, 8, 8, 16, requires_grad=True)
    y, _ = blk(x)
    with count_host_syncs() as syncs:
        y.pow(2).sum().backward()
    assert x.grad is not None and len(syncs) == 0, syncs.seen


@pytest.mark.parametrize("shift", [0, 2])
def test_swin_block_copies_its_cached_tensors_to_the_device_once(shift):
    # on the meta device (a stand-in for a GPU: a copy from the host to it is seen): the first forward
    # copies the bias index (and the shift mask) over, every later one nothing
    blk = SwinBlock(16, 2, 4, shift=shift).to("meta")
    x = torch.empty(2, 8, 8, 16, device="meta")
    with count_host_syncs() as first:
        blk(x)
    with count_host_syncs() as later:
        blk(x)
        blk(x)
    assert 1 <= len(first) <= 2 and all(what == "copy cpu -> meta" for what, _ in first.seen), first.seen
    assert len(later) == 0, later.seen
