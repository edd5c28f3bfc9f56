"""kernels/select.py: the per-image top-k as flat row ids, the C++ kernel and the torch path against
the reference (a stable descending sort: higher scores first, NaN above every number, ties to the
lower token index)."""

import pytest
import torch

from kernels import cu_seqlens_from_counts, pack_tokens, topk_indices, topk_indices_ref


def _brute(scores, counts):
    """Python ranking of every row: (NaN first, then by value descending, then by index ascending)."""
    out = []
    for b, row in enumerate(scores.tolist()):
        order = sorted(
            range(len(row)), key=lambda j: (row[j] == row[j], -row[j] if row[j] == row[j] else 0, j)
        )
        out += sorted(b * len(row) + j for j in order[: int(counts[b])])
    return out


def _scores(B, N, g, ties=False, nans=False):
    s = torch.randn(B, N, generator=g)
    if ties:
        s = torch.round(s * 2) / 2  # few distinct values: many ties, -0.0 among them
    if nans and B * N:
        s.view(-1)[torch.randint(0, B * N, (max(1, B * N // 10),), generator=g)] = float("nan")
    return s


@pytest.mark.parametrize("ties,nans", [(False, False), (True, False), (False, True), (True, True)])
def test_cpp_and_ref_match_brute_force(ties, nans):
    g = torch.Generator().manual_seed(int(ties) * 2 + int(nans))
    for _ in range(60):
        B, N = int(torch.randint(0, 9, (1,), generator=g)), int(torch.randint(1, 80, (1,), generator=g))
        s = _scores(B, N, g, ties, nans)
        counts = torch.randint(0, N + 1, (B,), generator=g)
        counts[: B // 4] = N  # whole images, and (below) empty ones
        counts[B // 4 : B // 2] = 0
        want = _brute(s, counts)
        for impl in ("cpp", "ref"):
            got = topk_indices(s, counts, impl=impl)
            assert got.dtype == torch.int64 and got.tolist() == want, (impl, s, counts)
        assert topk_indices_ref(s, counts).tolist() == want


def test_torch_path_matches_reference_without_ties():
    """``torch.topk`` orders ties as it likes, so: distinct scores, at most one NaN per image."""
    g = torch.Generator().manual_seed(1)
    for trial in range(40):
        B, N = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 200, (1,), generator=g))
        s = torch.randn(B, N, generator=g)
        if trial % 2:
            s[torch.arange(B), torch.randint(0, N, (B,), generator=g)] = float("nan")
        counts = torch.randint(0, N + 1, (B,), generator=g)
        assert torch.equal(topk_indices(s, counts, impl="torch"), topk_indices_ref(s, counts))


def test_layout_of_a_bench_like_batch():
    """(32, 196) scores, counts around 49: ids are image-major and ascending within an image, so
    ``cu_seqlens_from_counts(counts)`` cuts the packed tokens at image boundaries."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(32, 196, generator=g)
    counts = torch.randint(34, 64, (32,), generator=g)
    idx = topk_indices(s, counts)
    cu, _ = cu_seqlens_from_counts(counts)
    assert idx.numel() == int(counts.sum())
    for b in range(32):
        ids = idx[cu[b] : cu[b + 1]]
        assert bool((ids // 196 == b).all()) and bool((ids[1:] > ids[:-1]).all())
        kept = s[b, ids % 196]
        dropped = torch.ones(196, dtype=torch.bool)
        dropped[ids % 196] = False
        assert kept.min() > s[b][dropped].max()
    x = torch.randn(32 * 196, 8, generator=g)
    assert torch.equal(pack_tokens(x, idx), x[idx])


@pytest.mark.parametrize("impl", ["cpp", "torch", "ref"])
def test_bad_inputs(impl):
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        topk_indices(s[0], torch.tensor([1]), impl=impl)
    with pytest.raises(ValueError, match=r"counts must be \(B,\)"):
        topk_indices(s, torch.tensor([1, 2, 3]), impl=impl)
    with pytest.raises(TypeError):
        topk_indices(s, torch.tensor([1.0, 2.0]), impl=impl)
    with pytest.raises(ValueError):
        topk_indices(s, torch.tensor([1, 6]), impl=impl)  # more than N
    with pytest.raises(ValueError):
        topk_indices(s, torch.tensor([-1, 2]), impl=impl)


def test_trace_runs_the_torch_path():
    """Under torch.jit.trace the C++ kernel is not called (its result would be a constant)."""
    s, counts = torch.randn(3, 10), torch.tensor([2, 0, 5])
    traced = torch.jit.trace(lambda x: topk_indices(x, counts), (s,), check_trace=False)
    assert "topk" in str(traced.graph)
    s2 = torch.randn(3, 10)
    assert torch.equal(traced(s2), topk_indices_ref(s2, counts))
