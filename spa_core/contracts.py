"""The registries' contracts, checked where the core receives what a variant returned.

A plugin's mistake is caught at the call that made it, not deep in the block that later trips on it:
``spa_core.select.select_tokens`` checks a selection policy's ``Selection``, ``spa_core.block.SPABlock``
its gate's scores, ``spa_core.loss.gate_loss`` a supervision mode's loss, ``spa_core.pack.pack`` a
pack strategy's ``PackedTokens`` (and ``PACK_STRATEGIES.register`` its round trip on a small probe),
``spa_core.attention.packed_attention`` its attention output. The contracts themselves
are the registries' docstrings (``spa_core/registry.py``). A broken rule raises ``ContractError``
naming the registry and entry, where the registered object is defined (``file:line``), the rule and
what was seen::

    ContractError: selection_policy 'mine' (select_mine at /home/me/my_variants.py:9) breaks its
    contract: mask must be (B, N) = (2, 64) torch.bool on cpu; got mask (2, 16) torch.bool on cpu ...

Two kinds of rule:

- shapes, dtypes, types and devices: read from tensor metadata, no device synchronisation; checked
  on every call (about 10 microseconds a check on a CPU);
- values (``counts == mask.sum(1)``, a finite loss, weights and scores without NaN, the packed
  indices covering exactly the kept tokens, the round-trip probe): each reads a result back to the
  host, a synchronisation on a GPU. They run on each entry's first ``VALUE_CHECKS`` calls of a
  trial (``reset`` at the trial's start, ``harness.task.train``): its first training steps.

``SPA_CONTRACTS`` (environment, read at import) or ``set_mode`` picks: ``first`` (the default, as
above), ``always`` (value rules on every call: the tests), ``off``. Nothing is checked while
``torch.jit.trace`` records a graph (fvcore's FLOP count): the tracer would record the checks' ops too.
``python -m harness.bench --contract-cost`` measures what the checks cost an SPA block.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from spa_core.config import SPAConfig

__all__ = [
    "ContractError",
    "MODES",
    "VALUE_CHECKS",
    "set_mode",
    "get_mode",
    "checking",
    "reset",
    "where",
    "check_selection",
    "check_gate_scores",
    "check_supervision_loss",
    "check_packed",
    "check_attention",
    "check_attention_macs",
    "probe_pack_strategy",
]

MODES = ("first", "always", "off")
VALUE_CHECKS = 100  # calls per registry entry whose value rules are checked in mode "first"

_REGISTRY_VARS = {
    "selection_policy": "SELECTION_POLICIES",
    "pack_strategy": "PACK_STRATEGIES",
    "gate": "GATES",
    "supervision_mode": "SUPERVISION_MODES",
    "model_variant": "MODEL_VARIANTS",
}


def _mode_from_env() -> str:
    mode = os.environ.get("SPA_CONTRACTS", "first").strip().lower() or "first"
    if mode not in MODES:
        raise ValueError(f"SPA_CONTRACTS={mode!r}: expected one of {', '.join(MODES)}")
    return mode


_mode = _mode_from_env()
_value_calls: Counter[tuple[str, str]] = Counter()  # (registry, name) -> value checks done


class ContractError(ValueError):
    """What a registered variant returned breaks its registry's contract. ``registry``, ``name``,
    ``where`` (``func at file:line`` of the registered object), ``rule`` and ``seen`` are attributes."""

    def __init__(self, registry: str, name: str, obj: Any, rule: str, seen: str) -> None:
        self.registry, self.name, self.where, self.rule, self.seen = registry, name, where(obj), rule, seen
        var = _REGISTRY_VARS.get(registry, registry)
        super().__init__(
            f"{registry} {name!r} ({self.where}) breaks its contract: {rule}; got {seen} "
            f"(the contract: {var}'s docstring in spa_core/registry.py)"
        )


def set_mode(mode: str) -> None:
    """``first`` | ``always`` | ``off`` (see the module docstring)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"contract mode {mode!r}: expected one of {', '.join(MODES)}")
    _mode = mode


def get_mode() -> str:
    return _mode


@contextlib.contextmanager
def checking(mode: str) -> Iterator[None]:
    """Run the block under ``mode``, then restore the previous one."""
    before = _mode
    set_mode(mode)
    try:
        yield
    finally:
        set_mode(before)


def reset() -> None:
    """Start counting each entry's first ``VALUE_CHECKS`` calls again (a trial's start: Ray reuses
    worker processes across trials)."""
    _value_calls.clear()


def where(obj: Any) -> str:
    """``qualname at file:line`` of a function or class (an instance: its class), or its repr."""
    target = obj
    if not (inspect.isfunction(obj) or inspect.ismethod(obj) or inspect.isclass(obj)):
        target = type(obj)
    target = inspect.unwrap(target) if callable(target) else target
    name = getattr(target, "__qualname__", None) or repr(obj)
    try:
        file = inspect.getsourcefile(target)
        line = inspect.getsourcelines(target)[1]
    except (TypeError, OSError):
        return name
    return f"{name} at {file}:{line}"


def _active() -> bool:
    return _mode != "off" and not torch.jit.is_tracing()


def _values(registry: str, name: str) -> bool:
    """Whether this call checks value rules (one of the entry's first ``VALUE_CHECKS``, or always)."""
    if _mode == "always":
        return True
    key = (registry, name)
    if _value_calls[key] >= VALUE_CHECKS:
        return False
    _value_calls[key] += 1
    return True


def _desc(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"{tuple(t.shape)} {t.dtype} on {t.device}"
    return type(t).__name__ if t is not None else "None"


def _fits(
    t: Any, shape: Any, device: torch.device, dtype: torch.dtype | None = None, floating: bool = False
) -> bool:
    """Metadata only (no synchronisation): a tensor of ``shape`` on ``device``, of ``dtype`` or floating."""
    return (
        isinstance(t, Tensor)
        and t.shape == shape
        and t.device == device
        and (t.dtype == dtype if dtype is not None else not floating or t.is_floating_point())
    )


# --- selection policies -----------------------------------------------------------------------------------


def check_selection(sel: Any, scores: Tensor, name: str, fn: Any) -> Any:
    """``sel`` as ``SELECTION_POLICIES``' contract has it for ``scores (B, N)``: ``mask (B, N)`` bool,
    ``counts (B,)`` int64 equal to ``mask.sum(1)``, ``weight (B, N)`` float, on the scores' device,
    the weight without NaN or infinity. Returns ``sel``. (Messages are built only on a failure: this
    runs on every SPA block's forward.)"""
    if not _active():
        return sel
    reg, shape, dev = "selection_policy", scores.shape, scores.device
    try:
        mask, counts, weight = sel.mask, sel.counts, sel.weight
    except AttributeError:
        raise ContractError(reg, name, fn, "it returns a spa_core.select.Selection(mask, counts, weight)",
                            type(sel).__name__) from None  # fmt: skip
    if not _fits(mask, shape, dev, torch.bool):
        raise ContractError(reg, name, fn, f"mask must be (B, N) = {tuple(shape)} torch.bool on {dev}",
                            f"mask {_desc(mask)} for scores {_desc(scores)}")  # fmt: skip
    if not _fits(counts, shape[:1], dev, torch.int64):
        raise ContractError(reg, name, fn, f"counts must be (B,) = {tuple(shape[:1])} torch.int64 on {dev}, "
                            "mask.sum(1)", f"counts {_desc(counts)}")  # fmt: skip
    if not _fits(weight, shape, dev, floating=True):
        raise ContractError(reg, name, fn, f"weight must be (B, N) = {tuple(shape)} floating point on {dev}",
                            f"weight {_desc(weight)}")  # fmt: skip
    if _values(reg, name):
        kept = mask.sum(1, dtype=torch.int64)
        if not torch.equal(counts, kept):
            bad = (counts != kept).nonzero().flatten()[:4].tolist()
            raise ContractError(reg, name, fn, "counts must equal mask.sum(1) (the tokens each image keeps)",
                                f"counts {counts[bad].tolist()} where mask.sum(1) is {kept[bad].tolist()} "
                                f"(images {bad})")  # fmt: skip
        if not bool(torch.isfinite(weight).all()):
            raise ContractError(reg, name, fn, "weight must be finite (it multiplies the kept tokens)",
                                f"{int((~torch.isfinite(weight)).sum())} NaN or infinite values")  # fmt: skip
    return sel


# --- gates --------------------------------------------------------------------------------------------------


def check_gate_scores(scores: Any, x: Tensor, name: str, cls: Any) -> Tensor:
    """A gate's forward for tokens ``x (B, N, C)``: ``scores (B, N)`` floating point on x's device,
    without NaN. Returns ``scores``."""
    if not _active():
        return scores
    if not _fits(scores, x.shape[:2], x.device, floating=True):
        raise ContractError("gate", name, cls, f"forward returns scores (B, N) = {tuple(x.shape[:2])} floating "
                            f"point on {x.device} for x {tuple(x.shape)}", f"scores {_desc(scores)}")  # fmt: skip
    if _values("gate", name) and bool(torch.isnan(scores).any()):
        raise ContractError("gate", name, cls, "scores must not be NaN",
                            f"{int(torch.isnan(scores).sum())} NaN scores")  # fmt: skip
    return scores


# --- supervision modes --------------------------------------------------------------------------------------


def check_supervision_loss(loss: Any, name: str, fn: Any) -> Tensor:
    """A supervision mode's result: a finite floating-point scalar tensor (shape ``()``). Returns it."""
    if not _active():
        return loss
    reg = "supervision_mode"
    if not (isinstance(loss, Tensor) and loss.dim() == 0 and loss.is_floating_point()):
        raise ContractError(reg, name, fn, "it returns a scalar tensor (shape ()) of floating point",
                            f"the loss {_desc(loss)}")  # fmt: skip
    if _values(reg, name) and not bool(torch.isfinite(loss)):
        raise ContractError(reg, name, fn, "the loss must be finite", f"{loss.item()}")
    return loss


# --- pack strategies ----------------------------------------------------------------------------------------

_PACKED_FIELDS = (
    "tokens",
    "cu_seqlens",
    "max_seqlen",
    "indices",
    "seq_image",
    "counts",
    "num_tokens",
    "strategy",
)


def check_packed(packed: Any, x: Tensor, mask: Tensor, name: str, fn: Any) -> Any:
    """A strategy's ``pack(x (B, N, C), mask (B, N))``: a ``PackedTokens`` whose ``tokens (T, C)``
    have x's dtype and device, ``indices (T,)`` integer, ``cu_seqlens (S+1,)`` int32, ``counts (B,)``,
    ``num_tokens`` N and ``strategy`` the entry's name (attention dispatches on it); value rules: T
    kept tokens, ``indices`` exactly the kept places, ``counts == mask.sum(1)``, ``cu_seqlens``
    rising from 0 to T. Returns ``packed``."""
    if not _active():
        return packed
    reg = "pack_strategy"
    B, N, C = x.shape
    try:
        tokens, indices, cu, counts = packed.tokens, packed.indices, packed.cu_seqlens, packed.counts
        strategy, num_tokens = packed.strategy, packed.num_tokens
    except AttributeError:
        missing = [f for f in _PACKED_FIELDS if not hasattr(packed, f)]
        raise ContractError(reg, name, fn, "pack returns a spa_core.pack.PackedTokens",
                            f"{type(packed).__name__} without {', '.join(missing)}") from None  # fmt: skip
    if strategy != name:
        raise ContractError(reg, name, fn, f"the pack's strategy is the entry's name {name!r} (attention "
                            "runs through PACK_STRATEGIES[packed.strategy].attend)",
                            f"strategy {strategy!r}")  # fmt: skip
    if not (isinstance(tokens, Tensor) and tokens.dim() == 2 and tokens.shape[1] == C and tokens.dtype == x.dtype
            and tokens.device == x.device):  # fmt: skip
        raise ContractError(reg, name, fn, f"tokens (T, C) with C = {C}, {x.dtype} on {x.device}, as x",
                            f"tokens {_desc(tokens)} for x {_desc(x)}")  # fmt: skip
    T = tokens.shape[0]
    if not (isinstance(indices, Tensor) and indices.shape == tokens.shape[:1] and not indices.is_floating_point()
            and indices.dtype != torch.bool):  # fmt: skip
        raise ContractError(reg, name, fn, f"indices (T,) = ({T},) integer rows of the flattened (B*N) grid",
                            f"indices {_desc(indices)}")  # fmt: skip
    if not (isinstance(cu, Tensor) and cu.dim() == 1 and cu.numel() >= 1 and cu.dtype == torch.int32):
        raise ContractError(reg, name, fn, "cu_seqlens (S+1,) torch.int32", f"cu_seqlens {_desc(cu)}")
    if not (isinstance(counts, Tensor) and counts.shape == x.shape[:1] and not counts.is_floating_point()):
        raise ContractError(reg, name, fn, f"counts (B,) = ({B},) integer", f"counts {_desc(counts)}")
    if num_tokens != N:
        raise ContractError(reg, name, fn, f"num_tokens is N = {N}", f"num_tokens {num_tokens}")
    if _values(reg, name):
        flat = mask.reshape(-1)
        kept = int(flat.sum())
        if T != kept:
            raise ContractError(reg, name, fn, "tokens hold every kept token once (T = mask.sum())",
                                f"T = {T} for {kept} kept tokens")  # fmt: skip
        hits = torch.zeros(B * N, dtype=torch.int64, device=indices.device)
        if T:
            if int(indices.min()) < 0 or int(indices.max()) >= B * N:
                raise ContractError(reg, name, fn, f"indices lie in [0, B*N) = [0, {B * N})",
                                    f"indices from {int(indices.min())} to {int(indices.max())}")  # fmt: skip
            hits.index_add_(0, indices.long(), torch.ones_like(indices, dtype=torch.int64))
        if not torch.equal(hits, flat.to(hits.device, torch.int64)):
            raise ContractError(reg, name, fn, "indices name every kept place exactly once",
                                f"{int((hits != flat.long()).sum())} places named wrongly or twice")  # fmt: skip
        if not torch.equal(counts.long(), mask.sum(1, dtype=torch.int64).to(counts.device)):
            raise ContractError(reg, name, fn, "counts == mask.sum(1)",
                                f"counts {counts.tolist()[:8]}, mask.sum(1) {mask.sum(1).tolist()[:8]}")  # fmt: skip
        c = cu.long()
        if int(c[0]) != 0 or int(c[-1]) != T or bool((c[1:] < c[:-1]).any()):
            raise ContractError(reg, name, fn, f"cu_seqlens rises from 0 to T = {T}",
                                f"cu_seqlens {c.tolist()[:12]}{' ...' if c.numel() > 12 else ''}")  # fmt: skip
    return packed


def check_attention(out: Any, q: Tensor, name: str, fn: Any) -> Tensor:
    """A strategy's ``attend``: ``(T, H, D)`` as q, q's dtype and device. Returns ``out``."""
    if not _active():
        return out
    if not _fits(out, q.shape, q.device, q.dtype):
        raise ContractError("pack_strategy", name, fn, f"attend returns (T, H, D) = {tuple(q.shape)} {q.dtype} "
                            f"on {q.device}, as q", f"the output {_desc(out)}")  # fmt: skip
    return out


def check_attention_macs(macs: Any, name: str, fn: Any, counts: Any) -> float:
    """A strategy's ``attention_macs``: a finite number >= 0. Returns it as a float."""
    try:
        value = float(macs)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ContractError("pack_strategy", name, fn, "attention_macs returns a finite number >= 0",
                            f"{macs!r} for counts {list(counts)[:8]}")  # fmt: skip
    return value


def probe_pack_strategy(name: str, strategy: Any) -> None:
    """A pack strategy on a small ragged probe, at its registration (``PACK_STRATEGIES``; modes first
    and always): 3 images of 7 tokens keeping 0, 7 and 4, container length 3, a shuffled order. The
    round trip: every kept token packed once, at its place (``indices``), in ``order`` within its
    image, with its values unchanged; ``attend``'s output shape (on the reference kernel, ``impl="ref"``);
    ``attention_macs`` a finite number. Costs about a millisecond, on the CPU."""
    if not _active():
        return
    B, N, C = 3, 7, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, C, generator=g)
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1] = True
    mask[2, torch.tensor([0, 2, 3, 6])] = True
    order = torch.randperm(N, generator=g)
    probe_cfg = SPAConfig(pack=name, container_len=3)
    fn = strategy.pack
    # full precision and no graph, whatever the caller runs under; the probe draws from its own generator
    with checking("always"), torch.autocast("cpu", enabled=False), torch.no_grad():
        packed = check_packed(fn(x, mask, cfg=probe_cfg, order=order), x, mask, name, fn)
        _probe_round_trip(name, strategy, packed, x, mask, order, g)


def _probe_round_trip(name, strategy, packed, x, mask, order, g) -> None:
    B, N, C = x.shape
    H = 2
    fn = strategy.pack
    want = torch.cat([b * N + order[mask[b, order]] for b in range(B)])  # (T,) in order within each image
    if not torch.equal(packed.indices.long(), want):
        raise ContractError("pack_strategy", name, fn, "each image's kept tokens are packed image by image, "
                            "in the given order", f"indices {packed.indices.tolist()} for {want.tolist()} "
                            f"(probe: 3 images of 7 tokens keeping 0, 7 and 4, order {order.tolist()})")  # fmt: skip
    if not torch.equal(packed.tokens, x.reshape(B * N, C)[want]):
        raise ContractError("pack_strategy", name, fn, "tokens are x's kept rows, unchanged",
                            "other values (probe: 3 images of 7 tokens keeping 0, 7 and 4)")  # fmt: skip
    T = packed.tokens.shape[0]
    q = torch.randn(T, H, C // H, generator=g)
    out = strategy.attend(q, q, q, packed, softmax_scale=None, impl="ref", bias=None)
    check_attention(out, q, name, strategy.attend)
    counts = mask.sum(1).tolist()
    check_attention_macs(strategy.attention_macs(counts, N, C, 3), name, strategy.attention_macs, counts)
