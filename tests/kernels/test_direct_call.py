"""kernels/_dispatch.py: the ops' direct calls. When nothing needs the custom op (no autograd to record,
no trace, no compile, no dispatch mode), a CPU op calls its kernel without ``torch.library``'s dispatch;
the result must be the custom op's, bit for bit, and everything that needs the op must still get it.
"""

import pytest
import torch

import kernels
from kernels import (
    container_seqlens,
    cu_seqlens_from_counts,
    pack_tokens,
    token_scores,
    unpack_tokens,
    varlen_attention,
)
from kernels._dispatch import direct_call, run_cpu
from kernels.position_bias import PositionBias

CPU_IMPLS = ["cpp", "torch"]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([7, 0, 1, 30, 12])
    x = torch.randn(5 * 32, 24, generator=g)
    idx = torch.cat(
        [b * 32 + torch.randperm(32, generator=g)[:c].sort().values for b, c in enumerate(counts.tolist())]
    )
    return g, counts, x, idx


def _op_calls(impl):
    """Each op once on fixed inputs, as (name, thunk); the thunk takes ``grad``: whether inputs require
    grad (which sends the op through its custom op)."""
    g, counts, x, idx = _inputs()
    cu, m, _, _ = container_seqlens(counts, 9)
    T = int(cu[-1])
    qkv = torch.randn(T, 3, 2, 12, generator=g)
    packed = torch.randn(idx.numel(), 24, generator=g)
    w, b = torch.randn(24, generator=g), torch.randn(1, generator=g)
    pos = torch.stack([torch.randint(0, 9, (T,), generator=g), torch.randint(0, 9, (T,), generator=g),
                       torch.randint(0, 2, (T,), generator=g)], 1).to(torch.int32)  # fmt: skip
    table = torch.randn(25, 2, generator=g)

    def req(t, grad):
        return t.detach().clone().requires_grad_(grad)

    def attention_with_bias(grad):
        bias = PositionBias(pos, req(table, grad), 3)
        return varlen_attention(*(req(t, grad) for t in qkv.unbind(1)), cu, m, impl=impl, bias=bias)

    return [
        ("token_scores", lambda grad: token_scores(req(x, grad), w, b, impl=impl)),
        ("pack_tokens", lambda grad: pack_tokens(req(x, grad), idx, impl=impl)),
        ("unpack_tokens", lambda grad: unpack_tokens(req(packed, grad), idx, x, add=True, impl=impl)),
        ("unpack_tokens_replace", lambda grad: unpack_tokens(req(packed, grad), idx, x, impl=impl)),
        (
            "varlen_attention",
            lambda grad: varlen_attention(*(req(t, grad) for t in qkv.unbind(1)), cu, m, impl=impl),
        ),
        ("varlen_attention_bias", attention_with_bias),
    ]


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_direct_call_equals_the_custom_op(impl):
    """No grad needed -> the direct call; inputs requiring grad -> the custom op: the same bits."""
    for name, call in _op_calls(impl):
        direct = call(False)
        via_op = call(True)
        assert via_op.grad_fn is not None, name  # went through the custom op's autograd
        assert direct.grad_fn is None, name
        torch.testing.assert_close(direct, via_op.detach(), rtol=0, atol=0, msg=name)


def test_direct_call_conditions():
    a, b = torch.randn(3), torch.randn(3, requires_grad=True)
    assert direct_call(a, None)
    assert not direct_call(a, b)  # autograd must record
    with torch.no_grad():
        assert direct_call(a, b)
    with torch.inference_mode():
        assert direct_call(a, b)
    assert direct_call(torch.nn.Parameter(torch.randn(2), requires_grad=False))

    class Sub(torch.Tensor):
        pass

    assert not direct_call(a.as_subclass(Sub))  # a subclass may need to see the op
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False):
        assert not direct_call(a)  # a dispatch mode counts (or fakes) the op itself


def test_traces_and_flop_counters_still_see_the_ops():
    """Without grad, fvcore's trace and FlopCounterMode still meet ``spa::varlen_attention``."""
    kernels.register_flop_handles()
    cu, m = cu_seqlens_from_counts(torch.tensor([5, 0, 3]))
    q = torch.randn(8, 2, 8)
    with torch.no_grad():
        graph = torch.jit.trace(lambda t: varlen_attention(t, t, t, cu, m), (q,), check_trace=False).graph
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as fc:
            varlen_attention(q, q, q, cu, m)
    assert "spa::varlen_attention" in str(graph)
    assert fc.get_total_flops() == 2 * (2 * 2 * 8 * (25 + 9))


def test_profiler_names_direct_calls():
    """Under torch.profiler a direct call is recorded under its op's name."""
    _, counts, x, idx = _inputs()
    with torch.no_grad(), torch.profiler.profile() as prof:
        pack_tokens(x, idx)
        token_scores(x, torch.randn(24), None)
    names = {e.name for e in prof.events()}
    assert {"spa::pack_tokens", "spa::token_scores"} <= names


def test_run_cpu_threads(monkeypatch):
    total = torch.get_num_threads()
    monkeypatch.setenv("SPA_CPU_OP_THREADS", "1")
    assert run_cpu("x", torch.get_num_threads) == 1
    assert torch.get_num_threads() == total
    monkeypatch.delenv("SPA_CPU_OP_THREADS")
    assert run_cpu("x", torch.get_num_threads) == total
    assert run_cpu("x", torch.get_num_threads, single_region=False) == 1


def test_env_switch_reaches_direct_calls(monkeypatch):
    """SPA_ATTN_IMPL still picks the path of a direct call: 'ref' vs 'torch' differ only by rounding,
    and an unknown name raises."""
    _, counts, x, idx = _inputs()
    cu, m = cu_seqlens_from_counts(counts)
    q = torch.randn(int(cu[-1]), 2, 8)
    monkeypatch.setenv("SPA_ATTN_IMPL", "nope")
    with pytest.raises(ValueError, match="SPA_ATTN_IMPL"):
        varlen_attention(q, q, q, cu, m)
    monkeypatch.setenv("SPA_ATTN_IMPL", "ref")
    a = varlen_attention(q, q, q, cu, m)
    monkeypatch.setenv("SPA_ATTN_IMPL", "torch")
    torch.testing.assert_close(varlen_attention(q, q, q, cu, m), a)
