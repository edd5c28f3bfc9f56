"""Grid files: finding one, reading it into a ``Spec`` and merging it with the grids it ``extends``.

``find_grid`` looks for a grid path relative to the grid that names it, the working directory and the
built-in grids (``BUILTIN_GRIDS_DIR``, also by bare name). ``load_spec`` reads one file's top-level keys
(``TOP_LEVEL_KEYS``), checks their shape and follows ``extends`` (a cycle is an error); ``merge_diff``
lays one dotted config diff over another. The merge rules (``base``/``resources`` by dotted key, ``axes``
by axis, ``plugins`` appended, the rest replaced when given) are ``harness.grid``'s format. Config keys
and values are checked later (``harness.grid.checks``), once plugins have registered their names.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.grid.checks import check_plain, is_config_key
from harness.grid.comparisons import (
    EXPECTED_CONTRASTS,
    EXPECTED_MARGIN,
    Contrast,
    read_contrasts,
    read_margin,
)
from harness.grid.yaml_lines import Doc, GridError, Loc, Val
from harness.plugins import PluginError, resolve_plugin_spec

__all__ = [
    "BUILTIN_GRIDS_DIR",
    "MAX_TRIALS",
    "TOP_LEVEL_KEYS",
    "Axis",
    "AxisValue",
    "Plugin",
    "Point",
    "Spec",
    "find_grid",
    "load_spec",
    "merge_diff",
]

BUILTIN_GRIDS_DIR = Path(__file__).resolve().parents[2] / "ablations" / "grids"

TOP_LEVEL_KEYS = {
    "name": "a string",
    "description": "a string",
    "extends": "a grid file path",
    "base": "a mapping of trial config keys",
    "resources": "a mapping of resources.* keys (workers, cpus_per_worker, gpus_per_worker, timeout_s, retries)",
    "axes": "a mapping: dotted config key -> list of values, or axis name -> {label: config diff}",
    "points": "a list of config diffs (mappings), each an extra trial",
    "exclude": "a list of rules (mappings: config key or axis name -> value or list of values)",
    "seeds": "a positive count or a list of distinct integers",
    "plugins": "a list of dotted modules or .py file paths",
    "equivalence_margin": EXPECTED_MARGIN,
    "contrasts": EXPECTED_CONTRASTS,
}

# More trials than this is a typo (seeds: 1000000), not a grid; refused before anything is built.
MAX_TRIALS = 10_000


@dataclass
class AxisValue:
    """One value of an axis: its label (part of trial names) and the config diff it sets."""

    label: str
    diff: dict[str, Val]  # dotted key -> value


@dataclass
class Axis:
    """An axis as a file declares it: a config key with its values, or a named axis of labelled diffs."""

    key: str
    values: list[AxisValue]
    loc: Loc
    named: bool  # a named axis (labelled diffs) rather than a config key


@dataclass
class Point:
    """An extra trial: a config diff over base, not crossed with the axes."""

    name: str | None
    diff: dict[str, Val]
    loc: Loc


@dataclass
class Plugin:
    """A plugin spec, resolved (an absolute file path or a dotted module), and where it was named."""

    spec: str
    loc: Loc


@dataclass
class Spec:
    """A grid file read, and merged with the grids it extends: every value with its place; what
    ``harness.grid.expand`` turns into trials."""

    loc: Loc
    name: str | None = None
    description: str | None = None
    base: dict[str, Val] = field(default_factory=dict)
    axes: dict[str, Axis | None] = field(default_factory=dict)
    points: list[Point] | None = None
    exclude: list[tuple[Loc, dict[str, Val]]] | None = None
    seeds: Val | None = None
    plugins: list[Plugin] = field(default_factory=list)
    margin: Val | None = None  # equivalence_margin
    contrasts: list[tuple[Contrast, Loc]] | None = None
    names_trials: bool = False  # has base:, axes: or points: (itself or through extends)
    files: list[Path] = field(default_factory=list)  # this grid's file, then each it extends, in order


def find_grid(path: str | Path, base_dir: Path | None, loc: Loc | None) -> Path:
    """The grid file ``path`` names, resolved: as given when absolute, else relative to ``base_dir`` (the
    folder of the grid naming it), the working directory or the built-in grids (with or without
    ``.yaml``). ``GridError`` listing where it looked, at ``loc`` when a grid named the path."""
    p = Path(path).expanduser()
    candidates = [p] if p.is_absolute() else []
    if not p.is_absolute():
        if base_dir is not None:
            candidates.append(base_dir / p)
        candidates.append(Path.cwd() / p)
        candidates += [BUILTIN_GRIDS_DIR / p, BUILTIN_GRIDS_DIR / f"{p}.yaml"]
    candidates = list(dict.fromkeys(c.resolve() for c in candidates))
    for c in candidates:
        if c.is_file():
            return c
    tried = ", ".join(str(c) for c in candidates)
    msg = f"grid file {str(path)!r} does not exist (looked at: {tried})"
    if loc is not None:
        raise loc.error(msg)
    raise GridError(msg, file=path)


def load_spec(file: Path, chain: tuple[Path, ...]) -> Spec:
    """``file`` read and merged over the grids it extends; ``chain``: the files extending it (a file
    met twice is a cycle). ``GridError`` at the first key of a wrong shape."""
    doc = Doc(file)
    data = doc.data
    if data is None:  # ``---`` or ``null`` alone
        raise GridError(
            "the grid file is empty (a grid is a mapping with base:, axes: or points:)", file=file
        )
    if not isinstance(data, dict):
        raise GridError(
            f"a grid is a mapping with keys {', '.join(TOP_LEVEL_KEYS)}; got {type(data).__name__}",
            file=file,
            line=1,
        )
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise doc.loc((key,)).error(
                f"unknown top-level key; expected one of: {', '.join(TOP_LEVEL_KEYS)}"
            )
    spec = Spec(loc=Loc(file, 1, "<grid>"), files=[file])

    for key in ("name", "description"):
        if key in data:
            if not isinstance(data[key], str):
                raise doc.loc((key,)).error(f"expected a string, got {data[key]!r}")
            setattr(spec, key, data[key])
    if spec.name is not None:
        check_plain(spec.name, doc.loc(("name",)), "the grid's name (its experiment's folder)")
    spec.names_trials = "base" in data or bool(data.get("axes")) or bool(data.get("points"))

    if "plugins" in data:
        raw = data["plugins"]
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list):
            raise doc.loc(("plugins",)).error(f"expected {TOP_LEVEL_KEYS['plugins']}, got {raw!r}")
        for i, s in enumerate(items):
            loc = doc.loc(("plugins", i) if isinstance(raw, list) else ("plugins",), "plugins")
            if not isinstance(s, str):
                raise loc.error(f"expected a dotted module or a .py file path, got {s!r}")
            try:
                spec.plugins.append(Plugin(resolve_plugin_spec(s, file.parent), loc))
            except PluginError as e:
                raise loc.error(str(e)) from None

    if "base" in data:
        spec.base.update(_diff(doc, data["base"], ("base",)))
    if "resources" in data:
        spec.base.update(_diff(doc, data["resources"], ("resources",), prefix="resources"))

    if "axes" in data:
        axes = data["axes"]
        if not isinstance(axes, dict):
            raise doc.loc(("axes",)).error(f"expected {TOP_LEVEL_KEYS['axes']}, got {axes!r}")
        for key, values in axes.items():
            spec.axes[key] = _axis(doc, key, values)

    if "points" in data:
        pts = data["points"]
        if not isinstance(pts, list):
            raise doc.loc(("points",)).error(f"expected {TOP_LEVEL_KEYS['points']}, got {pts!r}")
        spec.points = []
        for i, p in enumerate(pts):
            path = ("points", i)
            if not isinstance(p, dict) or not p:
                raise doc.loc(path).error(f"a point is a non-empty mapping of config keys, got {p!r}")
            diff = _diff(doc, p, path)
            name = diff.pop("name").value if "name" in diff else None
            spec.points.append(Point(name, diff, doc.loc(path)))

    if "exclude" in data:
        ex = data["exclude"]
        if not isinstance(ex, list):
            raise doc.loc(("exclude",)).error(f"expected {TOP_LEVEL_KEYS['exclude']}, got {ex!r}")
        spec.exclude = []
        for i, rule in enumerate(ex):
            path = ("exclude", i)
            if not isinstance(rule, dict) or not rule:
                raise doc.loc(path).error(f"a rule is a non-empty mapping (key: value or list), got {rule!r}")
            spec.exclude.append((doc.loc(path), {k: Val(v, doc.loc(path + (k,))) for k, v in rule.items()}))

    if "equivalence_margin" in data:
        spec.margin = read_margin(doc, data["equivalence_margin"])
    if "contrasts" in data:
        spec.contrasts = read_contrasts(doc, data["contrasts"])

    if "seeds" in data:
        s = data["seeds"]
        loc = doc.loc(("seeds",))
        if isinstance(s, int) and not isinstance(s, bool):
            if not 1 <= s <= MAX_TRIALS:
                raise loc.error(f"expected a positive count up to {MAX_TRIALS}, got {s}")
            seeds = list(range(s))
        elif isinstance(s, list) and s and all(isinstance(x, int) and not isinstance(x, bool) for x in s):
            if len(set(s)) != len(s):
                raise loc.error(f"seeds repeat: {s}")
            seeds = list(s)
        else:
            raise loc.error(f"expected {TOP_LEVEL_KEYS['seeds']}, got {s!r}")
        spec.seeds = Val(seeds, loc)

    if "extends" in data:
        ext = data["extends"]
        loc = doc.loc(("extends",))
        if not isinstance(ext, str):
            raise loc.error(f"expected a grid file path, got {ext!r}")
        parent_file = find_grid(ext, file.parent, loc)
        if parent_file in chain or parent_file == file:
            cycle = " -> ".join(str(c) for c in (*chain, file, parent_file))
            raise loc.error(f"extends forms a cycle: {cycle}")
        parent = load_spec(parent_file, (*chain, file))
        spec = _merge(parent, spec)
    return spec


def _diff(doc: Doc, data: Any, path: tuple, prefix: str = "") -> dict[str, Val]:
    """A (possibly nested, possibly dotted) mapping of config keys -> flat dotted key -> value."""
    if not isinstance(data, dict):
        raise doc.loc(path).error(f"expected a mapping of trial config keys, got {data!r}")
    out: dict[str, Val] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(_diff(doc, v, path + (k,), key))
        else:
            out[key] = Val(v, doc.loc(path + (k,), key))
    return out


def _axis(doc: Doc, key: str, values: Any) -> Axis | None:
    path = ("axes", key)
    loc = doc.loc(path, key)
    if values is None:
        return None  # removes an inherited axis
    if isinstance(values, list):
        if not values:
            raise loc.error("an axis needs at least one value")
        vals = []
        for i, v in enumerate(values):
            vals.append(AxisValue(_label(v), {key: Val(v, doc.loc(path + (i,), key))}))
        labels = [v.label for v in vals]
        if len(set(labels)) != len(labels):
            raise loc.error(f"values repeat: {values}")
        return Axis(key, vals, loc, named=False)
    if isinstance(values, dict):
        if not values:
            raise loc.error("an axis needs at least one value")
        if is_config_key(key):
            raise loc.error(f"{key} is a config key: expected a list of its values, got a mapping")
        vals = []
        for label, diff in values.items():
            vpath = path + (label,)
            check_plain(
                str(label), doc.loc(vpath, f"{key}.{label}"), "a named axis's label (part of trial names)"
            )
            if not isinstance(diff, dict) or not diff:
                raise doc.loc(vpath, f"{key}.{label}").error(
                    f"a named axis value is a non-empty mapping of config keys, got {diff!r}"
                )
            vals.append(AxisValue(str(label), _diff(doc, diff, vpath)))
        return Axis(key, vals, loc, named=True)
    raise loc.error(
        f"expected a list of values (config key axis) or a mapping label -> config diff "
        f"(named axis), got {values!r}"
    )


def _label(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "-".join(_label(x) for x in v) or "none"
    if v is None:
        return "none"
    return str(v)


def _merge(parent: Spec, child: Spec) -> Spec:
    out = copy.copy(parent)
    out.loc = child.loc
    out.name = child.name  # the name is the child file's, never inherited
    out.description = child.description if child.description is not None else parent.description
    out.base = merge_diff(parent.base, child.base)
    out.axes = {**parent.axes}
    for k, a in child.axes.items():
        if a is None:
            out.axes.pop(k, None)
        else:
            out.axes[k] = a
    out.points = child.points if child.points is not None else parent.points
    out.exclude = child.exclude if child.exclude is not None else parent.exclude
    out.seeds = child.seeds or parent.seeds
    out.plugins = parent.plugins + child.plugins
    out.margin = child.margin if child.margin is not None else parent.margin
    out.contrasts = child.contrasts if child.contrasts is not None else parent.contrasts
    out.names_trials = parent.names_trials or child.names_trials
    out.files = child.files + parent.files
    return out


def merge_diff(a: dict[str, Val], b: dict[str, Val]) -> dict[str, Val]:
    """``b`` over ``a`` by dotted key: a key in ``b`` replaces the same key and any above or below it."""
    out = dict(a)
    for k, v in b.items():
        for old in list(out):
            if old == k or old.startswith(k + ".") or k.startswith(old + "."):
                del out[old]
        out[k] = v
    return out
