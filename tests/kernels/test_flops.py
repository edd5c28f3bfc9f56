"""kernels/flops.py: fvcore's count of the SPA attention block equals the analytic count, and
``torch.utils.flop_counter`` uses the same formulas (in flops = 2 x multiply-adds).

Analytic count (multiply-adds; B images of N tokens, C channels, H heads of D = C / H, T kept tokens,
sequences of lengths n_i, M x M windows, P the largest count):

- gate Linear(C, 1) on every token:      B*N*C
- qkv and proj Linears on the T tokens:  3*T*C^2 + T*C^2
- varlen / containers attention:         2*H*D*sum_i n_i^2 = 2*C*sum_i n_i^2   (QK^T and PV)
- pad: qkv on the B*P padded slots, SDPA on (B, H, P, D): 3*B*P*C^2 + 2*B*P^2*C (+ gate, proj)
- dense global block: 4*B*N*C^2 + 2*B*N^2*C; Swin window block: 4*B*N*C^2 + 2*B*N*M^2*C
Biases, softmax, pack/unpack and the residual add count 0 (fvcore's convention).
"""

import warnings

import pytest
import torch

import kernels
from kernels import FVCORE_HANDLES, container_seqlens, cu_seqlens_from_counts, varlen_attention
from kernels.bench import GlobalAttentionBlock, SPAAttentionBlock, WindowAttentionBlock

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


@pytest.mark.parametrize("strategy", ["varlen", "containers"])
def test_fvcore_spa_block_equals_analytic(strategy):
    x = torch.randn(B, N, C)
    block = SPAAttentionBlock(C, H, strategy, container_len=M * M).eval()
    total, by_op = _fvcore(block, (x, COUNTS))
    T = int(COUNTS.sum())
    if strategy == "varlen":
        cu, _ = cu_seqlens_from_counts(COUNTS)
    else:
        cu, _, _, _ = container_seqlens(COUNTS, M * M)
    expect = B * N * C + 3 * T * C * C + T * C * C + 2 * C * _sq_sum(cu)
    assert total == expect
    assert by_op["varlen_attention"] == 2 * C * _sq_sum(cu)
    assert "pack_tokens" not in by_op or by_op["pack_tokens"] == 0


def test_fvcore_pad_block_equals_analytic():
    x = torch.randn(B, N, C)
    block = SPAAttentionBlock(C, H, "pad").eval()
    total, _ = _fvcore(block, (x, COUNTS))
    T, P = int(COUNTS.sum()), int(COUNTS.max())
    assert total == B * N * C + 3 * B * P * C * C + 2 * B * P * P * C + T * C * C


def test_fvcore_dense_blocks_equal_analytic():
    x = torch.randn(B, N, C)
    total, by_op = _fvcore(GlobalAttentionBlock(C, H), (x,))
    assert by_op["scaled_dot_product_attention"] == 2 * B * N * N * C
    assert total == 4 * B * N * C * C + 2 * B * N * N * C
    total, _ = _fvcore(WindowAttentionBlock(C, H, (GRID, GRID), M), (x,))
    assert total == 4 * B * N * C * C + 2 * B * N * M * M * C


def test_fvcore_mask_block_is_dense_plus_gate():
    x = torch.randn(B, N, C)
    total, _ = _fvcore(SPAAttentionBlock(C, H, "mask").eval(), (x, COUNTS))
    assert total == B * N * C + 4 * B * N * C * C + 2 * B * N * N * C


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
