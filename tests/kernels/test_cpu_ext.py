"""kernels/csrc/varlen_attention_cpu.cpp (built by kernels/cpu_ext.py): the C++ CPU kernel against a
float64 reference on awkward shapes, with and without Swin's position bias, its own input checks,
threads, and the fallback when it cannot be built. The shared forward/backward tests of every
implementation are in test_varlen_attention.py and test_varlen_attention_numerics.py.

Error bound as there (flash-attention's): ``|out - ref64| <= 2 * |out_torch32 - ref64| + 1e-6``.
"""

import os
import subprocess
import sys

import pytest
import torch

from kernels import PositionBias, cpu_ext, cu_seqlens_from_counts, varlen_attention, varlen_attention_ref
from tests.kernels._helpers import random_places


@pytest.fixture(scope="module")
def ext():
    module = cpu_ext.load()
    assert module is not None, f"the C++ CPU kernels did not build: {cpu_ext.unavailable_reason()}"
    return module


def _check(out, q, k, v, cu, scale, bias=None):
    bias64 = None if bias is None else bias._replace(table=bias.table.double())
    ref = varlen_attention_ref(q.double(), k.double(), v.double(), cu, scale, bias64)
    torch_err = (varlen_attention_ref(q, k, v, cu, scale, bias).double() - ref).abs().max().item()
    err = (out.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + 1e-6, f"max error {err:.3g} > 2 * torch's {torch_err:.3g} + 1e-6"


@pytest.mark.parametrize(
    "counts, H, D",
    [
        ([5, 0, 1, 37, 16, 3, 0], 3, 24),  # empty first/middle/last, length 1, D not a multiple of 16
        ([113, 0, 1, 64, 90], 2, 40),  # several row blocks, one vector tail
        ([7, 6, 12, 1], 1, 7),  # D below one vector
        ([49, 48, 50, 1, 2], 6, 64),  # SPA's sizes
        ([20, 33], 2, 128),
        ([1023], 1, 24),  # long: scores are never held as n x n
    ],
)
def test_matches_reference(ext, counts, H, D):
    g = torch.Generator().manual_seed(sum(counts) + D)
    cu, _ = cu_seqlens_from_counts(torch.tensor(counts))
    T = sum(counts)
    q, k, v = torch.randn(T, 3, H, D, generator=g).unbind(1)  # strided views, as from one qkv Linear
    scale = 0.7 / D**0.5
    out = ext.varlen_attention_fwd(q, k, v, cu, scale)
    assert out.shape == (T, H, D) and out.is_contiguous()
    _check(out, q, k, v, cu, scale)
    contiguous = ext.varlen_attention_fwd(q.contiguous(), k.contiguous(), v.contiguous(), cu.long(), scale)
    assert torch.equal(out, contiguous)  # strides and the dtype of cu_seqlens change nothing


@pytest.mark.parametrize(
    "counts, H, D, M, regions",
    [
        ([5, 0, 1, 37, 16, 3, 0], 3, 24, 3, 1),  # unshifted block: bias only
        ([49, 48, 50, 1, 2], 6, 32, 7, 4),  # Swin's window, a shifted block's four regions
        ([113, 0, 1, 64, 90], 2, 40, 2, 2),  # places farther apart than a window: clamped offsets
        ([1023], 1, 8, 5, 3),
    ],
)
def test_position_bias_matches_reference(ext, counts, H, D, M, regions):
    """Swin's bias and shift mask computed inline from the tokens' places equal the reference's."""
    g = torch.Generator().manual_seed(sum(counts) + M)
    cu, _ = cu_seqlens_from_counts(torch.tensor(counts))
    T = sum(counts)
    q, k, v = torch.randn(T, 3, H, D, generator=g).unbind(1)
    pos = random_places(T, 2 * M + 4, regions, g)
    bias = PositionBias(pos, torch.randn((2 * M - 1) ** 2, H, generator=g), M)
    out = ext.varlen_attention_fwd(q, k, v, cu, D**-0.5, pos, bias.table, M)
    _check(out, q, k, v, cu, D**-0.5, bias)
    same = ext.varlen_attention_fwd(q, k, v, cu, D**-0.5, pos.long(), bias.table.t().contiguous().t(), M)
    assert torch.equal(out, same)  # pos as int64, a transposed table: the same numbers
    assert not torch.allclose(out, ext.varlen_attention_fwd(q, k, v, cu, D**-0.5))  # the bias matters


def test_position_bias_checks(ext):
    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    pos, table = torch.zeros(10, 3, dtype=torch.int32), torch.zeros(9, 2)
    with pytest.raises(RuntimeError, match="together"):
        ext.varlen_attention_fwd(q, q, q, cu, 1.0, pos, None, 2)
    with pytest.raises(RuntimeError, match="table must be"):
        ext.varlen_attention_fwd(q, q, q, cu, 1.0, pos, torch.zeros(9, 3), 2)
    with pytest.raises(RuntimeError, match="pos must be"):
        ext.varlen_attention_fwd(q, q, q, cu, 1.0, pos[:9], table, 2)
    with pytest.raises(RuntimeError, match="window"):
        ext.varlen_attention_fwd(q, q, q, cu, 1.0, pos, torch.zeros(1, 2), 0)


def test_head_dim_one_with_any_stride(ext):
    """Head dim 1: the stride of the last dim is never used, so any stride is read in place."""
    base = torch.randn(9, 2, 1)
    odd = base.as_strided(base.shape, (2, 1, 7))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    assert torch.equal(
        ext.varlen_attention_fwd(odd, odd, odd, cu, 1.0), ext.varlen_attention_fwd(base, base, base, cu, 1.0)
    )


@pytest.mark.parametrize("L, H, D", [(49, 6, 64), (7, 2, 40), (16, 3, 24)])
def test_container_pieces_match_reference(ext, L, H, D):
    """Container layouts: many short pieces, which the kernel groups (up to 64 rows per task) and
    attends to at offsets that are not multiples of the vector width."""
    from kernels import container_seqlens

    g = torch.Generator().manual_seed(L * D)
    counts = torch.randint(0, 60, (12,), generator=g)
    counts[3] = 0
    cu, _, _, _ = container_seqlens(counts, L)
    T = int(counts.sum())
    q, k, v = torch.randn(T, 3, H, D, generator=g).unbind(1)
    _check(ext.varlen_attention_fwd(q, k, v, cu, D**-0.5), q, k, v, cu, D**-0.5)


def test_rows_of_no_sequence_are_zero(ext):
    q = torch.randn(10, 2, 16)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)  # rows 7.. belong to no sequence
    out = ext.varlen_attention_fwd(q, q, q, cu, 0.25)
    assert torch.equal(out[7:], torch.zeros(3, 2, 16))
    _check(out[:7], q[:7], q[:7], q[:7], cu, 0.25)


def test_large_scores_stay_finite(ext):
    """Softmax subtracts the row max: logits of ~1e4 neither overflow nor lose the winner."""
    q = torch.randn(40, 2, 32) * 30
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    out = ext.varlen_attention_fwd(q, q, q, cu, 1.0)
    assert torch.isfinite(out).all()
    _check(out, q, q, q, cu, 1.0)


@pytest.mark.parametrize(
    "cu, match",
    [
        ([1, 4], "start at 0"),
        ([0, 5, 3], "non-decreasing"),
        ([0, 4, 12], "> T = 10"),
    ],
)
def test_kernel_checks_cu_seqlens(ext, cu, match):
    """The kernel reads memory by cu_seqlens: it checks them itself, not only the Python wrapper."""
    q = torch.randn(10, 2, 8)
    with pytest.raises(RuntimeError, match=match):
        ext.varlen_attention_fwd(q, q, q, torch.tensor(cu, dtype=torch.int32), 1.0)


def test_kernel_checks_operands(ext):
    q = torch.randn(10, 2, 8)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="float32"):
        ext.varlen_attention_fwd(q.double(), q.double(), q.double(), cu, 1.0)
    with pytest.raises(RuntimeError, match="like q"):
        ext.varlen_attention_fwd(q, q[:9], q, cu, 1.0)
    with pytest.raises(RuntimeError, match="last dim"):
        ext.varlen_attention_fwd(q, q.transpose(1, 2).contiguous().transpose(1, 2), q, cu, 1.0)


def test_threads_give_the_same_result(ext, monkeypatch):
    """Tasks (sequence, head) are independent: two threads write exactly what one writes."""
    counts = [30, 1, 0, 64, 12, 50, 7, 33]
    cu, m = cu_seqlens_from_counts(torch.tensor(counts))
    q, k, v = torch.randn(sum(counts), 3, 4, 40).unbind(1)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.varlen_attention_fwd(q, k, v, cu, 0.2)
        torch.set_num_threads(2)
        monkeypatch.setenv("SPA_CPU_OP_THREADS", "0")  # the op keeps torch's 2 threads
        two = varlen_attention(q, k, v, cu, m, 0.2, impl="cpp")
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, two)


def test_disabled_kernels_fall_back_loudly():
    """SPA_CPU_KERNELS=0: auto warns once and runs the torch path; an explicit impl='cpp' raises."""
    code = (
        "import warnings, torch, kernels\n"
        "q = torch.randn(6, 2, 8)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    cu, m = kernels.cu_seqlens_from_counts(torch.tensor([2, 4]))\n"
        "    a = kernels.varlen_attention(q, q, q, cu, m)\n"
        "    kernels.varlen_attention(q, q, q, cu, m)\n"
        "msgs = [str(x.message) for x in w if 'C++ CPU kernels are unavailable' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'SPA_CPU_KERNELS=0' in msgs[0], [str(x.message) for x in w]\n"
        "torch.testing.assert_close(a, kernels.varlen_attention(q, q, q, cu, m, impl='torch'), rtol=0, atol=0)\n"
        "try:\n"
        "    kernels.varlen_attention(q, q, q, cu, m, impl='cpp')\n"
        "except RuntimeError as e:\n"
        "    assert 'SPA_CPU_KERNELS=0' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('impl=cpp ran with the kernels disabled')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SPA_ATTN_IMPL"} | {"SPA_CPU_KERNELS": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr


def test_build_command_runs_one_copy_of_the_module(ext):
    """``python -m kernels.cpu_ext`` (scripts/setup.sh runs it): the package must not import the module
    itself, or runpy executes a second copy of it (and warns so)."""
    r = subprocess.run([sys.executable, "-c", "import sys, kernels; assert 'kernels.cpu_ext' not in sys.modules"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "kernels.cpu_ext"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0 and "C++ CPU kernels ready" in r.stdout, r.stderr


@pytest.mark.slow
def test_portable_build_matches_reference():
    """The DEFAULT-capability build (plain at::vec: what non-x86 machines get) compiles and is exact.
    Builds a second copy of the kernels, about a minute."""
    module = cpu_ext._build("DEFAULT", verbose=False)
    counts = [5, 0, 1, 37, 16, 3, 0, 70]
    cu, _ = cu_seqlens_from_counts(torch.tensor(counts))
    q, k, v = torch.randn(sum(counts), 3, 2, 40).unbind(1)
    _check(module.varlen_attention_fwd(q, k, v, cu, 0.15), q, k, v, cu, 0.15)
    x, w, b = torch.randn(37, 45), torch.randn(45), torch.randn(1)  # 45: vector chains, then a scalar tail
    torch.testing.assert_close(
        module.token_scores_fwd(x, w, b).double(), x.double() @ w.double() + b.double(), rtol=1e-5, atol=1e-5
    )
    packed, rows = torch.randn(3, 45), torch.tensor([4, 0, 9])
    expect = x.clone().index_add_(0, rows, packed)
    torch.testing.assert_close(module.unpack_tokens_fwd(packed, rows, x, True), expect, rtol=0, atol=0)


def test_failed_build_falls_back_and_is_not_retried(tmp_path):
    """A compiler that fails: auto warns with the build error and runs the torch path; the failure is
    recorded, so the next process does not spend the build time again (the compiler is not called)."""
    log = tmp_path / "cxx.log"
    cxx = tmp_path / "cxx"
    cxx.write_text(f'#!/bin/sh\necho "$@" >> {log}\necho "no compiler here" >&2\nexit 1\n')
    cxx.chmod(0o755)
    code = (
        "import warnings, torch, kernels\n"
        "q = torch.randn(6, 2, 8)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    cu, m = kernels.cu_seqlens_from_counts(torch.tensor([2, 4]))\n"
        "    out = kernels.varlen_attention(q, q, q, cu, m)\n"
        "msgs = [str(x.message) for x in w if 'C++ CPU kernels are unavailable' in str(x.message)]\n"
        "assert len(msgs) == 1 and 'failed' in msgs[0], [str(x.message) for x in w]\n"
        "torch.testing.assert_close(out, kernels.varlen_attention_ref(q, q, q, cu))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("SPA_ATTN_IMPL", "SPA_CPU_KERNELS")}
    env |= {"CXX": str(cxx), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    for attempt in range(2):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        calls = log.read_text().count("\n") if log.exists() else 0
        if attempt == 0:
            assert calls > 0  # the first process tried to build
            first_calls = calls
        else:
            assert calls == first_calls  # the second did not
    assert list((tmp_path / "ext").rglob(cpu_ext._FAILED))
