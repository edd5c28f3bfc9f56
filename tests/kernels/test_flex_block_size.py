"""kernels/flex_attention.py's kernel tiles: Inductor's CUDA forward and backward configs (sm80, sm90;
asked from its heuristic with the device capability faked, no GPU needed) serve the block size
``kernel_blocks`` chooses for every head dim the backbone presets give, in every dtype; the former fixed
block size of 32 had no backward config at Swin-T's head dim; ``choose_blocks`` refuses configs that
fit no size."""

from unittest import mock

import pytest
import torch

from kernels.flex_attention import choose_blocks, kernel_blocks


def _project_head_dims() -> list[int]:
    """Every head dim the backbone presets give a stage (any stage may hold SPA blocks), as the CUDA
    kernel sees it (zero-padded to 16)."""
    from spa_core.config import BACKBONE_PRESETS

    dims = set()
    for preset in BACKBONE_PRESETS.values():
        for i, heads in enumerate(preset["num_heads"]):
            dims.add(max(16, preset["embed_dim"] * 2**i // heads))
    return sorted(dims)


def _inductor_configs(head_dim, dtype, capability):
    """Inductor's CUDA forward and backward configs for this head dim and dtype on a GPU of this
    compute capability, asked from its heuristic with the capability faked (no GPU needed)."""
    from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic

    with mock.patch("torch.cuda.get_device_capability", return_value=capability):
        h = CUDAConfigHeuristic()
        return h.get_flex_attn_fwd_configs(head_dim, dtype), h.get_flex_attn_bwd_configs(head_dim, dtype)


# torch's own rules, written out here from torch/_inductor/kernel/flex/flex_attention.py (torch 2.13),
# independently of the module's copy: the forward lowering applies the kernel options (``fwd_`` keys
# without the prefix) over each config's tiles, then skips the config unless SPARSE_Q_BLOCK_SIZE %
# BLOCK_M == 0 and SPARSE_KV_BLOCK_SIZE % BLOCK_N == 0; the backward lowering skips a config unless
# SPARSE_KV % block_n1, SPARSE_Q % block_m1, SPARSE_KV % block_n2 and SPARSE_Q % block_m2 are all
# zero, reading the config's tiles before any option applies. No usable config: no kernel.
def _usable_fwd(configs, block_size, options):
    m = options.get("fwd_BLOCK_M")
    n = options.get("fwd_BLOCK_N")
    return [c for c in configs if block_size % (m or c.block_m) == 0 and block_size % (n or c.block_n) == 0]


def _usable_bwd(configs, block_size):
    q_block = kv_block = block_size
    return [
        c
        for c in configs
        if kv_block % c.block_n1 == 0
        and q_block % c.block_m1 == 0
        and kv_block % c.block_n2 == 0
        and q_block % c.block_m2 == 0
    ]


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)], ids=["sm80", "sm90"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", _project_head_dims())
def test_inductor_has_forward_and_backward_configs_for_the_chosen_block_size(head_dim, dtype, capability):
    fwd, bwd = _inductor_configs(head_dim, dtype, capability)
    with mock.patch("torch.cuda.get_device_capability", return_value=capability):
        block_size, options = kernel_blocks(head_dim, dtype, torch.device("cuda"))
    assert _usable_fwd(fwd, block_size, options), (block_size, options, fwd)
    assert _usable_bwd(bwd, block_size), (block_size, bwd)
    # the forward's tiles, overridden or not, never grow past the heuristic's (shared memory)
    assert all(options.get(f"fwd_BLOCK_{x}", 0) <= max(c.block_m for c in fwd) for x in "MN")
    # and no smaller block size of those tried would have served the backward
    assert all(not _usable_bwd(bwd, b) for b in (32, 64, 128) if b < block_size)


def test_project_head_dims_cover_the_presets():
    # swin_t and tiny: 32 in every stage; micro: 16, 32, 64 (a check that the enumeration reads them)
    assert _project_head_dims() == [16, 32, 64]


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)], ids=["sm80", "sm90"])
def test_a_block_size_of_32_has_no_backward_config_for_bfloat16_head_dim_32(capability):
    # the defect this choice removes: the former fixed block size of 32 left Swin-T's backward (head
    # dim 32, bfloat16) without a kernel on A100 and H100 (NoValidChoicesError at its first step)
    fwd, bwd = _inductor_configs(32, torch.bfloat16, capability)
    assert _usable_bwd(bwd, 32) == []
    with mock.patch("torch.cuda.get_device_capability", return_value=capability):
        assert kernel_blocks(32, torch.bfloat16, torch.device("cuda"))[0] > 32


def test_max_autotune_brings_the_block_size_down_to_32():
    from torch._inductor import config as inductor_config

    with inductor_config.patch(max_autotune=True):
        fwd, bwd = _inductor_configs(32, torch.bfloat16, (8, 0))
        with mock.patch("torch.cuda.get_device_capability", return_value=(8, 0)):
            block_size, options = kernel_blocks(32, torch.bfloat16, torch.device("cuda"))
    assert block_size == 32 and _usable_bwd(bwd, 32) and _usable_fwd(fwd, 32, options)


def test_choose_blocks_refuses_configs_that_fit_no_size():
    from torch._inductor.template_heuristics.triton import FlexBwDConfig, FlexConfig

    with pytest.raises(RuntimeError, match="backward config"):
        choose_blocks([FlexConfig(64, 64, 3, 4)], [FlexBwDConfig(256, 256, 256, 256, 1, 4)])
    # a forward config that does not fit gets its tiles cut to the gcd with the block size
    assert choose_blocks([FlexConfig(128, 64, 3, 4)], [FlexBwDConfig(16, 32, 32, 16, 1, 4)]) == (
        32,
        {"fwd_BLOCK_M": 32, "fwd_BLOCK_N": 32},
    )
