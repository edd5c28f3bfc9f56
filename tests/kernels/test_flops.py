"""kernels/flops.py: fvcore's count of the ops of ``kernels`` (through ``FVCORE_HANDLES``) equals the
analytic count, and ``torch.utils.flop_counter`` uses the same formulas (in flops = 2 x multiply-adds).

Analytic count (multiply-adds; B images of N tokens, C channels, H heads of D = C / H, T kept tokens,
sequences of lengths n_i):

- gate scores ``token_scores`` on every token:  B*N*C
- qkv and proj Linears on the T tokens:         3*T*C^2 + T*C^2
- varlen / containers attention:                2*H*D*sum_i n_i^2 = 2*C*sum_i n_i^2   (QK^T and PV)
- dense SDPA over (B, H, N, D), masked or not:  2*B*N^2*C
Biases, softmax, pack/unpack and the residual add count 0 (fvcore's convention).
"""

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
from kernels import (
    FVCORE_HANDLES,
    container_seqlens,
    cu_seqlens_from_counts,
    pack_tokens,
    token_scores,
    topk_indices,
    unpack_tokens,
    varlen_attention,
)
from kernels.position_bias import PositionBias

B, GRID, C, H, M = 3, 7, 48, 4, 7
N = GRID * GRID
COUNTS = torch.tensor([0, 17, 49])  # one image keeps nothing, one everything


def _fvcore(module, inputs):
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(module, inputs).set_op_handle(**FVCORE_HANDLES)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return fca.total(), fca.by_operator()


def _sq_sum(cu):
    n = (cu[1:] - cu[:-1]).long()
    return int((n * n).sum())


class _PackedAttention(nn.Module):
    """Gate scores, per-image top-k, pack, qkv, varlen attention over ``layout``'s sequences, proj, unpack:
    x (B, N, C), counts (B,) -> (B, N, C)."""

    def __init__(self, layout: str, impl: str | None = None, bias: bool = False):
        super().__init__()
        self.layout, self.impl = layout, impl
        self.gate, self.qkv, self.proj = nn.Linear(C, 1), nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.table = nn.Parameter(torch.randn((2 * M - 1) ** 2, H)) if bias else None

    def forward(self, x, counts):
        flat = x.reshape(B * N, C)
        indices = topk_indices(token_scores(x, self.gate.weight, self.gate.bias), counts)  # (T,)
        packed = pack_tokens(flat, indices)  # (T, C)
        if self.layout == "varlen":
            cu, max_seqlen = cu_seqlens_from_counts(counts)
        else:
            cu, max_seqlen, _, _ = container_seqlens(counts, M * M)
        q, k, v = self.qkv(packed).view(-1, 3, H, C // H).unbind(1)  # (T, H, D)
        bias = None
        if self.table is not None:  # places on the 7x7 grid, two shift regions
            n = indices % N
            pos = torch.stack([n // GRID, n % GRID, (n // GRID >= 4).to(n.dtype)], 1).to(torch.int32)
            bias = PositionBias(pos, self.table, M)
        o = varlen_attention(q, k, v, cu, max_seqlen, impl=self.impl, bias=bias).reshape(-1, C)
        return unpack_tokens(self.proj(o), indices, flat, add=True).view(B, N, C)


class _MaskedSDPA(nn.Module):
    """Dense attention over all N tokens with a key mask: x (B, N, C), keep (B, N) -> (B, N, C)."""

    def forward(self, x, keep):
        q = x.view(B, N, H, C // H).transpose(1, 2)  # (B, H, N, D)
        return F.scaled_dot_product_attention(q, q, q, attn_mask=keep[:, None, None, :]).transpose(1, 2)


@pytest.mark.parametrize("layout", ["varlen", "containers"])
def test_fvcore_packed_attention_equals_analytic(layout):
    x = torch.randn(B, N, C)
    total, by_op = _fvcore(_PackedAttention(layout).eval(), (x, COUNTS))
    T = int(COUNTS.sum())
    if layout == "varlen":
        cu, _ = cu_seqlens_from_counts(COUNTS)
    else:
        cu, _, _, _ = container_seqlens(COUNTS, M * M)
    assert total == B * N * C + 3 * T * C * C + T * C * C + 2 * C * _sq_sum(cu)
    assert by_op["varlen_attention"] == 2 * C * _sq_sum(cu)
    assert by_op["token_scores"] == B * N * C
    assert "pack_tokens" not in by_op or by_op["pack_tokens"] == 0


def test_fvcore_masked_sdpa_counts_dense():
    keep = torch.arange(N)[None, :] < COUNTS[:, None]
    total, by_op = _fvcore(_MaskedSDPA(), (torch.randn(B, N, C), keep))
    assert total == by_op["scaled_dot_product_attention"] == 2 * B * N * N * C


def test_flop_counter_formulas():
    from torch.utils.flop_counter import FlopCounterMode

    kernels.register_flop_handles()
    kernels.register_flop_handles()  # idempotent
    cu, m = cu_seqlens_from_counts(torch.tensor([5, 0, 1, 9]))
    T, D = int(cu[-1]), 8
    q, k, v = (torch.randn(T, H, D, requires_grad=True) for _ in range(3))
    sq = _sq_sum(cu)
    with FlopCounterMode(display=False) as fc:
        out = varlen_attention(q, k, v, cu, m, impl="torch")
    fwd = fc.get_total_flops()
    assert fwd == 2 * (2 * H * D * sq)  # flops = 2 x MACs
    with FlopCounterMode(display=False) as fc:
        out.sum().backward()
    counts = {str(op): n for op, n in fc.get_flop_counts()["Global"].items()}
    assert counts["spa.varlen_attention_backward"] == 2 * (5 * H * D * sq)


def test_position_bias_adds_no_flops():
    """The bias (a gather and an add per score) counts 0 in both counters, forward and backward, and
    the trace still carries sum n_i^2 to fvcore's handle."""
    from torch.utils.flop_counter import FlopCounterMode

    from kernels.position_bias import PositionBias

    kernels.register_flop_handles()
    cu, m = cu_seqlens_from_counts(torch.tensor([5, 0, 1, 9]))
    T, D, sq = int(cu[-1]), 8, _sq_sum(cu)
    pos = torch.randint(0, 5, (T, 3), dtype=torch.int32)
    table = torch.randn(9, H, requires_grad=True)
    q, k, v = (torch.randn(T, H, D, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as fc:
        out = varlen_attention(q, k, v, cu, m, impl="torch", bias=PositionBias(pos, table, 2))
    assert fc.get_total_flops() == 2 * (2 * H * D * sq)
    with FlopCounterMode(display=False) as fc:
        out.sum().backward()
    assert fc.get_total_flops() == 2 * (5 * H * D * sq)
    assert table.grad is not None and table.grad.abs().sum() > 0

    fixed = table.detach().clone()

    class Biased(torch.nn.Module):
        def forward(self, q):
            return varlen_attention(q, q, q, cu, m, bias=PositionBias(pos, fixed, 2))

    total, by_op = _fvcore(Biased(), (q.detach(),))
    assert total == by_op["varlen_attention"] == 2 * H * D * sq


def test_flop_counter_counts_cpu_sdpa():
    """flop_counter counts SDPA's CPU kernel as 0 unless registered (register_flop_handles does)."""
    from torch.utils.flop_counter import FlopCounterMode

    kernels.register_flop_handles()
    q = torch.randn(2, H, 10, 8)
    with FlopCounterMode(display=False) as fc:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert fc.get_total_flops() == 2 * (2 * 2 * H * 10 * 10 * 8)


# ----------------------------------------------------------------------------------------------------
# the count does not depend on the attention's path: the compiled FlexAttention (CUDA's path, forced
# on CPU by the ``compiled_on_cpu`` fixture) counts as the torch path


def _twin_modules(layout, bias):
    torch.manual_seed(0)
    flex = _PackedAttention(layout, impl="triton", bias=bias).eval()
    ref = _PackedAttention(layout, impl="torch", bias=bias).eval()
    ref.load_state_dict(flex.state_dict())
    return flex, ref


@pytest.mark.triton
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "swin_bias"])
@pytest.mark.parametrize("layout", ["varlen", "containers"])
def test_fvcore_counts_the_compiled_flex_path_as_the_torch_path(compiled_on_cpu, layout, bias):
    x = torch.randn(B, N, C)
    flex, ref = _twin_modules(layout, bias)
    with torch.no_grad():
        y, y_ref = flex(x, COUNTS), ref(x, COUNTS)
    assert compiled_on_cpu.graphs >= 1  # the forward ran the compiled FlexAttention
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    total, by_op = _fvcore(flex, (x, COUNTS))
    total_ref, by_op_ref = _fvcore(ref, (x, COUNTS))
    assert total == total_ref and by_op == by_op_ref
    cu = cu_seqlens_from_counts(COUNTS)[0] if layout == "varlen" else container_seqlens(COUNTS, M * M)[0]
    assert by_op["varlen_attention"] == 2 * C * _sq_sum(cu)


@pytest.mark.triton
def test_without_the_torch_path_the_trace_fails_in_the_flex_path(compiled_on_cpu, monkeypatch):
    # what a FLOP count on a GPU met before: fvcore's torch.jit.trace ran FlexAttention's path, which
    # fails under the trace (first in BlockMask's vmap, then at the compiled function)
    va = importlib.import_module("kernels.varlen_attention")  # the module (the package exports the function)
    monkeypatch.setattr(va, "counting_flops", lambda: False)
    flex, _ = _twin_modules("containers", True)
    with torch.no_grad(), pytest.raises(RuntimeError) as failure:  # no_grad: as harness.measure counts
        _fvcore(flex, (torch.randn(B, N, C), COUNTS))
    assert any(str(entry.path).endswith("kernels/flex_attention.py") for entry in failure.traceback)


@pytest.mark.triton
def test_flop_counter_counts_the_compiled_flex_path_as_the_torch_path(compiled_on_cpu):
    from torch.utils.flop_counter import FlopCounterMode

    kernels.register_flop_handles()
    x = torch.randn(B, N, C)
    flex, ref = _twin_modules("containers", True)
    totals = []
    for module in (flex, ref):
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            module(x, COUNTS)
        totals.append(fc.get_total_flops())
    cu = container_seqlens(COUNTS, M * M)[0]
    T = int(COUNTS.sum())
    assert totals[0] == totals[1] == 2 * (B * N * C + 4 * T * C * C + 2 * C * _sq_sum(cu))
