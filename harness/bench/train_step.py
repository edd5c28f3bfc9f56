"""``python -m harness.bench train-step``: one training step (forward, backward of a loss on the four stage
maps, AdamW step) of an SPA backbone against its dense twin (same initial weights), steps alternating.

The default size, Swin-T (the paper's backbone) at 112 px, batch 32, stages 3-4 keeping 25% by top-k
in containers: stages 3-4 hold 64% of the dense forward's multiply-adds (the ``tiny`` preset at
128 px: 52%, at channel widths where per-op overhead rules), so keeping 25% there gives a FLOP ratio
near 2. The batch is 32, not 16, because AdamW's step costs the same in both models (it scales with
the 28M parameters, not the tokens) and at batch 16 it is about a tenth of the dense step, a cost the
forwards' FLOP ratio does not see.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from harness.bench.common import Runner, Timing, impl_in_env, ms_columns
from harness.bench.pair import fvcore_by_module
from harness.task.timing import quartiles
from spa_core.backbone import BackboneFeatures, build_backbone
from spa_core.config import BackboneConfig, SPAConfig, backbone_preset

__all__ = ["TrainStepRunner", "train_configs"]


def train_configs(
    preset: str = "swin_t",
    *,
    ratio: float = 0.25,
    strategy: str = "containers",
    mlp_on: str = "selected",
    **overrides: Any,
) -> tuple[BackboneConfig, BackboneConfig]:
    """The SPA backbone of the training step (stages 3-4 keep ``ratio`` of their tokens by top-k) and
    its dense twin (same config, ``variant: dense``). No stochastic depth: the two steps differ only
    in selection."""
    spa = SPAConfig(selection="topk", ratio=ratio, pack=strategy, mlp_on=mlp_on, supervision="none")
    cfg = backbone_preset(preset, spa=spa, drop_path_rate=0.0, **overrides)
    return cfg, dataclasses.replace(cfg, variant="dense")


class TrainStepRunner(Runner):
    """One row (the JSON is that object): the speedup (dense / SPA step time) per pair of steps, its
    median and interquartile range, the fvcore FLOP ratio of the two forwards, efficiency = speedup /
    FLOP ratio, and ``dense_spa_stage_share``, the share of the dense forward's multiply-adds in the SPA
    stages (how much selection can save at most). ``depths``/``embed_dim`` override the preset's."""

    json_object = True

    def __init__(
        self,
        timing: Timing | None = None,
        *,
        preset: str = "swin_t",
        image: int = 112,
        batch: int = 32,
        ratio: float = 0.25,
        strategy: str = "containers",
        mlp_on: str = "selected",
        depths: Sequence[int] | None = None,
        embed_dim: int | None = None,
    ) -> None:
        self.timing = timing or Timing(reps=11, warmup=2)
        self.preset, self.image, self.batch = preset, image, batch
        self.ratio, self.strategy, self.mlp_on = ratio, strategy, mlp_on
        overrides: dict[str, Any] = {}
        if depths is not None:
            overrides["depths"] = tuple(depths)
        if embed_dim is not None:
            overrides["embed_dim"] = embed_dim
        self.cfg, self.dense_cfg = train_configs(
            preset, ratio=ratio, strategy=strategy, mlp_on=mlp_on, **overrides
        )

    def rows(self) -> Iterator[dict[str, Any]]:
        cfg, seed = self.cfg, self.timing.seed
        torch.manual_seed(seed)
        dense = build_backbone(self.dense_cfg)
        spa = build_backbone(cfg)
        missing, unexpected = spa.load_state_dict(dense.state_dict(), strict=False)
        if unexpected or not all(".gate." in k for k in missing):
            raise RuntimeError(
                f"SPA backbone does not hold its dense twin's weights: {missing}, {unexpected}"
            )
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(self.batch, 3, self.image, self.image, generator=g)  # (B, 3, H, W)
        macs, stage_share = {}, 0.0
        for name, model in (("dense", dense), ("spa", spa)):
            model.eval()
            macs[name], by_module = fvcore_by_module(BackboneFeatures(model), (images,))
            if name == "dense":
                in_spa = sum(by_module.get(f"backbone.stages.{s - 1}", 0) for s in cfg.spa_stages)
                stage_share = in_spa / macs[name]
            model.train()
        with torch.no_grad():
            kept = [float(b.kept_fraction) for b in spa(images).blocks]
        opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4) for n, m in (("dense", dense), ("spa", spa))}

        def step(name: str, model: nn.Module) -> None:
            opts[name].zero_grad(set_to_none=True)
            loss = sum(f.pow(2).mean() for f in model(images).features)
            loss.backward()
            opts[name].step()

        t = self.timing.time(
            {"dense": partial(step, "dense", dense), "spa": partial(step, "spa", spa)}, inference=False
        )
        q1, med, q3 = quartiles([a / b for a, b in zip(t["dense"], t["spa"])])
        flop_ratio = macs["dense"] / macs["spa"]
        yield {
            "preset": self.preset,
            "image": self.image,
            "batch": self.batch,
            "depths": list(cfg.depths),
            "embed_dim": cfg.embed_dim,
            "window": cfg.window_size,
            "spa_stages": list(cfg.spa_stages),
            "strategy": self.strategy,
            "mlp_on": self.mlp_on,
            "ratio": self.ratio,
            "kept_fraction": round(statistics.fmean(kept), 4),
            "speedup": round(med, 4),
            "speedup_q1": round(q1, 4),
            "speedup_q3": round(q3, 4),
            "flop_ratio": round(flop_ratio, 4),
            "efficiency": round(med / flop_ratio, 4),
            "efficiency_q1": round(q1 / flop_ratio, 4),
            "efficiency_q3": round(q3 / flop_ratio, 4),
            "dense_fwd_gmacs": round(macs["dense"] / 1e9, 4),
            "spa_fwd_gmacs": round(macs["spa"] / 1e9, 4),
            "dense_spa_stage_share": round(stage_share, 4),
            **ms_columns("dense", t["dense"]),
            **ms_columns("spa", t["spa"]),
            "impl": impl_in_env(),
            **self.timing.env(),
        }

    def title(self, machine: str) -> str:
        c = self.cfg
        return (
            f"training step (forward, backward, AdamW) of the {self.preset} backbone (depths {list(c.depths)}, "
            f"embed_dim {c.embed_dim}, window {c.window_size}), {self.image}px, batch {self.batch}; stages "
            f"{list(c.spa_stages)} SPA ({self.strategy}, top-k {self.ratio}, mlp_on {self.mlp_on}) vs dense: "
            f"{machine}; {self.timing.reps} alternating steps each, {self.timing.clock} clock; speedup = dense / "
            "SPA time per pair, median (interquartile range); FLOP ratio: fvcore, forwards"
        )

    def header(self) -> str:
        return (
            "| model | kept | step ms (IQR) | speedup (IQR) | FLOP ratio | efficiency (IQR) | SPA stages' share |\n"
            "|---|---|---|---|---|---|---|"
        )

    def format_row(self, r: dict[str, Any]) -> str:
        return (
            f"| dense | 1.000 | {r['dense_ms']:.1f} ({r['dense_ms_q1']:.1f}-{r['dense_ms_q3']:.1f}) | 1.00 | 1.00 | "
            f"- | {r['dense_spa_stage_share']:.3f} |\n"
            f"| SPA {r['strategy']} | {r['kept_fraction']:.3f} | "
            f"{r['spa_ms']:.1f} ({r['spa_ms_q1']:.1f}-{r['spa_ms_q3']:.1f}) | "
            f"{r['speedup']:.2f} ({r['speedup_q1']:.2f}-{r['speedup_q3']:.2f}) | {r['flop_ratio']:.2f} | "
            f"{r['efficiency']:.2f} ({r['efficiency_q1']:.2f}-{r['efficiency_q3']:.2f}) | - |"
        )
