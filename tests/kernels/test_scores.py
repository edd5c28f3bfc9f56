"""kernels/scores.py: the gate's token scores (a Linear with one output) against float64 ``F.linear``,
forward and backward, per implementation; its FLOP counts."""

import pytest
import torch
import torch.nn.functional as F

from kernels import FVCORE_HANDLES, token_scores, token_scores_ref

IMPLS = ["cpp", "torch", "ref", "auto"]


def _skip(impl, device):
    if impl == "cpp" and device.type != "cpu":
        pytest.skip("the C++ kernels take CPU tensors")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("C", [1, 7, 24, 40, 130, 384])  # below, at and past the kernel's 4-vector chains
@pytest.mark.parametrize("bias", [True, False])
def test_token_scores_forward_backward(impl, C, bias, device):
    _skip(impl, device)
    g = torch.Generator().manual_seed(C)
    x = torch.randn(2, 53, C, generator=g).to(device).requires_grad_(True)
    lin = torch.nn.Linear(C, 1, bias=bias).to(device)
    s = token_scores(x, lin.weight, lin.bias, impl=impl)
    assert s.shape == (2, 53) and s.dtype == torch.float32
    x64, w64 = x.detach().double(), lin.weight.detach().double()
    b64 = lin.bias.detach().double() if bias else None
    ref = F.linear(x64, w64, b64).squeeze(-1)
    torch.testing.assert_close(s.double(), ref, rtol=1e-5, atol=1e-5 * C**0.5)
    ds = torch.randn(2, 53, generator=g).to(device)
    params = [x, lin.weight] + ([lin.bias] if bias else [])
    grads = torch.autograd.grad(s, params, ds)
    expect = [ds.double()[..., None] * w64[0], (ds.double().reshape(-1) @ x64.reshape(-1, C))[None]]
    if bias:
        expect.append(ds.double().sum().reshape(1))
    for got, want in zip(grads, expect):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_token_scores_matches_the_module_and_checks_shapes():
    lin = torch.nn.Linear(16, 1)
    x = torch.randn(4, 16)
    torch.testing.assert_close(token_scores(x, lin.weight, lin.bias), lin(x).squeeze(-1))
    torch.testing.assert_close(token_scores_ref(x, lin.weight[0], lin.bias), lin(x).squeeze(-1))
    assert token_scores(torch.randn(0, 16), lin.weight, lin.bias).shape == (0,)
    with pytest.raises(ValueError, match=r"weight must be \(1, 16\)"):
        token_scores(x, torch.randn(2, 16))
    with pytest.raises(ValueError, match="bias must hold one value"):
        token_scores(x, lin.weight, torch.zeros(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: F.linear decides the dtype
        assert token_scores(x, lin.weight, lin.bias).dtype == torch.bfloat16


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(16,), (3, 5, 16), (2, 3, 4, 16), (2, 0, 16)])
def test_token_scores_any_leading_shape(impl, shape):
    """x (..., C) -> (...), with and without grad (the direct call and the custom op), both weight
    layouts."""
    lin = torch.nn.Linear(16, 1)
    x = torch.randn(shape)
    want = lin(x).squeeze(-1)
    for weight in (lin.weight, lin.weight[0]):
        with torch.no_grad():
            got = token_scores(x, weight, lin.bias, impl=impl)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want.detach())
        got = token_scores(x.requires_grad_(True), weight, lin.bias, impl=impl)
        torch.testing.assert_close(got, want)
        x = x.detach()


def test_token_scores_gradcheck_float64():
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: token_scores(x, w, b), (x, w, b))


def test_token_scores_flops_equal_the_linear_they_replace():
    """fvcore: R * C multiply-adds, what it counts for ``nn.Linear(C, 1)``; flop_counter: twice that."""
    from fvcore.nn import FlopCountAnalysis
    from torch.utils.flop_counter import FlopCounterMode

    from kernels import register_flop_handles

    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.score = torch.nn.Linear(24, 1)

        def forward(self, x):
            return token_scores(x, self.score.weight, self.score.bias)

    gate = Gate()
    lin = gate.score
    x = torch.randn(3, 10, 24)
    fca = FlopCountAnalysis(gate, (x,)).set_op_handle(**FVCORE_HANDLES)
    fca.unsupported_ops_warnings(False)
    assert fca.total() == 3 * 10 * 24 == FlopCountAnalysis(lin, (x,)).total()
    register_flop_handles()
    with FlopCounterMode(display=False) as fc:
        token_scores(x, lin.weight, lin.bias)
    assert fc.get_total_flops() == 2 * 3 * 10 * 24
