"""Gate supervision of SPA (arXiv 2410.23608): ``L = L_task + alpha * sum_blocks BCE(s, y)``.

Modes registered in ``SUPERVISION_MODES`` (contract in ``spa_core/registry.py``):
``labels`` (BCE-with-logits of every SPA block's gate logits against the selection labels at its grid,
mean over the block's real tokens, summed over blocks, times alpha; the paper's alpha is 0.01; a batch's
padding, ``SPABlockInfo.valid`` False, is left out: a padded image's loss is its unpadded loss) and ``none``
(no auxiliary loss: the gate learns from the task loss alone, through the ``sigmoid(s)`` scaling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from spa_core.block import SPABlockInfo
from spa_core.config import SPAConfig
from spa_core.contracts import check_supervision_loss
from spa_core.registry import SUPERVISION_MODES

__all__ = ["gate_loss", "supervision_labels", "supervision_none"]


def _zero(blocks: list[SPABlockInfo]) -> Tensor:
    if blocks:
        return blocks[0].logits.sum() * 0.0  # on the graph's device and dtype
    return torch.zeros(())


@SUPERVISION_MODES.register("labels")
def supervision_labels(
    blocks: list[SPABlockInfo], labels: dict[tuple[int, int], Tensor] | None, *, alpha: float
) -> Tensor:
    """alpha * sum over blocks of mean BCE-with-logits(logits (B, N), labels[grid] (B, H, W)) over
    the block's real tokens (``info.valid (B, N)``; every token when None)."""
    if not blocks:
        return _zero(blocks)
    if labels is None:
        raise ValueError("gate supervision 'labels' needs selection labels (labels=None was given)")
    total = _zero(blocks)
    for info in blocks:
        if info.grid not in labels:
            raise KeyError(
                f"no selection labels at grid {info.grid} (block stage {info.stage}); have {sorted(labels)}"
            )
        y = labels[info.grid].to(info.logits.device, info.logits.dtype).reshape(info.logits.shape)
        if info.valid is None:
            total = total + F.binary_cross_entropy_with_logits(info.logits, y)
            continue
        real = info.valid.to(info.logits.dtype)  # (B, N)
        bce = F.binary_cross_entropy_with_logits(info.logits, y, reduction="none")
        total = total + (bce * real).sum() / real.sum().clamp(min=1)
    return alpha * total


@SUPERVISION_MODES.register("none")
def supervision_none(blocks: list[SPABlockInfo], labels=None, *, alpha: float) -> Tensor:
    """No gate loss (zero, on the graph)."""
    return _zero(blocks)


def gate_loss(
    blocks: list[SPABlockInfo], labels: dict[tuple[int, int], Tensor] | None, spa_cfg: SPAConfig | None
) -> Tensor:
    """The weighted gate loss of ``SUPERVISION_MODES[spa_cfg.supervision]`` (zero for the dense baseline,
    ``spa_cfg=None``, or no SPA blocks)."""
    if spa_cfg is None or not blocks:
        return _zero(blocks)
    mode = SUPERVISION_MODES.get(spa_cfg.supervision)
    return check_supervision_loss(mode(blocks, labels, alpha=spa_cfg.alpha), spa_cfg.supervision, mode)
