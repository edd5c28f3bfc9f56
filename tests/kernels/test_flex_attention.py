"""kernels/flex_attention.py: FlexAttention over packed tokens against the float64 reference
(``varlen_attention_ref``), with and without Swin's position bias and shift mask.

On CPU: the eager forward on ragged packs (empty and length-1 sequences, rows of no sequence),
containers, odd head dims and shifted regions; the ``mask_mod`` and ``score_mod`` that the GPU kernel
runs and differentiates, evaluated densely on broadcast index tensors and differentiated by autograd
(outputs and gradients of q, k, v and the bias table against the reference's); the block mask against
``create_block_mask``; ``masked_fraction`` against a count over the dense mask. On CUDA (skipped
without one): the compiled forward and backward against the reference.

Error bound (flash-attention's): ``|out - out_ref| <= 2 * |out_pt - out_ref| + floor`` (max over
elements), ``out_ref`` the reference in float64, ``out_pt`` the reference in the test dtype.
"""

import contextlib
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from kernels import container_seqlens, cu_seqlens_from_counts
from kernels.flex_attention import (
    BLOCK_SIZE,
    _block_mask,
    _block_masks,
    _mods,
    flex_varlen_attention,
    masked_fraction,
)
from kernels.position_bias import PositionBias
from kernels.seqlens import sequence_ids
from kernels.varlen_attention import varlen_attention_ref

FLOOR = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="the compiled FlexAttention path runs on CUDA only")

# named layouts: (counts per image, container length or None for one sequence per image, rows of no
# sequence after the last one)
LAYOUTS = {
    "ragged": ([5, 0, 1, 37, 16, 3, 0], None, 3),
    "single1": ([1], None, 0),
    "containers": ([49, 0, 20, 71, 3], 49, 0),
    "containers_tail": ([30, 44, 1], 49, 2),
}


def _cu(counts, container_len, extra):
    counts = torch.tensor(counts, dtype=torch.int64)
    if container_len is None:
        cu = cu_seqlens_from_counts(counts)[0]
    else:
        cu = container_seqlens(counts, container_len)[0]
    return cu.to(torch.int32), int(cu[-1]) + extra


def _bias(T, H, window, shifted, dtype, seed, device="cpu"):
    """Places on a grid twice the window wide (so offsets inside and beyond one window), regions
    0..3 when shifted (Swin's shifted blocks have up to 9), a random table."""
    g = torch.Generator().manual_seed(seed + 1)
    side = 2 * window
    rows = torch.randint(0, side, (T,), generator=g)
    cols = torch.randint(0, side, (T,), generator=g)
    region = torch.randint(0, 4, (T,), generator=g) if shifted else torch.zeros(T, dtype=torch.int64)
    pos = torch.stack([rows, cols, region], 1).to(torch.int32)
    table = torch.randn((2 * window - 1) ** 2, H, generator=g, dtype=torch.float64)
    return PositionBias(pos.to(device), table.to(device=device, dtype=dtype), window)


def _qkv(T, H, D, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(T, H, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
        for _ in range(4)
    ]


def _as(bias, dtype):
    return None if bias is None else bias._replace(table=bias.table.to(dtype))


def _err(got, ref) -> float:
    return (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0


def _check_bound(name, got, ref64, pt, dtype):
    err, err_pt = _err(got, ref64), _err(pt, ref64)
    assert err <= 2 * err_pt + FLOOR[dtype], (
        f"{name}: error {err:.3g} > 2 x torch's {err_pt:.3g} + {FLOOR[dtype]}"
    )


# ----------------------------------------------------------------------------------------------------
# forward on CPU (eager FlexAttention)


def _check_forward(cu, T, H, D, dtype, bias_kind, window=7, seed=0, scale=None):
    q, k, v, _ = _qkv(T, H, D, torch.float64, seed)
    bias = None if bias_kind == "none" else _bias(T, H, window, bias_kind == "shifted", torch.float64, seed)
    ref = varlen_attention_ref(q, k, v, cu, scale, bias=bias)
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    out = flex_varlen_attention(qd, kd, vd, cu, scale, bias=_as(bias, dtype))
    assert out.shape == q.shape and out.dtype == dtype
    end = int(cu[-1])
    assert bool((out[end:] == 0).all()), "rows of no sequence must be zero"
    pt = varlen_attention_ref(qd, kd, vd, cu, scale, bias=_as(bias, dtype))
    _check_bound("out", out, ref, pt, dtype)


@pytest.mark.parametrize("bias_kind", ["none", "swin", "shifted"])
@pytest.mark.parametrize("layout", ["ragged", "containers_tail"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_matches_reference(layout, dtype, bias_kind):
    cu, T = _cu(*LAYOUTS[layout])
    _check_forward(cu, T, 3, 24, dtype, bias_kind)


@settings(derandomize=True, max_examples=10, deadline=None)
@given(
    counts=st.lists(st.integers(0, 60), min_size=0, max_size=6),
    container_len=st.sampled_from([None, 7, 49]),
    extra=st.integers(0, 4),
    D=st.sampled_from([7, 24, 40]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    bias_kind=st.sampled_from(["none", "swin", "shifted"]),
    window=st.sampled_from([1, 7]),
    scale=st.sampled_from([None, 0.3]),
)
def test_forward_matches_reference_on_random_layouts(
    counts, container_len, extra, D, dtype, bias_kind, window, scale
):
    cu, T = _cu(counts, container_len, extra)
    _check_forward(cu, T, 3, D, dtype, bias_kind, window=window, scale=scale)


def test_containers_at_spa_sizes():
    # 8 images of 196 tokens at ratio 0.5 in containers of 49, shifted window 7
    counts = [98] * 8
    cu, T = _cu(counts, 49, 0)
    _check_forward(cu, T, 3, 24, torch.float32, "shifted")


def test_cpu_refuses_gradients_and_names_the_cpu_paths():
    cu, T = _cu([5, 3], None, 0)
    q, k, v, _ = _qkv(T, 3, 24, torch.float32, 0)
    bias = _bias(T, 3, 7, True, torch.float32, 0)
    for needs in ("q", "table"):
        qq = q.clone().requires_grad_(needs == "q")
        b = bias._replace(table=bias.table.clone().requires_grad_(needs == "table"))
        with pytest.raises(RuntimeError, match="varlen_attention"):
            flex_varlen_attention(qq, k, v, cu, bias=b)
        with torch.no_grad():  # nothing to differentiate: runs
            out = flex_varlen_attention(qq, k, v, cu, bias=b)
        assert not out.requires_grad


def test_empty_pack_and_bad_inputs():
    q = torch.zeros(0, 2, 8)
    assert flex_varlen_attention(q, q, q, torch.zeros(1, dtype=torch.int32)).shape == (0, 2, 8)
    q = torch.zeros(4, 2, 8)
    with pytest.raises(ValueError, match="block_size"):
        flex_varlen_attention(q, q, q, torch.tensor([0, 4]), block_size=24)
    with pytest.raises(ValueError, match="position bias"):
        flex_varlen_attention(
            q, q, q, torch.tensor([0, 4]), bias=PositionBias(torch.zeros(4, 3), torch.zeros(9, 2), 2)
        )


# ----------------------------------------------------------------------------------------------------
# the mods, materialised densely: what the GPU kernel computes and differentiates


def _dense_flex(q, k, v, cu, scale, bias):
    """FlexAttention's math with this module's mods evaluated on broadcast index tensors: scores,
    ``score_mod``, ``mask_mod``, softmax (rows with nothing allowed give zero), PV. (T, H, D)."""
    T, H, D = q.shape
    mask_mod, score_mod = _mods(sequence_ids(cu, T), bias, q.dtype)
    b = torch.zeros((), dtype=torch.int64)
    h = torch.arange(H)[:, None, None]
    qi, ki = torch.arange(T)[None, :, None], torch.arange(T)[None, None, :]
    s = torch.einsum("qhd,khd->hqk", q, k) * (scale if scale is not None else D**-0.5)  # (H, T, T)
    if score_mod is not None:
        s = score_mod(s, b, h, qi, ki)
    allowed = mask_mod(b, h, qi, ki).expand(H, T, T)
    s = s.masked_fill(~allowed, float("-inf"))
    s = torch.where(allowed.any(-1, keepdim=True), s, 0.0)  # finite rows, zeroed below
    p = torch.softmax(s, dim=-1) * allowed
    return torch.einsum("hqk,khd->qhd", p, v)


def _grads(fn, q, k, v, do, bias):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    b = None if bias is None else bias._replace(table=bias.table.detach().clone().requires_grad_(True))
    out = fn(*leaves, b)
    wrt = leaves + ([] if b is None else [b.table])
    return out.detach(), torch.autograd.grad(out, wrt, do)


@pytest.mark.parametrize("bias_kind", ["none", "swin", "shifted"])
@pytest.mark.parametrize("layout", ["ragged", "containers_tail"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_mods_dense_forward_and_gradients_match_reference(layout, dtype, bias_kind):
    cu, T = _cu(*LAYOUTS[layout])
    H, D, window = 2, 7, 3
    q, k, v, do = _qkv(T, H, D, torch.float64, 1)
    bias = None if bias_kind == "none" else _bias(T, H, window, bias_kind == "shifted", torch.float64, 1)

    def ref(q_, k_, v_, b_):
        return varlen_attention_ref(q_, k_, v_, cu, None, bias=b_)

    def dense(q_, k_, v_, b_):
        return _dense_flex(q_, k_, v_, cu, None, b_)

    out64, g64 = _grads(ref, q, k, v, do, bias)
    cast = [t.to(dtype) for t in (q, k, v, do)]
    out, g = _grads(dense, *cast[:3], cast[3], _as(bias, dtype))
    out_pt, g_pt = _grads(ref, *cast[:3], cast[3], _as(bias, dtype))
    _check_bound("out", out, out64, out_pt, dtype)
    for name, a, r, p in zip(["dq", "dk", "dv", "dtable"], g, g64, g_pt):
        _check_bound(name, a, r, p, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_flexattention_own_backward_of_the_table_matches_reference(dtype):
    # FlexAttention derives the table's gradient from score_mod (a scatter-add per read, what the GPU
    # kernel accumulates); its CPU path runs that derivation when only a captured tensor needs a
    # gradient, so the mechanism the GPU backward relies on is checked here through torch's own code
    cu, T = _cu(*LAYOUTS["containers_tail"])
    H, D = 3, 24
    q, k, v, do = _qkv(T, H, D, torch.float64, 4)
    bias = _bias(T, H, 7, True, torch.float64, 4)

    def ref(q_, k_, v_, b_):
        return varlen_attention_ref(q_, k_, v_, cu, None, bias=b_)

    def flex(q_, k_, v_, b_):
        seq = sequence_ids(cu, T)
        mask_mod, score_mod = _mods(seq, b_, dtype)
        block_mask = _block_mask(seq, b_.pos[:, 2], BLOCK_SIZE, mask_mod)
        q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q_, k_, v_))  # (1, H, T, D)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the eager path's performance warning
            return flex_attention(q4, k4, v4, score_mod=score_mod, block_mask=block_mask)[0].transpose(0, 1)

    def table_grad(fn, q_, k_, v_, do_, b_):
        table = b_.table.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(q_, k_, v_, b_._replace(table=table)), table, do_)
        return g

    g64 = table_grad(ref, q, k, v, do, bias)
    cast = [t.to(dtype) for t in (q, k, v, do)]
    g = table_grad(flex, *cast, _as(bias, dtype))
    g_pt = table_grad(ref, *cast, _as(bias, dtype))
    _check_bound("dtable", g, g64, g_pt, dtype)


# ----------------------------------------------------------------------------------------------------
# block mask and masked fraction


def _dense_tiles(cu, T, block_size, region=None):
    """(nonempty, full) tiles counted over the dense (T, T) mask padded to whole tiles."""
    seq = sequence_ids(cu, T)
    allowed = (seq[:, None] == seq[None, :]) & (seq[:, None] >= 0)
    if region is not None:
        allowed &= region[:, None] == region[None, :]
    nb = -(-T // block_size)
    padded = torch.zeros(nb * block_size, nb * block_size, dtype=torch.bool)
    padded[:T, :T] = allowed
    tiles = padded.view(nb, block_size, nb, block_size).transpose(1, 2)  # (nb, nb, B, B)
    return tiles.any(-1).any(-1), tiles.all(-1).all(-1)


@settings(derandomize=True, max_examples=20, deadline=None)
@given(
    counts=st.lists(st.integers(0, 90), min_size=1, max_size=8),
    container_len=st.sampled_from([None, 16, 49]),
    extra=st.integers(0, 40),
    block_size=st.sampled_from([16, 32, 64]),
    shifted=st.booleans(),
)
def test_block_masks_match_the_dense_mask(counts, container_len, extra, block_size, shifted):
    cu, T = _cu(counts, container_len, extra)
    if T == 0:
        return
    region = torch.randint(0, 2, (T,), generator=torch.Generator().manual_seed(T)) if shifted else None
    nonempty, full = _block_masks(sequence_ids(cu, T), region, block_size)
    any_true, all_true = _dense_tiles(cu, T, block_size, region)
    assert torch.equal(full, all_true)
    if region is None:
        assert torch.equal(nonempty, any_true)
    else:  # tiles whose pairs are all of different regions may be kept (partial, masked by mask_mod)
        assert bool((nonempty >= any_true).all())
        assert torch.equal(nonempty, _dense_tiles(cu, T, block_size)[0])


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_block_mask_equals_create_block_mask(layout):
    cu, T = _cu(*LAYOUTS[layout])
    seq = sequence_ids(cu, T)
    mask_mod, _ = _mods(seq, None, torch.float32)
    ours = _block_mask(seq, None, BLOCK_SIZE, mask_mod)
    theirs = create_block_mask(mask_mod, 1, 1, T, T, device="cpu", BLOCK_SIZE=BLOCK_SIZE)
    assert ours.shape == theirs.shape
    assert torch.equal(ours.to_dense(), theirs.to_dense())

    def full(bm):
        return BlockMask.from_kv_blocks(
            bm.full_kv_num_blocks, bm.full_kv_indices, BLOCK_SIZE=BLOCK_SIZE
        ).to_dense()

    assert torch.equal(full(ours), full(theirs))


def test_masked_fraction_by_hand():
    assert masked_fraction(torch.tensor([0, 32]), 32) == 0.0  # one sequence filling one tile
    assert masked_fraction(torch.tensor([0, 16, 32]), 32) == 0.5  # two of 16 in one tile: 2 x 256 of 1024
    # 3 rows in a tile of 16: 9 of 256 kept; trailing rows of no sequence add no tile
    assert masked_fraction(torch.tensor([0, 3]), 16, T=40) == pytest.approx(1 - 9 / 256)
    assert masked_fraction(torch.tensor([0, 0])) == 0.0


@settings(derandomize=True, max_examples=20, deadline=None)
@given(
    counts=st.lists(st.integers(0, 120), min_size=1, max_size=8),
    container_len=st.sampled_from([None, 49]),
    block_size=st.sampled_from([16, 32, 64, 128]),
)
def test_masked_fraction_counts_the_dense_mask(counts, container_len, block_size):
    cu, T = _cu(counts, container_len, 0)
    if T == 0:
        return
    any_true, _ = _dense_tiles(cu, T, block_size)
    kept = int((sequence_ids(cu, T)[:, None] == sequence_ids(cu, T)[None, :]).sum())
    expected = 1 - kept / (int(any_true.sum()) * block_size**2)
    assert masked_fraction(cu, block_size) == pytest.approx(expected)


@pytest.mark.parametrize(
    "ratio, container_len, fractions",
    [
        (0.25, 49, (0.38, 0.58, 0.74, 0.87)),
        (0.5, 49, (0.38, 0.58, 0.74, 0.87)),
        (0.5, None, (0.22, 0.38, 0.58, 0.74)),
    ],
)
def test_masked_fraction_figures_in_the_docstring(ratio, container_len, fractions):
    cu, _ = _cu([int(196 * ratio)] * 32, container_len, 0)
    got = tuple(round(masked_fraction(cu, b), 2) for b in (16, 32, 64, 128))
    assert got == fractions


# ----------------------------------------------------------------------------------------------------
# CUDA: the compiled kernel, forward and backward


@needs_cuda
@pytest.mark.parametrize("bias_kind", ["none", "shifted"])
@pytest.mark.parametrize("D", [7, 40])  # 7: zero-padded to 16 on CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["ragged", "containers_tail"])
def test_cuda_forward_backward_match_reference(layout, dtype, D, bias_kind):
    cu, T = _cu(*LAYOUTS[layout])
    H, window = 3, 7
    q, k, v, do = _qkv(T, H, D, torch.float64, 2, device="cuda")
    cu = cu.cuda()
    bias = None if bias_kind == "none" else _bias(T, H, window, True, torch.float64, 2, device="cuda")

    def ref(q_, k_, v_, b_):
        return varlen_attention_ref(q_, k_, v_, cu, None, bias=b_)

    def flex(q_, k_, v_, b_):
        return flex_varlen_attention(q_, k_, v_, cu, None, bias=b_)

    out64, g64 = _grads(ref, q, k, v, do, bias)
    cast = [t.to(dtype) for t in (q, k, v, do)]
    b_cast = _as(bias, dtype)
    out, g = _grads(flex, *cast[:3], cast[3], b_cast)
    assert out.dtype == dtype and bool((out[int(cu[-1]) :] == 0).all())
    out_pt, g_pt = _grads(ref, *cast[:3], cast[3], b_cast)
    _check_bound("out", out, out64, out_pt, dtype)
    for name, a, r, p in zip(["dq", "dk", "dv", "dtable"], g, g64, g_pt):
        _check_bound(name, a, r, p, dtype)


@needs_cuda
def test_cuda_token_counts_change_from_call_to_call():
    # SPA keeps a different number of tokens every step: the cached compiled function must serve them
    for counts in ([49, 20, 3], [98, 0, 40, 1], [5], [196, 196]):
        cu, T = _cu(counts, 49, 1)
        q, k, v, _ = _qkv(T, 2, 32, torch.float32, 3, device="cuda")
        bias = _bias(T, 2, 7, True, torch.float32, 3, device="cuda")
        out = flex_varlen_attention(q, k, v, cu.cuda(), bias=bias)
        ref = varlen_attention_ref(*(t.double() for t in (q, k, v)), cu.cuda(), bias=_as(bias, torch.float64))
        pt = varlen_attention_ref(q, k, v, cu.cuda(), bias=bias)
        _check_bound("out", out, ref, pt, torch.float32)


# ----------------------------------------------------------------------------------------------------
# the compiled path on CPU (the ``compiled_on_cpu`` fixture): its forward runs there with a counting
# backend (Inductor's kernel needs a GPU), which shows what Dynamo compiles as the kept token counts
# change from step to step


def _step(counts, container_len, seed, H=2, D=32, bias_kind="shifted"):
    cu, T = _cu(counts, container_len, 0)
    q, k, v, _ = _qkv(T, H, D, torch.float32, seed)
    bias = None if bias_kind == "none" else _bias(T, H, 7, bias_kind == "shifted", torch.float32, seed)
    with torch.no_grad():
        out = flex_varlen_attention(q, k, v, cu, bias=bias)
    ref = varlen_attention_ref(*(t.double() for t in (q, k, v)), cu, bias=_as(bias, torch.float64))
    _check_bound("out", out, ref, varlen_attention_ref(q, k, v, cu, bias=bias), torch.float32)


def test_compiled_forward_compiles_once_for_changing_token_counts(compiled_on_cpu):
    # twelve steps of an SPA block: other images, other kept counts, other layouts and tables, every
    # pack at least two tiles long: one graph (dynamic from the first call: with automatic dynamic
    # shapes the second step would compile a second one)
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        counts = torch.randint(0, 120, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        counts[0] = max(counts[0], 40)
        _step(counts, 49 if step % 2 else None, step)
    assert compiled_on_cpu.graphs == 1


def test_compiled_forward_specialises_only_tiny_packs(compiled_on_cpu):
    # a pack of one tile and a pack of one token are specialised (Dynamo's size 0/1 rule on the
    # block mask and the token count); nothing else compiles again
    for counts in ([70, 3], [20, 5], [1], [90, 40], [9], [1], [300], [2, 7]):
        _step(counts, 49, sum(counts))
    assert compiled_on_cpu.graphs <= 3


def test_compiled_call_uses_kernel_blocks(monkeypatch):
    # the compiled call takes the block size and the kernel options from kernel_blocks, the one place
    import kernels.flex_attention as flex

    seen = {}

    def fake_run(q4, k4, v4, score_mod, block_mask, scale, kernel_options):
        seen.update(block=block_mask.BLOCK_SIZE, options=kernel_options)
        return torch.zeros_like(q4)

    monkeypatch.setattr(flex, "_compiled_here", lambda q: True)
    monkeypatch.setattr(flex, "_run_compiled", fake_run)
    monkeypatch.setattr(
        flex, "kernel_blocks", lambda d, dt, dev: (64, {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 32})
    )
    cu, T = _cu([70, 3], 49, 0)
    q, k, v, _ = _qkv(T, 2, 32, torch.float32, 0)
    flex_varlen_attention(q, k, v, cu)
    assert seen == {"block": (64, 64), "options": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 32}}


@pytest.mark.parametrize("bias_kind", ["none", "shifted"])
@pytest.mark.parametrize("layout", ["ragged", "containers"])
def test_layout_and_block_mask_read_nothing_back(layout, bias_kind, monkeypatch):
    # the sequence ids, mods and block mask are built on the device: no host sync on a GPU (counted
    # with tests/_syncs.py; the kernel itself runs outside the count)
    import kernels.flex_attention as flex
    from tests._syncs import count_host_syncs

    eager = flex._eager_flex_attention
    cu, T = _cu(*LAYOUTS[layout])
    q, k, v, _ = _qkv(T, 2, 16, torch.float32, 0)
    bias = None if bias_kind == "none" else _bias(T, 2, 7, True, torch.float32, 0)
    with count_host_syncs() as syncs:

        def kernel_outside(*args, **kwargs):
            with syncs.outside():
                return eager(*args, **kwargs)

        monkeypatch.setattr(flex, "_eager_flex_attention", kernel_outside)
        flex_varlen_attention(q, k, v, cu, bias=bias)
    assert len(syncs) == 0, syncs.seen


@pytest.mark.parametrize("autocast", [False, True])
def test_tiles_are_chosen_for_the_dtype_the_kernel_runs_in(autocast, monkeypatch):
    # under autocast FlexAttention casts q, k, v to the autocast dtype before its kernel: the tiles
    # must be chosen for that dtype, not for q's (float32 here)
    import kernels.flex_attention as flex

    seen = []
    monkeypatch.setattr(flex, "_compiled_here", lambda q: True)
    monkeypatch.setattr(flex, "_run_compiled", lambda q4, *a, **kw: torch.zeros_like(q4))
    monkeypatch.setattr(flex, "kernel_blocks", lambda d, dt, dev: seen.append(dt) or (32, {}))
    cu, T = _cu([70, 3], 49, 0)
    q, k, v, _ = _qkv(T, 2, 32, torch.float32, 0)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with amp:
        flex_varlen_attention(q, k, v, cu)
    assert seen == [torch.bfloat16 if autocast else torch.float32]
