"""kernels/varlen_attention.py: every CPU implementation against a float64 reference, forward and
backward, on ragged packs (empty sequences, length-1 sequences, sequences spanning several kernel
blocks), head dims that are not powers of two, with and without Swin's position bias; the CUDA
route to FlexAttention; plus the dispatcher and import hygiene. Property tests over shapes,
magnitudes and layouts: test_varlen_attention_numerics.py.

Error bound (flash-attention's): ``|out - out_ref| <= 2 * |out_pt - out_ref| + floor`` (max over
elements), where ``out_ref`` is the reference in float64 and ``out_pt`` torch itself in the test dtype:
a kernel may err at most twice as much as torch does. Torch computes attention two ways (explicit
softmax math, and its SDPA kernels, whose CPU backward rounds differently); ``|out_pt - out_ref|`` is
the larger of the two errors.
"""

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from kernels import (
    IMPLS,
    container_seqlens,
    cu_seqlens_from_counts,
    resolve_impl,
    varlen_attention,
    varlen_attention_ref,
)
from kernels.position_bias import PositionBias
from kernels.varlen_attention import _SHORT, _calls, _container_rows
from tests.kernels._helpers import random_places, sdpa_per_sequence
from tests.kernels.conftest import triton_ok

# every registered implementation but "auto" (which resolves to one of them) and "triton" (on CUDA,
# FlexAttention: kernels/flex_attention.py and its tests; its route is tested below)
IMPL_PARAMS = [name for name in IMPLS if name not in ("auto", "triton")]
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}

# ragged packs: empty sequences (first, middle, last), a length-1 sequence, sequences longer than a
# kernel block (the interpreter uses 16), a total T of a few hundred
COUNTS = {
    "ragged": [5, 0, 1, 37, 16, 3, 0],
    "long": [113, 0, 1, 64, 90],
    "single1": [1],
}


def _inputs(counts, H, D, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu, max_seqlen = cu_seqlens_from_counts(torch.tensor(counts))
    T = int(cu[-1])
    q, k, v, do = (torch.randn(T, H, D, generator=g).to(device=device, dtype=dtype) for _ in range(4))
    return q, k, v, do, cu.to(device), max_seqlen


def _position_bias(T, H, window, seed=0, regions=2):
    """Random places on a (2M+3)^2 grid in a few shift regions, and a random table."""
    g = torch.Generator().manual_seed(seed)
    pos = random_places(T, 2 * window + 3, regions, g)
    return PositionBias(pos, torch.randn((2 * window - 1) ** 2, H, generator=g), window)


def _max_err(got, ref) -> float:
    return (got.double() - ref).abs().max().item() if got.numel() else 0.0


def _check_against_reference(impl, counts, H, D, device, dtype=torch.float32, scale=None, window=0):
    q, k, v, do, cu, max_seqlen = _inputs(counts, H, D, device, dtype)
    bias = _position_bias(q.shape[0], H, window) if window else None

    def leaves_of(dt):
        ts = [t.to(dt).requires_grad_(True) for t in (q, k, v)]
        b = None if bias is None else bias._replace(table=bias.table.to(dt).requires_grad_(True))
        return ts, b, ts + ([b.table] if b is not None else [])

    def grads_of(out, wrt, dt):
        if out.numel():
            return list(torch.autograd.grad(out, wrt, do.to(dt)))
        return [torch.zeros_like(t) for t in wrt]

    ts, b, wrt = leaves_of(dtype)
    out = varlen_attention(*ts, cu, max_seqlen, scale, impl=impl, bias=b)
    assert out.shape == q.shape and out.dtype == dtype
    got = [out, *grads_of(out, wrt, dtype)]

    ts, b, wrt = leaves_of(torch.float64)
    out_ref = varlen_attention_ref(*ts, cu, scale, b)
    want = [out_ref, *grads_of(out_ref, wrt, torch.float64)]
    torch_err = [0.0] * len(want)  # out, dq, dk, dv (, dtable)
    for fn in (varlen_attention_ref, sdpa_per_sequence):
        ts, b, wrt = leaves_of(dtype)
        out_pt = fn(*ts, cu, scale, b)
        for i, (a, r) in enumerate(zip([out_pt, *grads_of(out_pt, wrt, dtype)], want)):
            torch_err[i] = max(torch_err[i], _max_err(a, r))

    for i, (name, g, r) in enumerate(zip(("out", "dq", "dk", "dv", "dtable"), got, want)):
        err = _max_err(g, r)
        bound = 2 * torch_err[i] + FLOOR[dtype]
        assert err <= bound, f"{impl} {name}: max error {err:.3g} > 2 * torch's {torch_err[i]:.3g} + floor"


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("D", [24, 40, 64])
def test_forward_backward_ragged(impl, D):
    _check_against_reference(impl, COUNTS["ragged"], 2, D, torch.device("cpu"))


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("name", ["long", "single1"])
def test_forward_backward_shapes(impl, name):
    _check_against_reference(impl, COUNTS[name], 2, 40, torch.device("cpu"), scale=0.3)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
@pytest.mark.parametrize("name, window", [("ragged", 3), ("long", 7), ("single1", 2)])
def test_forward_backward_with_position_bias(impl, name, window):
    """Swin's bias and shift mask: out, dq, dk, dv and the table's gradient."""
    _check_against_reference(impl, COUNTS[name], 3, 24, torch.device("cpu"), scale=0.5, window=window)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_containers_equal_block_diagonal_attention(impl):
    """Containers of L = 16 as varlen == the paper's form: (B', L) containers, block-diagonal mask."""
    device = torch.device("cpu")
    counts, L, H, D = [10, 0, 23, 1, 30], 16, 2, 24
    cu, max_seqlen, seq_image, seq_container = container_seqlens(torch.tensor(counts), L)
    T = sum(counts)
    q, k, v = (torch.randn(T, H, D, device=device) for _ in range(3))
    out = varlen_attention(q, k, v, cu.to(device), max_seqlen, impl=impl)

    n_cont = -(-T // L)
    image = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))  # (T,)
    slot_image = torch.full((n_cont * L,), -1, dtype=torch.long)
    slot_image[:T] = image
    slot_image = slot_image.view(n_cont, L)
    mask = (slot_image[:, :, None] == slot_image[:, None, :]) & (slot_image[:, None, :] >= 0)
    mask |= ~mask.any(-1, keepdim=True)  # empty slots attend anywhere; dropped below
    grid = [
        F.pad(t, (0, 0, 0, 0, 0, n_cont * L - T)).view(n_cont, L, H, D).transpose(1, 2) for t in (q, k, v)
    ]
    dense = F.scaled_dot_product_attention(*grid, attn_mask=mask[:, None].to(device))  # (B', H, L, D)
    dense = dense.transpose(1, 2).reshape(n_cont * L, H, D)[:T]
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_no_tokens(impl):
    cu, m = cu_seqlens_from_counts(torch.tensor([0, 0]))
    q = torch.randn(0, 2, 24, requires_grad=True)
    out = varlen_attention(q, q, q, cu, m, impl=impl)
    assert out.shape == (0, 2, 24)
    bias = PositionBias(torch.zeros(0, 3, dtype=torch.int32), torch.randn(9, 2, requires_grad=True), 2)
    out = varlen_attention(q, q, q, cu, m, impl=impl, bias=bias)
    assert out.shape == (0, 2, 24)
    # an empty pack still gives q and the table a gradient (zeros), as a non-empty one does: a rank
    # whose images keep nothing fills the same ZeRO gradient buckets as the others
    dq, dtable = torch.autograd.grad(out.sum(), [q, bias.table])
    assert dq.shape == q.shape and dtable.shape == (9, 2) and not dtable.any()


@pytest.mark.parametrize("impl", ["torch", "ref"])
@pytest.mark.parametrize("window", [0, 2])
def test_gradcheck(impl, window):
    q, k, v, _, cu, m = _inputs([3, 0, 1, 5], 2, 5, torch.device("cpu"), torch.float64)
    leaves = [t.requires_grad_(True) for t in (q, k, v)]
    if not window:
        assert torch.autograd.gradcheck(lambda q, k, v: varlen_attention(q, k, v, cu, m, impl=impl), leaves)
        return
    bias = _position_bias(q.shape[0], 2, window)
    table = bias.table.double().requires_grad_(True)

    def fn(q, k, v, table):
        return varlen_attention(q, k, v, cu, m, impl=impl, bias=bias._replace(table=table))

    assert torch.autograd.gradcheck(fn, [*leaves, table])


@pytest.mark.parametrize(
    "counts",
    [
        [49] * 9 + [48, 47, 3, 2, 2, 1, 0, 17, 18, 20, 196, 190],  # SPA's lengths with short ones
        [2] * 40 + [1] * 30 + [3] * 20 + [0, 5, 4, 37],  # many short sequences, one long
        [3] * 50 + [2] * 50,  # short ones only
        [0, 70, 0, 0, 41, 0, 55, 1, 0],  # sequences next to empty ones that share their start
    ],
)
def test_torch_path_calls(counts):
    """The torch path's calls, forward and backward: sequences of at least ``_SHORT`` tokens one each
    on views, the shorter ones in one padded call."""
    bounds = [0, *itertools.accumulate(counts)]
    calls = _calls(bounds, torch.device("cpu"))
    singles = sorted(c.P for c in calls if c.idx is None)
    batched = [int(c.valid.sum()) for c in calls if c.idx is not None]
    short = [n for n in counts if 0 < n < _SHORT]
    assert singles == sorted(n for n in counts if n >= _SHORT or short == [n])
    assert batched == ([sum(short)] if len(short) > 1 else [])
    _check_against_reference("torch", counts, 2, 16, torch.device("cpu"))


@pytest.mark.parametrize("counts", [[10, 0, 23, 1, 30, 49, 49, 5], [16] * 6, [40, 41, 39, 7]])
def test_torch_path_container_rows(counts):
    """Container layouts run as rows of L with a block-diagonal mask (views, one call), forward and
    backward."""
    L = 16
    cu, _, _, _ = container_seqlens(torch.tensor(counts), L)
    assert _container_rows(cu.tolist()) == L
    q, k, v, do, _, _ = _inputs(counts, 2, 16, torch.device("cpu"), torch.float32)
    got, want = ([t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2))
    out = varlen_attention(*got, cu, L, impl="torch")
    ref = varlen_attention_ref(*want, cu)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out, got, do), torch.autograd.grad(ref, want, do)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 3])
def test_triton_impl_calls_flex_attention(monkeypatch, window):
    """impl "triton" (auto on CUDA) hands the call to ``kernels.flex_attention.flex_varlen_attention``,
    outside the custom op (FlexAttention has its own autograd), with the scale resolved and the bias
    as given. A stand-in module records the call; the real one is tested in its own test file."""
    import types

    if not triton_ok(torch.device("cpu")):
        pytest.skip("triton not importable, or CPU tensors without TRITON_INTERPRET=1")
    calls = []
    stub = types.ModuleType("kernels.flex_attention")
    stub.flex_varlen_attention = lambda *a: calls.append(a) or a[0] * 2
    monkeypatch.setitem(sys.modules, "kernels.flex_attention", stub)
    q, k, v, _, cu, m = _inputs(COUNTS["ragged"], 2, 16, torch.device("cpu"), torch.float32)
    bias = _position_bias(q.shape[0], 2, window) if window else None
    out = varlen_attention(q.requires_grad_(), k, v, cu.long(), m, impl="triton", bias=bias)
    (args,) = calls
    assert args[0] is q and args[1] is k and args[2] is v and args[5] is bias
    assert args[3].dtype == torch.int32 and torch.equal(args[3], cu) and args[4] == 16**-0.5
    assert out.grad_fn is not None and "spa" not in type(out.grad_fn).__name__.lower()


# ----------------------------------------------------------------------------------------------------
# dispatcher


def test_dispatch_auto_and_env(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("SPA_ATTN_IMPL", raising=False)
    assert resolve_impl(None, cpu) == "torch"  # an op without a C++ kernel (pack, unpack)
    assert resolve_impl("auto", cpu) == "torch"
    assert resolve_impl("auto", cpu, cpp=True) == "cpp"  # one with (the kernels build on this machine)
    assert resolve_impl("cpp", cpu) == "torch"  # "cpp" on an op without one: its torch path
    monkeypatch.setenv("SPA_ATTN_IMPL", "ref")
    assert resolve_impl(None, cpu) == "ref"
    assert resolve_impl(None, cpu, cpp=True) == "ref"
    assert resolve_impl("torch", cpu) == "torch"  # the argument wins over the environment
    monkeypatch.setenv("SPA_ATTN_IMPL", "nope")
    with pytest.raises(ValueError, match="SPA_ATTN_IMPL"):
        resolve_impl(None, cpu)
    with pytest.raises(ValueError, match="known: auto, triton, cpp, torch, ref"):
        resolve_impl("flash", cpu)


def test_auto_runs_the_cpp_kernel_for_float32_on_cpu(monkeypatch):
    """What ``auto`` picks reaches the op: float32 CPU -> "cpp", float64 -> "torch" (the C++ kernel
    is float32 only)."""
    va = sys.modules["kernels.varlen_attention"]  # the module (``kernels.varlen_attention`` is the function)
    seen = []
    for name, attr in (("cpp", "_varlen_attention_cpp"), ("torch", "_varlen_attention_torch")):
        real = getattr(va, attr)
        monkeypatch.setattr(va, attr, lambda *a, _n=name, _f=real: seen.append(_n) or _f(*a))
    monkeypatch.delenv("SPA_ATTN_IMPL", raising=False)
    for dtype in (torch.float32, torch.float64):
        q, k, v, _, cu, m = _inputs(COUNTS["ragged"], 2, 24, torch.device("cpu"), dtype)
        varlen_attention(q, k, v, cu, m)  # no grad needed: the direct call
        varlen_attention(*(t.requires_grad_() for t in (q, k, v)), cu, m)  # the custom op
    assert seen == ["cpp", "cpp", "torch", "torch"]


def test_env_var_switches_the_path(monkeypatch):
    """The env var reaches the op: a 'ref' run differs from a 'torch' run only by rounding."""
    q, k, v, _, cu, m = _inputs(COUNTS["ragged"], 2, 24, torch.device("cpu"), torch.float32)
    monkeypatch.setenv("SPA_ATTN_IMPL", "ref")
    a = varlen_attention(q, k, v, cu, m)
    torch.testing.assert_close(a, varlen_attention_ref(q, k, v, cu), rtol=0, atol=0)


def test_checks():
    q = torch.randn(6, 2, 8)
    cu, m = cu_seqlens_from_counts(torch.tensor([2, 4]))
    with pytest.raises(ValueError, match="max_seqlen"):
        varlen_attention(q, q, q, cu, 3)
    with pytest.raises(ValueError, match="non-decreasing"):
        varlen_attention(q, q, q, torch.tensor([0, 4, 2], dtype=torch.int32), 4)
    with pytest.raises(ValueError):
        varlen_attention(q, q[:5], q, cu, m)


def test_import_needs_no_triton_and_no_cuda():
    """``import kernels`` and the CPU path work with triton unimportable and never touch torch.cuda."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "assert not kernels.triton_available()\n"
        "assert not torch.cuda.is_initialized()\n"
        "q = torch.randn(5, 2, 8)\n"
        "cu, m = kernels.cu_seqlens_from_counts(torch.tensor([2, 0, 3]))\n"
        "kernels.varlen_attention(q, q, q, cu, m)\n"
        "for forbidden in ('triton', 'ray', 'deepspeed', 'spa_core', 'harness'):\n"
        "    assert sys.modules.get(forbidden) is None, forbidden\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SPA_ATTN_IMPL"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


def test_cpu_op_threads_restores(monkeypatch):
    from kernels._dispatch import cpu_op_threads

    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu_op_threads(torch.zeros(1)):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("SPA_CPU_OP_THREADS", "0")
        with cpu_op_threads(torch.zeros(1)):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_output_keeps_q_and_the_table_in_the_graph(dtype):
    # what every path's empty pack returns (FlexAttention's on CUDA, spa_core's before any kernel)
    from kernels.position_bias import empty_output

    q = torch.randn(0, 2, 24, dtype=dtype, requires_grad=True)
    table = torch.randn(9, 2, requires_grad=True)  # a float32 parameter, as under autocast
    out = empty_output(q, PositionBias(torch.zeros(0, 3, dtype=torch.int32), table, 2))
    assert out.shape == q.shape and out.dtype == dtype
    dq, dtable = torch.autograd.grad(out.sum(), [q, table])
    assert dq.shape == q.shape and dtable.shape == table.shape and not dtable.any()
    assert empty_output(q, None).shape == q.shape
