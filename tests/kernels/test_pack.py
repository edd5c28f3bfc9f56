"""kernels/pack.py: pack (gather) and unpack (scatter, optionally adding) against the reference,
forward and backward, for every implementation."""

import pytest
import torch

from kernels import pack_tokens, pack_tokens_ref, unpack_tokens, unpack_tokens_ref
from tests.kernels.conftest import skip_unless_triton

IMPLS = [pytest.param("triton", marks=pytest.mark.triton), "cpp", "torch", "ref"]


def _skip(impl, device):
    skip_unless_triton(impl, device)
    if impl == "cpp" and device.type != "cpu":
        pytest.skip("the C++ kernels take CPU tensors")


def _case(device, B=3, N=37, C=40, keep=(0, 37, 11), seed=0):
    """An awkward pack: one image keeps nothing, one everything, one a random subset."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for b, n in enumerate(keep):
        idx.append(b * N + torch.randperm(N, generator=g)[:n].sort().values)
    indices = torch.cat(idx).to(device)
    x = torch.randn(B * N, C, generator=g).to(device)
    return x, indices


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("C", [1, 24, 40, 130])
def test_pack_forward_backward(impl, C, device):
    _skip(impl, device)
    x, indices = _case(device, C=C)
    x.requires_grad_(True)
    out = pack_tokens(x, indices, impl=impl)
    assert out.shape == (indices.numel(), C)
    torch.testing.assert_close(out, pack_tokens_ref(x, indices), rtol=0, atol=0)
    g = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, g)
    expect = torch.zeros_like(x).index_put_((indices,), g)
    torch.testing.assert_close(dx, expect, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("C", [24, 130])
def test_unpack_forward_backward(impl, add, C, device):
    _skip(impl, device)
    base, indices = _case(device, C=C, seed=1)
    packed = torch.randn(indices.numel(), C, device=device)
    base.requires_grad_(True)
    packed.requires_grad_(True)
    base_before = base.detach().clone()
    out = unpack_tokens(packed, indices, base, add=add, impl=impl)
    torch.testing.assert_close(base, base_before, rtol=0, atol=0)  # out of place
    ref = unpack_tokens_ref(packed, indices, base, add)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    unselected = torch.ones(base.shape[0], dtype=torch.bool, device=device)
    unselected[indices] = False
    torch.testing.assert_close(out[unselected], base[unselected], rtol=0, atol=0)

    g = torch.randn_like(out)
    d_packed, d_base = torch.autograd.grad(out, (packed, base), g)
    d_packed_ref, d_base_ref = torch.autograd.grad(ref, (packed, base), g)
    torch.testing.assert_close(d_packed, d_packed_ref, rtol=0, atol=0)
    torch.testing.assert_close(d_base, d_base_ref, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["cpp", "torch", "ref"])
def test_pack_unpack_gradcheck(impl):
    x, indices = _case(torch.device("cpu"), B=2, N=6, C=3, keep=(0, 4))
    x = x.double().requires_grad_(True)
    base = torch.randn_like(x).requires_grad_(True)

    def f(x, base):
        return unpack_tokens(pack_tokens(x, indices, impl=impl) * 3.0, indices, base, add=True, impl=impl)

    assert torch.autograd.gradcheck(f, (x, base))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_pack(impl, device):
    _skip(impl, device)
    x = torch.randn(10, 8, device=device)
    indices = torch.empty(0, dtype=torch.int64, device=device)
    assert pack_tokens(x, indices, impl=impl).shape == (0, 8)
    out = unpack_tokens(x[:0], indices, x, impl=impl)
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_unpack_cpp_kernel_is_the_one_that_runs(monkeypatch):
    """float32 on CPU with auto: the C++ unpack (it rejects duplicate indices, which index_add_ would
    silently sum); float64: the torch path."""
    monkeypatch.delenv("SPA_ATTN_IMPL", raising=False)
    base = torch.randn(10, 8)
    dup = torch.tensor([3, 3])
    with pytest.raises(RuntimeError, match="unique"):
        unpack_tokens(torch.randn(2, 8), dup, base, add=True)
    unpack_tokens(torch.randn(2, 8).double(), dup, base.double(), add=True)  # torch path: no check
    with pytest.raises(RuntimeError, match="out of range"):
        unpack_tokens(torch.randn(1, 8), torch.tensor([10]), base, impl="cpp")


def test_unpack_cpp_strided_inputs():
    """Non-contiguous base and packed (a transposed view, a column slice) give the reference's result."""
    base = torch.randn(8, 30).t()  # (30, 8), strided
    packed = torch.randn(4, 16)[:, ::2]  # (4, 8), strided
    indices = torch.tensor([29, 0, 7, 3])
    for add in (False, True):
        out = unpack_tokens(packed, indices, base, add=add, impl="cpp")
        torch.testing.assert_close(out, unpack_tokens_ref(packed, indices, base, add), rtol=0, atol=0)


def _layouts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same (R, C) values in awkward memory: transposed storage, a column slice (stride 2), a
    storage offset (rows 1: of a larger tensor)."""
    R, C = t.shape
    return {
        "contiguous": t,
        "transposed": t.t().contiguous().t(),
        "column_step": torch.zeros(R, 2 * C, dtype=t.dtype, device=t.device).index_copy(
            1, torch.arange(0, 2 * C, 2, device=t.device), t
        )[:, ::2],
        "offset": torch.cat([torch.zeros(1, C, dtype=t.dtype, device=t.device), t])[1:],
    }


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("memory", ["contiguous", "transposed", "column_step", "offset"])
def test_pack_unpack_any_strides_and_dtypes(impl, dtype, memory, device):
    """Inputs as the block and autograd hand them over (views with other strides, half types, int32
    indices) give the reference's values, forward and backward: the kernels' stride and dtype
    handling (the Triton kernels read rows of unit column stride and copy other layouts first)."""
    _skip(impl, device)
    x, indices = _case(device, C=24, seed=3)
    x = _layouts(x.to(dtype))[memory].requires_grad_(True)
    base = _layouts(torch.randn_like(x, dtype=dtype))[memory].requires_grad_(True)
    idx32 = indices.to(torch.int32)
    out = unpack_tokens(pack_tokens(x, idx32, impl=impl) * 2, idx32, base, add=True, impl=impl)
    ref = unpack_tokens_ref(pack_tokens_ref(x, indices) * 2, indices, base, True)
    # exact, except the Triton interpreter's float32 -> bfloat16 cast of the sum, which truncates where
    # a GPU rounds to nearest (one bf16 step)
    interpreted_bf16 = impl == "triton" and device.type == "cpu" and dtype == torch.bfloat16
    tol = dict(rtol=2**-7, atol=0) if interpreted_bf16 else dict(rtol=0, atol=0)
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, base), g), torch.autograd.grad(ref, (x, base), g)):
        torch.testing.assert_close(a, b, **tol)


def test_checks():
    x = torch.randn(10, 8)
    with pytest.raises(ValueError):
        pack_tokens(x.view(2, 5, 8), torch.tensor([0]))
    with pytest.raises(TypeError):
        pack_tokens(x, torch.tensor([0.0]))
    with pytest.raises(ValueError):
        unpack_tokens(torch.randn(2, 8), torch.tensor([0]), x)
    with pytest.raises(ValueError):
        unpack_tokens(torch.randn(1, 7), torch.tensor([0]), x)
