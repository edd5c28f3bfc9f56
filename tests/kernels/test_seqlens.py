"""kernels/seqlens.py: one sequence per image, and the paper's containers as varlen sequences."""

import pytest
import torch

from kernels import container_seqlens, cu_seqlens_from_counts


def _containers_brute(counts, L):
    """Walk the packed stream token by token; a new sequence starts at every image change and every
    multiple of L (DESIGN.md, "Equivalence")."""
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


@pytest.mark.parametrize(
    "counts",
    [[3, 0, 5, 1], [0, 0], [], [196], [7], [0, 49, 0, 50, 1, 48, 0], [13, 29, 0, 1, 1, 1, 60, 2]],
)
def test_cu_seqlens_from_counts(counts):
    cu, m = cu_seqlens_from_counts(torch.tensor(counts, dtype=torch.int64))
    assert cu.dtype == torch.int32 and cu.shape == (len(counts) + 1,)
    expect = [0]
    for n in counts:
        expect.append(expect[-1] + n)
    assert cu.tolist() == expect
    assert m == (max(counts) if counts else 0)


@pytest.mark.parametrize("L", [1, 4, 7, 49])
@pytest.mark.parametrize(
    "counts", [[3, 0, 5, 1], [0, 0], [], [196], [0, 49, 0, 50, 1, 48, 0], [13, 29, 0, 1, 1, 1, 60, 2]]
)
def test_container_seqlens_matches_brute_force(counts, L):
    cu, m, seq_image, seq_container = container_seqlens(torch.tensor(counts, dtype=torch.int64), L)
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


def test_bad_inputs():
    with pytest.raises(ValueError):
        cu_seqlens_from_counts(torch.tensor([1, -1]))
    with pytest.raises(TypeError):
        cu_seqlens_from_counts(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError):
        container_seqlens(torch.tensor([1, 2]), 0)
