"""The CUDA path of a trial, for a machine with a GPU (``pytest -m gpu``; ``scripts/gpu_smoke.sh`` runs
these first): the detector trains in bf16 through FlexAttention, its FLOP count on the GPU is the
CPU's, and the DeepSpeed engine runs in the precision the row reports. Skipped where torch sees no
CUDA device; the last test, which checks the smoke grid itself, runs everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.config import trial_from_dict

ROOT = Path(__file__).resolve().parents[3]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cfg(cache, pack="containers", **train):
    return trial_from_dict(
        {
            "preset": "tiny",  # head dim 32: Swin-T's
            "model": {
                "spa_stages": [3, 4],
                "spa": {"selection": "gate", "pack": pack, "attn_impl": "triton"},
            },
            "train": {"steps": 1, "batch_size": 4, "warmup_steps": 1, "precision": "bf16", **train},
            "data": {"num_train": 8, "num_val": 4, "image_size": 128, "cache_dir": str(cache)},
            "bench": {"batch_size": 4},
        }
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cuda-cache")


def _batch(cfg, device):
    from harness.task.data import build_datasets, fixed_batch
    from harness.task.train import to_device

    train, val = build_datasets(cfg.data, progress=False)
    images, targets = fixed_batch(train, cfg.train.batch_size)
    return images.to(device), to_device(targets, device), fixed_batch(val, cfg.bench.batch_size)[0]


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("pack", ["containers", "varlen"])
def test_a_detector_trains_in_bf16_through_flexattention(cache, monkeypatch, pack):
    import kernels.flex_attention as flex
    from harness.task.detector import build_detector

    calls = []
    real = flex.flex_varlen_attention
    monkeypatch.setattr(
        flex, "flex_varlen_attention", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k)
    )
    cfg = _cfg(cache, pack)
    device = torch.device("cuda")
    model = build_detector(cfg).to(device).train()
    images, targets, _ = _batch(cfg, device)
    for _ in range(2):  # the second step runs what the first compiled
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(images, targets)
        out["loss"].backward()
    assert calls and set(calls) == {torch.bfloat16}  # FlexAttention ran, in bf16
    assert torch.isfinite(out["loss"]).item()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing or all(n.startswith("backbone.norms.0") for n in missing), missing
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all().item() for g in grads)
    tables = [p.grad for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")]
    assert tables and any(t.abs().sum().item() > 0 for t in tables)


@pytest.mark.gpu
@cuda
def test_the_flop_count_on_the_gpu_is_the_cpus(cache):
    """fvcore traces the model; on CUDA the attention runs compiled FlexAttention, which a trace
    cannot enter: the count must take the torch path and give the CPU's numbers."""
    from harness.task.detector import build_detector
    from harness.task.measure import fvcore_macs

    cfg = _cfg(cache)
    _, _, bench = _batch(cfg, torch.device("cpu"))
    model = build_detector(cfg).eval()
    on_cpu = fvcore_macs(model, bench)
    on_gpu = fvcore_macs(model.cuda(), bench.cuda())
    for key in ("total", "backbone", "attn"):
        assert on_gpu[key] == pytest.approx(on_cpu[key], rel=1e-6), key


@pytest.mark.gpu
@cuda
@pytest.mark.filterwarnings("ignore")
def test_the_engine_runs_bf16_on_the_gpu_and_says_so(cache):
    import torch.distributed as dist

    from harness.task.distributed import DeepSpeedBackend, init_process_group, prepare_accelerator
    from harness.task.probe import probe
    from harness.task.train import train_variant

    device = prepare_accelerator()
    made = init_process_group(device)  # one rank over NCCL, as a one-worker trial
    try:
        cfg = _cfg(cache, steps=2)
        assert probe(cfg, device)["probe_s"] > 0
        backend = DeepSpeedBackend(device)
        metrics = train_variant(cfg, backend=backend, progress=False)
        assert backend.precision == "bf16" and metrics["steps"] == 2
        assert next(backend.model.parameters()).device.type == "cuda"
    finally:
        if made:
            dist.destroy_process_group()


def test_the_gpu_smoke_grid_is_what_the_script_checks():
    """scripts/gpu_smoke.sh checks every row of this grid for CUDA, bf16, FLOPs, timings and a
    checkpoint: each trial must ask for them."""
    from harness.grid import load_grid

    trials = load_grid(ROOT / "ablations" / "grids" / "gpu_smoke.yaml").trials
    assert [t.name for t in trials] == ["dense", "spa-containers", "spa-varlen"]
    for t in trials:
        assert t.resources.workers == 2 and t.resources.gpus_per_worker == 1
        assert t.train.precision == "bf16" and 0 < t.train.checkpoint_every < t.train.steps
        m = t.model
        assert all(m.embed_dim * 2**i // h == 32 for i, h in enumerate(m.num_heads))  # Swin-T's head dim
        assert m.is_dense or m.spa.attn_impl == "triton"  # FlexAttention, or an error: no fallback
