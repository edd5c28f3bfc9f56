"""Registries: the extension points of SPA, in the manner of fvcore's ``Registry``.

Each registry maps a name to an object (a function or a class) that meets the contract written in
that registry's docstring; ``spa_core.contracts`` checks it where the core receives the object's
output, with an error naming the entry, its file and line, the rule and the shapes seen. Built-in variants register themselves with the decorator at import; plugins
(``harness.plugins``) register theirs the same way, so a grid can name either.

    @SELECTION_POLICIES.register("topk")
    def select_topk(...): ...

A duplicate name raises ``KeyError``; an unknown name raises ``KeyError`` naming the registry and
listing what it holds. ``origin(name)`` tells where an entry came from: ``"builtin"`` for spa_core's
own variants, else the plugin source that ``registering_as`` names while a plugin is imported (an
entry point, a file, a module), else the registering object's module.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from spa_core.contracts import probe_pack_strategy

__all__ = [
    "Registry",
    "SELECTION_POLICIES",
    "PACK_STRATEGIES",
    "GATES",
    "SUPERVISION_MODES",
    "MODEL_VARIANTS",
    "ALL_REGISTRIES",
    "registering_as",
]

T = TypeVar("T")

# Where entries registered right now come from (set by harness.plugins while it imports a plugin).
_ORIGIN: contextvars.ContextVar[str | None] = contextvars.ContextVar("spa_registry_origin", default=None)


@contextlib.contextmanager
def registering_as(origin: str) -> Iterator[None]:
    """Entries registered inside this block record ``origin`` (unless they pass their own)."""
    token = _ORIGIN.set(origin)
    try:
        yield
    finally:
        _ORIGIN.reset(token)


def _builtin(obj: Any) -> str | None:
    if (
        getattr(obj, "__qualname__", None) is None
    ):  # an instance: its class's module says nothing of who made it
        return None
    module = getattr(obj, "__module__", None) or ""
    return "builtin" if module.split(".")[0] == "spa_core" else None


class Registry:
    """A name -> object map that rejects duplicates and is loud about unknown names."""

    def __init__(
        self, name: str, doc: str = "", check: Callable[[str, Any, str], None] | None = None
    ) -> None:
        self._name = name
        self._check = check  # check(name, obj, origin) raises when obj does not meet the registry's contract
        self._obj: dict[str, Any] = {}
        self._origin: dict[str, str] = {}
        self.__doc__ = doc

    @property
    def name(self) -> str:
        return self._name

    def register(self, name: str | None = None, obj: Any = None, *, origin: str | None = None):
        """Register ``obj`` under ``name``; usable as ``@REG.register("x")`` or ``REG.register("x", f)``."""

        def _do(o: T) -> T:
            key = name or getattr(o, "__name__", None)
            if not key or not isinstance(key, str):
                raise ValueError(f"registry {self._name!r}: a name is required for {o!r}")
            # spa_core's own entries are "builtin" even when a plugin's import pulls them in first
            where = origin or _builtin(o) or _ORIGIN.get() or str(getattr(o, "__module__", "?"))
            if self._check is not None:
                self._check(key, o, where)
            if key in self._obj:
                raise KeyError(
                    f"registry {self._name!r}: {key!r} is already registered "
                    f"(by {self._origin[key]}); choose another name"
                )
            self._obj[key] = o
            self._origin[key] = where
            return o

        if obj is not None:
            return _do(obj)
        return _do

    def get(self, name: str) -> Any:
        try:
            return self._obj[name]
        except KeyError:
            held = ", ".join(sorted(self._obj)) or "nothing"
            raise KeyError(f"no {name!r} in registry {self._name!r}; it holds: {held}") from None

    def origin(self, name: str) -> str:
        self.get(name)
        return self._origin[name]

    def unregister(self, name: str) -> None:
        """Remove an entry (tests and plugin reloads)."""
        self.get(name)
        del self._obj[name]
        del self._origin[name]

    def __contains__(self, name: object) -> bool:
        return name in self._obj

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._obj))

    def __len__(self) -> int:
        return len(self._obj)

    def items(self) -> list[tuple[str, Any]]:
        return [(k, self._obj[k]) for k in sorted(self._obj)]

    def __repr__(self) -> str:
        return f"Registry({self._name!r}, {sorted(self._obj)})"


SELECTION_POLICIES = Registry(
    "selection_policy",
    """Selection policies: which tokens of each image an SPA block keeps.

    Contract: ``fn(scores, *, cfg, training, generator=None, tokens=None[, valid=None]) -> Selection``
      - ``scores``: (B, N) float logits of the block's gate (``GATES``), ``s = max(f(r), s_prev)``;
        a policy that ranks tokens by its own rule may ignore them;
      - ``tokens``: (B, N, C) what the gate scored: ``r = norm1(x)``, the block's input after its
        first LayerNorm (so every token has nearly the same norm);
      - ``valid`` (optional parameter): (B, N) bool, the real tokens of images padded to one batch
        (None: every token is real). A policy that takes it decides over the real tokens (counts
        them, never keeps padding); for one that does not, the block drops the padding it keeps;
      - ``cfg``: the block's ``SPAConfig`` (ratio, threshold, gumbel_tau, ...); ``training``: the
        block's mode; ``generator``: the block's own ``torch.Generator`` for any random draw (None:
        torch's global one), so a block's stream does not depend on other work;
      - returns ``spa_core.select.Selection`` with ``mask`` (B, N) bool, ``counts`` (B,) int64 equal
        to ``mask.sum(1)`` (a different count per image allowed, 0 and N included), ``weight``
        (B, N) float, finite, all on the scores' device, and ``gate_scaled`` (False for a policy whose
        places are not the gate's: its tokens are not scaled by the gate's scores).
    What the block does with it: the kept tokens (``mask``) are packed and attend; each enters
    attention as ``sigmoid(scores) * weight * r`` (``cfg.gate_scaling`` and ``gate_scaled``; without
    them ``weight * r``),
    so ``weight`` is the straight-through multiplier whose gradient reaches the gate (``gate``: value
    1 with the soft sample's gradient; ones when nothing is differentiable; a policy may return
    ``1 / sigmoid(scores)`` to cancel the scaling); the other tokens skip attention unchanged.
    The policy also runs while fvcore traces the model to count FLOPs (``torch.jit.trace``): there a
    shape such as ``scores.shape[1]`` is a 0-dim tensor, so Python arithmetic on it needs ``int()``
    first (``round(tensor)`` raises), and in-place ops with a Python scalar source (``scatter_(1, idx,
    True)``) cannot be traced: give them a tensor (``torch.ones_like(idx, dtype=torch.bool)``).
    Checked where ``spa_core.select.select_tokens`` receives it (``spa_core.contracts``).
    """,
)


def _check_pack_strategy(name: str, obj: Any, origin: str) -> None:
    missing = [a for a in ("pack", "attend", "attention_macs") if not callable(getattr(obj, a, None))]
    if missing:
        raise TypeError(
            f"registry 'pack_strategy': {name!r} must be a spa_core.strategies.PackStrategy (pack, attend and "
            f"attention_macs, its FLOP formula, which the harness's analytic counts read); missing: "
            f"{', '.join(missing)}"
        )
    if origin != "builtin":  # the built-ins' probe is a test (tests/spa_core/test_contracts.py)
        probe_pack_strategy(name, obj)  # its round trip on a small probe, before anything runs it


PACK_STRATEGIES = Registry(
    "pack_strategy",
    """Pack strategies: how the selected tokens of a batch are laid out for attention, and what that costs.

    Contract: a ``spa_core.strategies.PackStrategy`` (anything with these three callables; one
    without them is refused at registration):
      - ``pack(x, mask, *, cfg, order) -> spa_core.pack.PackedTokens``: ``x`` (B, N, C) tokens (the
        gate-scaled ``r``), ``mask`` (B, N) bool selection, ``cfg`` the block's ``SPAConfig``,
        ``order`` (N,) a permutation of the positions (the block's shifted-window order) or None:
        each image's kept tokens are packed in that order. The result carries ``tokens (T, C)``,
        ``cu_seqlens (S+1,) int32``, ``max_seqlen``, ``indices (T,)`` into the flattened (B*N) raster
        grid, ``seq_image (S,)``, ``counts (B,)`` and ``strategy`` (this entry's name);
      - ``attend(q, k, v, packed, *, softmax_scale, impl, bias) -> (T, H, D)``: attention within each
        sequence of ``packed`` (q, k, v: (T, H, D) projections of ``packed.tokens``; ``bias`` a
        ``kernels.position_bias.PositionBias`` or None, to apply to every pair it lets attend;
        ``impl`` the kernel switch). The block projects the result and ``spa_core.pack.unpack``
        scatters it back as a residual on the kept tokens; the others pass unchanged;
      - ``attention_macs(counts, num_tokens, dim, container_len) -> float``: multiply-adds of what one
        SPA block's gate scorer, projections and attention run with this strategy, for a batch whose
        images keep ``counts`` of ``num_tokens`` tokens of ``dim`` channels (the harness's
        ``analytic_attn_gmacs`` column, checked against fvcore's count; a finite number >= 0).
    Checked where the core receives them (``spa_core.contracts``): a probe at registration (3 images
    of 7 tokens keeping 0, 7 and 4; each kept token packed once, at its place, in ``order``, values
    unchanged; ``attend``'s shape; ``attention_macs`` finite), and every pack's fields and shapes.
    """,
    check=_check_pack_strategy,
)

GATES = Registry(
    "gate",
    """Gates: modules that score every token of an SPA block.

    Contract: a ``torch.nn.Module`` class constructed as ``cls(dim, cfg)`` whose forward is
    ``(x (B, N, C), prev_scores (B, N) | None) -> scores (B, N)`` floating-point logits without NaN,
    on x's device; ``prev_scores`` is the previous SPA block's score map already resized to this
    block's resolution. Checked where ``spa_core.block.SPABlock`` receives them.
    """,
)

SUPERVISION_MODES = Registry(
    "supervision_mode",
    """Gate supervision modes: the auxiliary loss on the gate logits.

    Contract: ``fn(blocks, labels, *, alpha) -> scalar tensor``
      - ``blocks``: list of ``spa_core.block.SPABlockInfo``, one per SPA block in forward order, with
        ``.logits`` (B, N) gate logits in raster order over ``.grid`` (H, W), ``.mask`` (B, N) bool
        kept tokens, ``.counts`` (B,) int64, ``.kept_fraction`` (0-dim tensor), ``.stage`` (1-based)
        and ``.index`` (block within the stage); empty for a model without SPA blocks;
      - ``labels``: dict mapping a grid (H, W) to (B, H, W) float selection labels (1: an object
        pixel falls in the token), or None;
      - ``alpha``: the config's weight (``SPAConfig.alpha``);
      - returns the weighted loss to add to the task loss (zero for ``none``): a finite
        floating-point tensor of shape (), on the logits' graph so that it trains the gate. Checked
        where ``spa_core.loss.gate_loss`` receives it.
    """,
)

MODEL_VARIANTS = Registry(
    "model_variant",
    """Model variants: builders of a backbone from a ``BackboneConfig``.

    Contract: ``fn(cfg: BackboneConfig) -> torch.nn.Module`` whose forward is
    ``images (B, 3, H, W) -> spa_core.backbone.BackboneOutput`` (stage features and per-SPA-block infos).
    """,
)

ALL_REGISTRIES: dict[str, Registry] = {
    r.name: r for r in (SELECTION_POLICIES, PACK_STRATEGIES, GATES, SUPERVISION_MODES, MODEL_VARIANTS)
}
