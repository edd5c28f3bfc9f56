"""kernels/seqlens.py: one sequence per image, and the paper's containers as varlen sequences, in
each implementation (the C++ kernel of kernels/csrc/select_cpu.cpp and the torch path)."""

import pytest
import torch

from kernels import container_seqlens, cu_seqlens_from_counts, seqlens

IMPLS = ["cpp", "torch"]


def _containers_brute(counts, L):
    """Walk the packed stream token by token; a new sequence starts at every image change and every
    multiple of L (docs/method.md, "Pack")."""
    seqs = []  # [start, length, image, container]
    pos = 0
    for img, n in enumerate(counts):
        for _ in range(n):
            if seqs and seqs[-1][2] == img and pos % L != 0:
                seqs[-1][1] += 1
            else:
                seqs.append([pos, 1, img, pos // L])
            pos += 1
    return seqs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "counts",
    [[3, 0, 5, 1], [0, 0], [], [196], [7], [0, 49, 0, 50, 1, 48, 0], [13, 29, 0, 1, 1, 1, 60, 2]],
)
def test_cu_seqlens_from_counts(counts, impl):
    cu, m = cu_seqlens_from_counts(torch.tensor(counts, dtype=torch.int64), impl=impl)
    assert cu.dtype == torch.int32 and cu.shape == (len(counts) + 1,)
    expect = [0]
    for n in counts:
        expect.append(expect[-1] + n)
    assert cu.tolist() == expect
    assert m == (max(counts) if counts else 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("L", [1, 4, 7, 49])
@pytest.mark.parametrize(
    "counts", [[3, 0, 5, 1], [0, 0], [], [196], [0, 49, 0, 50, 1, 48, 0], [13, 29, 0, 1, 1, 1, 60, 2]]
)
def test_container_seqlens_matches_brute_force(counts, L, impl):
    cu, m, seq_image, seq_container = container_seqlens(torch.tensor(counts, dtype=torch.int64), L, impl=impl)
    seqs = _containers_brute(counts, L)
    assert cu.dtype == torch.int32 and seq_image.dtype == torch.int64 and seq_container.dtype == torch.int64
    assert cu.tolist() == [s[0] for s in seqs] + [sum(counts)]
    assert seq_image.tolist() == [s[2] for s in seqs]
    assert seq_container.tolist() == [s[3] for s in seqs]
    assert m == max((s[1] for s in seqs), default=0)
    assert m <= L


def test_container_seqlens_only_last_container_partial():
    counts = torch.tensor([10, 3, 0, 40, 7])
    L = 16
    cu, _, _, seq_container = container_seqlens(counts, L)
    lengths = (cu[1:] - cu[:-1]).tolist()
    per_container = {}
    for c, n in zip(seq_container.tolist(), lengths):
        per_container[c] = per_container.get(c, 0) + n
    full = [per_container[c] for c in sorted(per_container)]
    assert all(n == L for n in full[:-1]) and 0 < full[-1] <= L
    assert len(full) == -(-int(counts.sum()) // L)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_cpp_and_torch_agree_on_random_batches(dtype):
    """The C++ layouts are the torch path's exactly: values, dtypes, max_seqlen, on random batches with
    empty images and container lengths from 1 to past the total."""
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        B = int(torch.randint(0, 40, (1,), generator=g))
        counts = torch.randint(0, 70, (B,), generator=g) * (torch.rand(B, generator=g) > 0.2)
        counts = counts.to(dtype)
        cpp, ref = cu_seqlens_from_counts(counts, impl="cpp"), cu_seqlens_from_counts(counts, impl="torch")
        assert cpp[1] == ref[1] and cpp[0].dtype == ref[0].dtype and torch.equal(cpp[0], ref[0])
        L = int(torch.randint(1, 100, (1,), generator=g))
        cpp, ref = container_seqlens(counts, L, impl="cpp"), container_seqlens(counts, L, impl="torch")
        assert cpp[1] == ref[1] and isinstance(cpp[1], int), (counts, L)
        for a, b in zip(cpp[::2] + cpp[3:], ref[::2] + ref[3:]):
            assert a.dtype == b.dtype and torch.equal(a, b), (counts.tolist(), L)


def test_cpu_counts_take_the_cpp_kernel_unless_told(monkeypatch):
    """On CPU, "auto" runs the C++ kernel; "torch" (argument or environment), and traces, run torch."""
    calls = []
    ext = seqlens._cpp

    def spy(impl, counts):
        module = ext(impl, counts)
        calls.append(module is not None)
        return module

    monkeypatch.setattr(seqlens, "_cpp", spy)
    counts = torch.tensor([3, 0, 5])
    container_seqlens(counts, 4)
    cu_seqlens_from_counts(counts, impl="torch")
    monkeypatch.setenv("SPA_ATTN_IMPL", "torch")
    container_seqlens(counts, 4)
    monkeypatch.setenv("SPA_ATTN_IMPL", "auto")
    torch.jit.trace(lambda c: container_seqlens(c, 4)[0], (counts,), check_trace=False)
    assert calls == [True, False, False, False]


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_inputs(impl):
    with pytest.raises(ValueError, match="non-negative"):
        cu_seqlens_from_counts(torch.tensor([1, -1]), impl=impl)
    with pytest.raises(ValueError, match="non-negative"):
        container_seqlens(torch.tensor([1, -1]), 4, impl=impl)
    with pytest.raises(TypeError):
        cu_seqlens_from_counts(torch.tensor([1.0, 2.0]), impl=impl)
    with pytest.raises(ValueError, match="1-D"):
        container_seqlens(torch.tensor([[1, 2]]), 4, impl=impl)
    with pytest.raises(ValueError):
        container_seqlens(torch.tensor([1, 2]), 0, impl=impl)
