"""DeepSpeed config builder and DeepSpeedBackend on a one-process gloo group (CPU)."""

import os

import pytest
import torch

from harness.config import trial_from_dict
from harness.task.distributed import comm_backend, deepspeed_config, resolve_precision


def _cfg(**train):
    return trial_from_dict({"preset": "micro", "train": train})


def test_batch_sizes_accumulation_clipping_and_zero_stage():
    cfg = _cfg(batch_size=6, grad_accum=3, grad_clip=0.5, zero_stage=2)
    ds = deepspeed_config(cfg, "cpu", world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 6
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 6 * 3 * 4  # DeepSpeed checks micro * accumulation * world
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2, "memory_efficient_linear": False}


@pytest.mark.parametrize("stage", [-1, 4])
def test_unknown_zero_stage_is_refused(stage):
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(_cfg(zero_stage=stage), "cpu")


def test_precision_on_cpu_never_fp16():
    assert resolve_precision("auto", "cpu") == "fp32"  # bf16 autocast is slow on most CPUs
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="fp16.*CPU"):
        deepspeed_config(_cfg(precision="fp16"), "cpu")
    fp32 = deepspeed_config(_cfg(precision="auto"), "cpu")
    assert "fp16" not in fp32 and "bf16" not in fp32 and "torch_autocast" not in fp32
    bf16 = deepspeed_config(_cfg(precision="bf16"), "cpu")
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "fp16" not in bf16


def test_precision_and_backend_on_cuda_are_chosen_by_the_code(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", "cuda") == "fp32"
    assert deepspeed_config(_cfg(precision="fp16"), "cuda")["fp16"]["enabled"] is True
    assert comm_backend("cuda") == "nccl" and comm_backend("cpu") == "gloo"


@pytest.mark.filterwarnings("ignore")
def test_backend_trains_with_accumulation_and_the_task_schedule(one_process_group):
    from harness.task.backend import TrainBackend
    from harness.task.distributed import DeepSpeedBackend

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    cfg = _cfg(steps=3, grad_accum=2, batch_size=2, lr=0.05, warmup_steps=1)
    backend = DeepSpeedBackend()
    assert isinstance(backend, TrainBackend) and backend.is_main and backend.world_size == 1
    engine = backend.setup(model, cfg)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    before = [p.detach().clone() for p in model.parameters()]
    losses = []
    for step in range(6):  # 6 micro-batches = 3 optimizer steps
        with backend.autocast():
            loss = torch.nn.functional.mse_loss(engine(x), y)
        backend.backward(loss)
        backend.step()
        losses.append(float(loss))
        if step == 0:  # no optimizer step before the accumulation boundary
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert engine.global_steps == 3
    assert losses[-1] < losses[0]
    assert backend.all_reduce_mean(2.0) == 2.0
    assert backend.sampler(list(range(10)), shuffle=False, seed=0) is None
    assert backend.setup_s > 0


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("stage,precision", [(1, "bf16"), (2, "fp32"), (3, "bf16")])
def test_zero_stages_train_on_cpu(one_process_group, stage, precision):
    from harness.task.distributed import DeepSpeedBackend

    torch.manual_seed(0)
    linear = torch.nn.functional.linear
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    backend = DeepSpeedBackend()
    engine = backend.setup(
        model, _cfg(steps=4, batch_size=8, lr=0.05, warmup_steps=1, zero_stage=stage, precision=precision)
    )
    assert engine.zero_optimization_stage() == stage
    # ZeRO-3 must not patch F.linear for the whole process (it would hide Linears from fvcore)
    assert torch.nn.functional.linear is linear
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(engine(x).float(), y)
        backend.backward(loss)
        backend.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    with backend.gathered_parameters():  # ZeRO-3 partitions parameters; gathered they are whole
        assert sum(p.numel() for p in model.parameters()) == 4 * 8 + 8 + 8 + 1


@pytest.mark.filterwarnings("ignore")
def test_paired_speedup_times_a_plain_copy_under_zero3(one_process_group, tmp_path):
    """ZeRO-3's forward hooks run on every submodule call even with the parameters gathered (the
    hooked detector took twice the plain one's time here), so the paired timing runs a plain copy
    with the trial's weights: same outputs, no DeepSpeed parameters or hooks."""
    from harness.config import trial_from_dict
    from harness.task.data import build_datasets, fixed_batch
    from harness.task.distributed import DeepSpeedBackend
    from harness.task.measure import fvcore_macs, paired_speedup, timing_copy, zero3_partitioned
    from harness.task.train import train_variant

    cfg = trial_from_dict(
        {
            "preset": "micro",
            "model": {"spa": {"selection": "topk", "ratio": 0.5}},
            "train": {"steps": 1, "batch_size": 2, "warmup_steps": 1, "zero_stage": 3},
            "data": {"num_train": 4, "num_val": 2, "image_size": 64, "cache_dir": str(tmp_path)},
            "bench": {"batch_size": 2, "warmup": 0, "repeats": 2},
        }
    )
    backend = DeepSpeedBackend()
    train_variant(cfg, backend=backend, progress=False)
    det = backend.model
    assert zero3_partitioned(det) and any(m._forward_pre_hooks for m in det.modules())
    images = fixed_batch(build_datasets(cfg.data, progress=False)[1], 2)[0]
    with backend.gathered_parameters(), torch.no_grad():
        copy = timing_copy(cfg, det)
        assert copy is not det and not zero3_partitioned(copy)
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in copy.modules())
        ours, theirs = copy.eval()(images)["backbone"], det.eval()(images)["backbone"]
        for a, b in zip(ours.features, theirs.features, strict=True):
            torch.testing.assert_close(a, b)
        assert [b.counts.tolist() for b in ours.blocks] == [b.counts.tolist() for b in theirs.blocks]
        counted, plain_count = fvcore_macs(det, images), fvcore_macs(copy, images)  # as measure() counts
        for key in ("total", "backbone", "attn"):  # ZeRO-3's hooks add uncounted ops, no multiply-adds
            assert counted[key] == plain_count[key] > 0, key
    out = paired_speedup(cfg, backend, det, images)
    assert out["paired_repeats"] == 2 and out["speedup_vs_dense"] > 0
    plain = torch.nn.Linear(2, 2)
    assert not zero3_partitioned(plain) and timing_copy(cfg, plain) is plain  # no ZeRO-3: the model itself


def test_a_cpu_accelerator_is_cleared_when_cuda_is_present(monkeypatch):
    """A job environment written for CPU nodes (DS_ACCELERATOR=cpu) on a GPU node: DeepSpeed would
    autocast for the CPU and train on the GPU in fp32. The worker drops it, with a warning."""
    import sys
    from types import ModuleType, SimpleNamespace

    from harness.task.distributed import prepare_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    devices = []
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    fresh = ModuleType("deepspeed.accelerator.real_accelerator")
    fresh.ds_accelerator = None  # DeepSpeed not imported yet in this process: it will choose CUDA
    monkeypatch.setitem(sys.modules, "deepspeed.accelerator.real_accelerator", fresh)
    with pytest.warns(UserWarning, match="DS_ACCELERATOR=cpu ignored: CUDA is present"):
        assert prepare_accelerator() == torch.device("cuda", 3)
    assert "DS_ACCELERATOR" not in os.environ and devices == [3]
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")  # what a GPU node may set: kept, silently
    assert prepare_accelerator() == torch.device("cuda", 3) and os.environ["DS_ACCELERATOR"] == "cuda"
    # DeepSpeed imported earlier in this process with its CPU accelerator: too late to fix, refused
    fresh.ds_accelerator = SimpleNamespace(device_name=lambda: "cpu")
    with pytest.raises(RuntimeError, match="imported in this process with its 'cpu' accelerator"):
        prepare_accelerator()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_the_row_precision_is_what_the_engine_runs(one_process_group, monkeypatch, precision, dtype):
    from harness.task.distributed import DeepSpeedBackend

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    backend = DeepSpeedBackend()
    engine = backend.setup(model, _cfg(steps=1, batch_size=2, precision=precision, warmup_steps=1))
    engine(torch.randn(2, 4))
    assert seen == [dtype] and backend.precision == precision  # reported = observed
    # a DeepSpeed that does not know the torch_autocast key (before 0.17.2) trains in fp32 whatever
    # the config says; the engine's own answer is what the row records
    monkeypatch.setattr(engine, "torch_autocast_enabled", lambda: False)
    assert "torch_autocast" in backend.ds_config or precision == "fp32"
    assert backend.precision == "fp32"
