"""Data-parallel scenarios on a local gloo group of child processes (CPU, DeepSpeed), for
``test_data_parallel.py``.

``launch(scenario, world, out_dir, args, timeout)`` starts ``world`` Python processes on 127.0.0.1,
each joining one gloo group and running ``SCENARIOS[scenario](rank, args)`` under a
``DeepSpeedBackend``; each saves what it returns to ``out_dir/<scenario>.rank<r>.pt``. Returns the
ranks' results, or ``None`` when the ranks did not finish within ``timeout`` (a collective that
hangs); a rank that fails raises with every rank's log.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    scenario: str, world: int, out_dir: Path, args: dict[str, Any], timeout: float
) -> list[Any] | None:
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
    }
    procs, logs = [], []
    for rank in range(world):
        log = open(out_dir / f"{scenario}.rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        code = f"import _ranks; _ranks.main({scenario!r}, {json.dumps(json.dumps(args))}, {str(out_dir)!r})"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        )
    deadline = time.monotonic() + timeout
    hung = False
    try:
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                hung = True
                break
    finally:
        for p in procs:  # only the processes started here
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    if hung:
        return None
    if any(p.returncode != 0 for p in procs):
        text = "\n".join(
            f"--- rank {r} (exit {p.returncode}) ---\n"
            + (out_dir / f"{scenario}.rank{r}.log").read_text()[-6000:]
            for r, p in enumerate(procs)
        )
        raise AssertionError(f"a rank of {scenario!r} failed:\n{text}")
    return [torch.load(out_dir / f"{scenario}.rank{r}.pt", weights_only=False) for r in range(world)]


# --- in the child processes ------------------------------------------------------------------------
def main(scenario: str, args_json: str, out_dir: str) -> None:
    import torch.distributed as dist

    from harness.task.distributed import prepare_accelerator

    torch.set_num_threads(1)
    prepare_accelerator()
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    result = SCENARIOS[scenario](rank, json.loads(args_json))
    torch.save(result, Path(out_dir) / f"{scenario}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def _cfg(args: dict[str, Any]):
    from harness.config import trial_from_dict

    return trial_from_dict(args["cfg"])


def _checksum(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def _train(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """Train under DeepSpeed, recording at the first training forward the parameters' checksum, the
    global RNG state, the loader worker's seed and every SPA block's mask, and the parameters that
    got a gradient in the first backward."""
    from harness.task import coco, train
    from harness.task.distributed import DeepSpeedBackend

    seen: dict[str, Any] = {"grads": set()}
    real_getitem, real_build = coco.CocoDetection.__getitem__, train.build_detector

    def getitem(self, index):  # runs in the loader's worker: its seed says which stream it draws
        image, target = real_getitem(self, index)
        target["worker_seed"] = torch.initial_seed()
        return image, target

    def build(cfg, **kw):
        model = real_build(cfg, **kw)

        def before(module, inputs):
            if module.training:
                seen["forwards"] = seen.get("forwards", 0) + 1
            if module.training and "checksum" not in seen:
                seen.update(
                    checksum=_checksum(module),
                    rng=torch.get_rng_state(),
                    worker_seeds=[t.get("worker_seed") for t in inputs[1]],
                )

        def after(module, inputs, out):
            if module.training and "masks" not in seen:
                seen["masks"] = [b.mask.detach().clone() for b in out["backbone"].blocks]

        model.register_forward_pre_hook(before)
        model.register_forward_hook(after)

        def got_grad(name: str) -> None:
            if seen.get("forwards") == 1:  # the first backward's
                seen["grads"].add(name)

        for name, p in model.named_parameters():
            if p.requires_grad:
                p.register_hook(lambda g, name=name: got_grad(name))
        seen["params"] = {n for n, p in model.named_parameters() if p.requires_grad}
        return model

    coco.CocoDetection.__getitem__ = getitem
    train.build_detector = build
    try:
        backend = DeepSpeedBackend()
        metrics = train.train_variant(_cfg(args), backend=backend, progress=False)
    finally:
        coco.CocoDetection.__getitem__, train.build_detector = real_getitem, real_build
    with backend.gathered_parameters():
        final = {n: p.detach().clone() for n, p in backend.model.named_parameters()}
    return {**seen, "metrics": metrics, "final": final}


def _keeps_nothing_on_rank_1(scores, *, cfg, training, generator=None, tokens=None):
    """Rank 1 keeps no token of any image; rank 0 the top half (a rank whose images are empty)."""
    import torch.distributed as dist

    from spa_core.select import Selection

    mask = torch.zeros_like(scores, dtype=torch.bool)
    if dist.get_rank() == 0:
        idx = scores.topk(max(1, scores.shape[1] // 2), dim=1).indices
        mask = mask.scatter(1, idx, True)
    return Selection(mask=mask, counts=mask.sum(1), weight=torch.ones_like(scores))


def _train_keeping_nothing_on_rank_1(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    from spa_core.registry import SELECTION_POLICIES

    SELECTION_POLICIES.register("keeps_nothing_on_rank_1", _keeps_nothing_on_rank_1)
    return _train(rank, args)


def _evaluate(rank: int, args: dict[str, Any]) -> dict[str, Any]:
    """The sharded evaluation of a model with the weights saved at ``args["weights"]``: its metrics,
    the image ids of every forward this rank ran, and how often this rank scored (COCOeval)."""
    from harness.task import train
    from harness.task.data import build_datasets
    from harness.task.detector import build_detector
    from harness.task.distributed import DeepSpeedBackend

    cfg = _cfg(args)
    model = build_detector(cfg, rank=rank)
    model.load_state_dict(torch.load(args["weights"]))
    forwards, scored = [], []
    model.register_forward_pre_hook(lambda m, inputs: forwards.append([t["image_id"] for t in inputs[1]]))
    real = train.coco_map
    train.coco_map = lambda *a, **k: scored.append(1) or real(*a, **k)
    backend = DeepSpeedBackend()
    engine = backend.setup(model, cfg)
    _, val = build_datasets(cfg.data, progress=False)
    metrics = train.evaluate_variant(engine, val, cfg, backend=backend)
    train.coco_map = real
    return {"metrics": metrics, "forwards": forwards, "scored": len(scored), "ids": val.ids}


SCENARIOS = {
    "train": _train,
    "zero_kept": _train_keeping_nothing_on_rank_1,
    "evaluate": _evaluate,
}
