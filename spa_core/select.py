"""Selection policies of an SPA block (arXiv 2410.23608): which tokens of each image are kept.

Every policy decides per image, so the number kept varies from image to image (0 and N included),
and returns the counts with the mask. Registered in ``SELECTION_POLICIES`` (contract in
``spa_core/registry.py``):

- ``gate``: the paper's hard decision on the gate logits. Training: Gumbel-sigmoid (logistic noise
  added to the logits, divided by ``gumbel_tau``) thresholded at ``threshold``, straight-through, so the
  kept tokens carry a multiplier of value 1 whose gradient is the soft sample's. Inference: keep
  ``sigmoid(s) > threshold``, no noise. The kept fraction is an outcome, not a setting.
- ``topk``: the ``round(ratio * N)`` highest-scoring tokens of each image (uniform, as SparseViT).
- ``random``: ``round(ratio * N)`` tokens of each image drawn uniformly (the control).
- ``all``: every token (the keep-all control for the machinery itself).
- ``none``: no token (the positive control: with ``mlp_on: selected`` every token skips every SPA
  block, so the SPA stages reduce to their patch merges; a task that needs those blocks must lose).
- ``gate_random`` / ``gate_norm``: compute-matched controls: the gate's count per image (its own
  decision), the places drawn at random / taken by a fixed score (feature norm).

With ``valid`` (B, N) bool, the real tokens of images padded to one batch, every built-in policy
decides over the real tokens only: ratios count them, places are drawn among them and padding is
never kept. A plugin policy without a ``valid`` parameter decides over all N; the block then drops
what it keeps of the padding.

Host syncs: none. Counts stay on the device (the pack reads them, once); ``round(ratio * N)`` is
known from shapes; random draws come from a generator on the scores' device (``SPABlock`` keeps one
there) and are float32, as is the gate's whole decision.

``random``, ``gate_random`` and ``gate_norm`` choose places that are not the gate's, so their kept
tokens enter attention unscaled (``Selection.gate_scaled`` False) whatever ``cfg.gate_scaling`` says:
a control must not borrow the gate's scores at its places.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from spa_core.config import SPAConfig, check_config
from spa_core.contracts import check_selection
from spa_core.registry import SELECTION_POLICIES

__all__ = [
    "Selection",
    "select_tokens",
    "select_gate",
    "select_topk",
    "select_random",
    "select_all",
    "select_none",
    "select_gate_random",
    "select_gate_norm",
    "feature_norm_scores",
]


@dataclass
class Selection:
    """mask: (B, N) bool kept tokens; counts: (B,) int64 kept per image; weight: (B, N) float32
    multiplier for the kept tokens (the straight-through estimator of ``gate``; ones otherwise);
    gate_scaled: whether the block may scale the kept tokens by the gate's ``sigmoid(scores)``
    (``cfg.gate_scaling``). A policy whose places are not the gate's (``random``, ``gate_random``,
    ``gate_norm``) sets it False: scaling its tokens by the gate's scores at those places would hand
    the control the gate's placement information (and the gate the control's gradient)."""

    mask: Tensor
    counts: Tensor
    weight: Tensor
    gate_scaled: bool = True


def select_tokens(
    scores: Tensor,
    cfg: SPAConfig,
    *,
    training: bool,
    generator: torch.Generator | None = None,
    tokens: Tensor | None = None,
    valid: Tensor | None = None,
) -> Selection:
    """scores: (B, N) gate logits, tokens: (B, N, C) what the gate scored, valid: (B, N) bool real
    tokens (None: all) -> ``Selection`` by the policy ``cfg.selection`` (``cfg`` checked first:
    ``ConfigError`` naming a bad field). ``valid`` reaches the policies that take it."""
    check_config(cfg)
    policy = SELECTION_POLICIES.get(cfg.selection)
    kwargs = {"valid": valid} if valid is not None and _takes_valid(policy) else {}
    sel = policy(scores, cfg=cfg, training=training, generator=generator, tokens=tokens, **kwargs)
    return check_selection(sel, scores, cfg.selection, policy)  # the contract, where the core receives it


@functools.cache
def _takes_valid(policy) -> bool:
    """Whether a policy has a ``valid`` parameter (cached: this runs on every block's forward)."""
    try:
        params = inspect.signature(policy).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "valid" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _from_mask(mask: Tensor, weight: Tensor | None = None, *, gate_scaled: bool = True) -> Selection:
    if weight is None:
        weight = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
    return Selection(mask=mask, counts=mask.sum(1, dtype=torch.int64), weight=weight, gate_scaled=gate_scaled)


def _ratio_count(n: int, ratio: float) -> int:
    n = int(n)
    return min(n, max(0, round(ratio * n)))


def _ratio_counts(valid: Tensor, ratio: float) -> Tensor:
    """(B,) int64 ``round(ratio * n_b)`` of every image's real tokens, on the device (float64 rounds
    half to even, as Python's ``round`` in ``_ratio_count``)."""
    return (valid.sum(1).to(torch.float64) * ratio).round().to(torch.int64)


def _among(values: Tensor, valid: Tensor | None) -> Tensor:
    """``values`` (B, N) float with padding ranked last (never among an image's real counts)."""
    if valid is None:
        return values
    return values.masked_fill(~valid, float("-inf"))


def _real(mask: Tensor, valid: Tensor | None) -> Tensor:
    return mask if valid is None else mask & valid


def _top_mask(values: Tensor, k: int) -> Tensor:
    mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if k > 0:
        idx = values.topk(k, dim=1).indices  # (B, k)
        mask = mask.scatter(1, idx, torch.ones_like(idx, dtype=torch.bool))
    return mask


def _kept_by_rank(values: Tensor, counts: Tensor) -> Tensor:
    """(B, N) bool: the ``counts[b]`` highest ``values`` of every image b (ties to the lower index)."""
    order = torch.sort(values, dim=1, descending=True, stable=True).indices  # (B, N)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(values.shape[1], device=values.device).expand_as(order)
    )
    return rank < counts.to(rank.device)[:, None]


def _uniform(scores: Tensor, generator) -> Tensor:
    """(B, N) float32 uniform draws from ``generator`` (on its device), on the scores' device. Draw on
    a generator of the scores' device (``SPABlock`` does): a generator elsewhere means a copy per
    call, which on a GPU waits for its queue (a sync)."""
    gen_device = generator.device if generator is not None else scores.device
    return torch.rand(scores.shape, generator=generator, device=gen_device).to(scores.device)


def _gate_decision(scores: Tensor, cfg: SPAConfig, training: bool, generator) -> tuple[Tensor, Tensor]:
    """The gate's hard decision (B, N) bool and its straight-through weight (B, N) float32.

    Noise, soft sample and decision are computed in float32 whatever the scores' dtype: in bfloat16
    (a model cast to bf16, or scores from bf16 activations) ``u`` would be rounded to 8 bits, the
    logistic noise cut off at about +-5.5 and coarsely stepped, and the decision near the threshold
    decided by rounding."""
    s = scores.float()
    if not training:
        hard = torch.sigmoid(s.detach()) > cfg.threshold
        return hard, torch.ones(scores.shape, dtype=torch.float32, device=scores.device)
    u = _uniform(s, generator)
    u = u.clamp(torch.finfo(torch.float32).tiny, 1.0 - torch.finfo(torch.float32).eps)
    noise = torch.log(u) - torch.log1p(-u)  # logistic = difference of two Gumbels
    soft = torch.sigmoid((s + noise) / cfg.gumbel_tau)  # (B, N) float32
    hard = soft.detach() > cfg.threshold
    return hard, hard.to(soft.dtype) - soft.detach() + soft  # value 1 on kept tokens, gradient of soft


@SELECTION_POLICIES.register("gate")
def select_gate(
    scores: Tensor, *, cfg: SPAConfig, training: bool, generator=None, tokens=None, valid=None
) -> Selection:
    """Hard Gumbel-sigmoid straight-through at ``cfg.threshold`` in training; the threshold at inference."""
    hard, weight = _gate_decision(scores, cfg, training, generator)
    return _from_mask(_real(hard, valid), weight if training else None)


@SELECTION_POLICIES.register("topk")
def select_topk(
    scores: Tensor, *, cfg: SPAConfig, training: bool, generator=None, tokens=None, valid=None
) -> Selection:
    """The ``round(ratio*N)`` best-scoring tokens of every image (N its real tokens)."""
    if valid is not None:
        return _from_mask(
            _kept_by_rank(_among(scores.detach().float(), valid), _ratio_counts(valid, cfg.ratio))
        )
    return _from_mask(_top_mask(scores.detach(), _ratio_count(scores.shape[1], cfg.ratio)))


@SELECTION_POLICIES.register("random")
def select_random(
    scores: Tensor, *, cfg: SPAConfig, training: bool, generator=None, tokens=None, valid=None
) -> Selection:
    """``round(ratio*N)`` tokens of every image drawn uniformly, ignoring the scores (the control);
    unscaled by the gate."""
    u = _uniform(scores, generator)
    if valid is not None:
        return _from_mask(_kept_by_rank(_among(u, valid), _ratio_counts(valid, cfg.ratio)), gate_scaled=False)
    return _from_mask(_top_mask(u, _ratio_count(scores.shape[1], cfg.ratio)), gate_scaled=False)


@SELECTION_POLICIES.register("all")
def select_all(
    scores: Tensor, *, cfg: SPAConfig, training: bool, generator=None, tokens=None, valid=None
) -> Selection:
    """Every token (the keep-all control: SPA's machinery with nothing dropped)."""
    return _from_mask(_real(torch.ones(scores.shape, dtype=torch.bool, device=scores.device), valid))


@SELECTION_POLICIES.register("none")
def select_none(
    scores: Tensor, *, cfg: SPAConfig, training: bool, generator=None, tokens=None, valid=None
) -> Selection:
    """No token (the positive control: with ``mlp_on: selected`` no SPA block computes anything)."""
    return _from_mask(torch.zeros(scores.shape, dtype=torch.bool, device=scores.device), gate_scaled=False)


@SELECTION_POLICIES.register("gate_random")
def select_gate_random(
    scores: Tensor, *, cfg: SPAConfig, training: bool, generator=None, tokens=None, valid=None
) -> Selection:
    """As many tokens per image as the gate keeps (its decision, as ``gate``), at uniformly random
    places: spends exactly the gate's compute, so gate vs gate_random separates *where* the gate looks
    from *how much* it keeps. No straight-through weight and no gate scaling (the places are not the
    gate's): the kept tokens enter attention unscaled, as with ``gate_scaling: false``."""
    hard, _ = _gate_decision(scores, cfg, training, generator)
    return _from_mask(
        _kept_by_rank(_among(_uniform(scores, generator), valid), _real(hard, valid).sum(1)),
        gate_scaled=False,
    )


def feature_norm_scores(tokens: Tensor) -> Tensor:
    """tokens (B, N, C) -> (B, N) ``||r_i - mean_j r_j||``: how far a token is from its image's mean
    (the norm of a layer-normed token alone is nearly the same for every token)."""
    x = tokens.detach().float()
    return (x - x.mean(dim=1, keepdim=True)).norm(dim=-1)


@SELECTION_POLICIES.register("gate_norm")
def select_gate_norm(
    scores: Tensor, *, cfg: SPAConfig, training: bool, generator=None, tokens=None, valid=None
) -> Selection:
    """As many tokens per image as the gate keeps, at the places of highest feature norm
    (``feature_norm_scores``, a fixed score that nothing learns): the gate's compute, a fixed rule;
    unscaled by the gate, as ``gate_random``."""
    if tokens is None:
        raise ValueError("selection 'gate_norm' needs the block's tokens (tokens=(B, N, C))")
    hard, _ = _gate_decision(scores, cfg, training, generator)
    return _from_mask(
        _kept_by_rank(_among(feature_norm_scores(tokens), valid), _real(hard, valid).sum(1)),
        gate_scaled=False,
    )
