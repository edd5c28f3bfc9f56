"""How the report judges a grid's rows beyond each against its baseline: the equivalence margin of the
primary metric and the contrasts (paired comparisons between two variants).

``Comparisons`` (with its ``Contrast`` pairs) changes no trial: ``Grid.comparisons`` carries it to the
run, which writes it into the experiment's ``experiment.json``, and ``harness.report.stats`` judges the
rows by it. ``read_margin`` and ``read_contrasts`` read one grid file's ``equivalence_margin:`` and
``contrasts:`` and check their shape; ``checked_comparisons`` checks, once the grid is expanded, that
every contrast names variants the grid has, at the line of the contrast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from harness.grid.yaml_lines import Doc, Loc, Val

__all__ = [
    "EXPECTED_CONTRASTS",
    "EXPECTED_MARGIN",
    "Comparisons",
    "Contrast",
    "checked_comparisons",
    "read_contrasts",
    "read_margin",
]

# What the two top-level keys hold (``harness.grid.spec.TOP_LEVEL_KEYS`` lists them with the others).
EXPECTED_MARGIN = (
    "a positive number: the absolute difference of the primary metric (mAP) "
    "below which two variants count as equivalent"
)
EXPECTED_CONTRASTS = "a list of [variant, variant] pairs, or a mapping label -> [variant, variant]"


@dataclass(frozen=True)
class Contrast:
    """A paired comparison the grid declares: ``a``'s metric minus ``b``'s, per seed."""

    label: str
    a: str  # a variant's trial name
    b: str


@dataclass(frozen=True)
class Comparisons:
    """How the report judges a grid's rows beyond each against its baseline: the equivalence margin
    of the primary metric (absolute; None: no variant can be called equivalent) and the contrasts."""

    equivalence_margin: float | None = None
    contrasts: tuple[Contrast, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what ``experiment.json`` holds under ``report``)."""
        return {
            "equivalence_margin": self.equivalence_margin,
            "contrasts": [{"label": c.label, "a": c.a, "b": c.b} for c in self.contrasts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Comparisons:
        """The inverse of ``to_dict``; ``ValueError`` naming what is wrong in ``data``."""
        if not data:
            return cls()
        if not isinstance(data, Mapping):
            raise ValueError(f"comparisons: expected a mapping, got {data!r}")
        margin = data.get("equivalence_margin")
        problem = _margin_problem(margin) if margin is not None else None
        if problem:
            raise ValueError(f"equivalence_margin: {problem}")
        contrasts = []
        for c in data.get("contrasts") or []:
            if not (isinstance(c, Mapping) and all(isinstance(c.get(k), str) for k in ("label", "a", "b"))):
                raise ValueError(f"contrasts: expected mappings with label, a, b (strings), got {c!r}")
            contrasts.append(Contrast(c["label"], c["a"], c["b"]))
        return cls(None if margin is None else float(margin), tuple(contrasts))


def _margin_problem(margin: Any) -> str | None:
    if isinstance(margin, bool) or not isinstance(margin, int | float):
        return f"expected {EXPECTED_MARGIN}, got {margin!r}"
    if not (math.isfinite(margin) and margin > 0):
        return f"expected a positive finite number, got {margin!r}"
    return None


def read_margin(doc: Doc, raw: Any) -> Val:
    """A file's ``equivalence_margin:`` (``raw``) as a float at its line; ``GridError`` if it is not a
    positive finite number."""
    loc = doc.loc(("equivalence_margin",))
    problem = _margin_problem(raw)
    if problem:
        raise loc.error(problem)
    return Val(float(raw), loc)


def read_contrasts(doc: Doc, raw: Any) -> list[tuple[Contrast, Loc]]:
    """A file's ``contrasts:`` (``raw``), each with its line, checked for shape (the variants' names:
    ``checked_comparisons``). ``null`` is no contrasts (it removes an extended grid's)."""
    if raw is None:
        return []
    if isinstance(raw, list):
        items = [(None, pair, ("contrasts", i)) for i, pair in enumerate(raw)]
    elif isinstance(raw, dict):
        items = [(label, pair, ("contrasts", label)) for label, pair in raw.items()]
    else:
        raise doc.loc(("contrasts",)).error(f"expected {EXPECTED_CONTRASTS}, got {raw!r}")
    contrasts = []
    seen: set[str] = set()
    for label, pair, path in items:
        loc = doc.loc(path)
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, str) and v for v in pair)):
            raise loc.error(f"a contrast is a pair of variant names [a, b] (a - b per seed), got {pair!r}")
        a, b = pair
        if a == b:
            raise loc.error(f"a contrast compares two different variants, got [{a}, {b}]")
        label = f"{a} vs {b}" if label is None else label
        if label in seen:
            raise loc.error(f"the contrast {label!r} is declared twice")
        seen.add(label)
        contrasts.append((Contrast(label, a, b), loc))
    return contrasts


def checked_comparisons(
    margin: Val | None, contrasts: list[tuple[Contrast, Loc]] | None, names: list[str]
) -> Comparisons:
    """The grid's ``Comparisons`` from its merged margin and contrasts; a contrast naming a variant
    that is not among ``names`` (the expanded grid's) is an error at its line."""
    known = set(names)
    for c, loc in contrasts or []:
        for v in (c.a, c.b):
            if v not in known:
                raise loc.error(
                    f"unknown variant {v!r} in a contrast; the grid's variants: {', '.join(names)}"
                )
    return Comparisons(margin.value if margin is not None else None, tuple(c for c, _ in contrasts or []))
