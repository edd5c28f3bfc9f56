"""Grid files: what an ablation runs, expanded into fully resolved trial configs.

A grid is one YAML file (the built-in ones live in ``ablations/grids/``)::

    name: my-ablation                 # default: the file's stem
    description: SPA vs dense at two ratios
    extends: default.yaml             # another grid (relative to this file, or a built-in's name);
                                      # this file changes only what differs
    plugins: [plugins/feature_norm.py, my_pkg.variants]   # dotted modules or .py files to import
    base:                             # TrialConfig keys, nested or dotted (``train.steps: 40``)
      preset: micro
      model.spa.selection: topk
    resources: {workers: 1, cpus_per_worker: 1}           # shorthand for base ``resources.*``
    axes:                             # crossed; a key is a dotted path into the trial config ...
      model.spa.ratio: [0.25, 0.5]
      model.spa.pack: [containers, varlen]
      selection:                      # ... or a named axis whose values are labelled config diffs
        topk50: {model.spa.selection: topk, model.spa.ratio: 0.5}
        gate: {model.spa.selection: gate}
    exclude:                          # drop crossed points matching every key of a rule
      - {model.spa.pack: varlen, model.spa.ratio: 0.25}   # a value may be a list: any of them
    points:                           # extra trials: diffs over base, not crossed with the axes
      - {name: dense, model.variant: dense}
    seeds: 3                          # a count (seeds 0..2) or a list of seeds; every trial repeats
    equivalence_margin: 0.01          # |delta mAP| below this is no difference that matters (the report)
    contrasts:                        # paired comparisons between two variants besides the baseline's:
      - [gate, gate-random]           # gate - gate-random per seed, labelled "gate vs gate-random"
    # or a mapping label -> pair:  contrasts: {where-the-gate-looks: [gate, gate-random]}

Merging under ``extends``: ``base``/``resources`` by dotted key (a child key replaces the parent's
key and anything under or over it), ``axes`` by axis (``null`` removes a parent's axis), ``plugins``
appended, ``points``/``exclude``/``seeds``/``name``/``description``/``equivalence_margin``/
``contrasts`` replaced when given. A base key
that an axis overrides in every value reaches no crossed trial: ``Grid.warnings`` names both places
(``_overridden_base_keys``), and the command line prints it.

``equivalence_margin`` and ``contrasts`` change no trial: they say how the report judges the rows
(``harness.report.stats``) and travel to it in ``Grid.comparisons`` (the run writes them into the
experiment's ``experiment.json``). A contrast names two variants of the grid (points or crossed
trials, by trial name); a name the grid does not have is an error at the contrast's line.

Every trial is ``base`` + one value per axis (or one point) + its seed, resolved with
``harness.config.trial_from_dict``; its ``name`` is the point's name, or one part per axis joined by
commas (``ratio=0.25`` for a config key, the bare label for a named axis), the same for all seeds of
a variant, so a report groups by it, its ``plugins`` the absolute specs to load
before building it, and, when the grid has a dense variant (``model.variant: dense``), its
``baseline`` that variant's name, model and head (not hashed): what its speedup is timed against.
Anything wrong (an empty file, a top level that is not a mapping, a grid that names no trial: no
``base``, ``axes`` or ``points`` of its own or inherited; an unknown top-level key or config key, a
wrong type, a name no registry holds, a file that does not exist, an exclude rule that matches
nothing, two trials with the same config, a contrast naming a variant the grid does not have)
raises ``GridError`` naming the file, the line and the key and what was expected, before anything
runs.

Names that become parts of paths are plain names (``harness.names``: letters, digits and
``. _ - = , +``, not starting with ``.``, at most 100 characters): the grid's ``name`` (or its
file's stem), each point's ``name`` and each label of a named axis. A crossed trial's name is made
of its labels; where it names a folder it is mapped onto a plain name.

Reading, merging, checking and expanding share the located values (``_Val``, ``_Loc``: a value and
the file, line and key an error about it names).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.config import (
    BaselineConfig,
    TrialConfig,
    config_hash,
    flatten_config,
    get_dotted,
    set_dotted,
    trial_from_dict,
    trial_to_dict,
)
from harness.names import name_problem
from harness.plugins import (
    PluginError,
    load_entry_point_plugins,
    load_plugin,
    plugin_sources,
    resolve_plugin_spec,
)
from spa_core.config import ConfigError, config_rules, rule_problem

__all__ = ["Grid", "GridError", "load_grid", "Comparisons", "Contrast", "BUILTIN_GRIDS_DIR", "TOP_LEVEL_KEYS"]

BUILTIN_GRIDS_DIR = Path(__file__).resolve().parent.parent / "ablations" / "grids"

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
    "equivalence_margin": "a positive number: the absolute difference of the primary metric (mAP) "
    "below which two variants count as equivalent",
    "contrasts": "a list of [variant, variant] pairs, or a mapping label -> [variant, variant]",
}

_DEFAULTS = trial_to_dict(TrialConfig())  # every config key (the default model has an spa section)

# What each config key may hold, declared once on the config dataclasses (``checked_field``): registry
# names (checked after plugins load), fixed choices, numeric ranges.
_RULES = config_rules(TrialConfig)


# More trials than this is a typo (seeds: 1000000), not a grid; refused before anything is built.
_MAX_TRIALS = 10_000


class GridError(ValueError):
    """A grid file is wrong; the message reads ``file:line: key: what was expected``."""

    def __init__(
        self, message: str, *, file: str | Path | None = None, line: int | None = None, key: str | None = None
    ) -> None:
        message = " ".join(message.split())  # one line, whatever the message was made of
        self.file, self.line, self.key, self.detail = (str(file) if file else None), line, key, message
        where = f"{file}:{line}" if file and line else str(file) if file else ""
        text = f"{key}: {message}" if key else message
        super().__init__(f"{where}: {text}" if where else text)


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


@dataclass
class Grid:
    """An expanded grid: ``trials`` are fully resolved, ready to run (one per variant and seed)."""

    name: str
    description: str
    source: Path
    trials: list[TrialConfig]
    axes: dict[str, list[str]] = field(default_factory=dict)  # axis key -> value labels, in order
    base: dict[str, Any] = field(default_factory=dict)  # flat dotted overrides of the TrialConfig defaults
    seeds: list[int] = field(default_factory=lambda: [0])
    plugins: list[str] = field(default_factory=list)  # resolved specs (absolute file paths, modules)
    labels: dict[str, dict[str, str]] = field(default_factory=dict)  # trial name -> {axis: value label}
    comparisons: Comparisons = field(default_factory=Comparisons)  # margin and contrasts for the report
    # ``file:line: ...`` lines for what the grid sets but no trial uses (an axis overriding a base key)
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.trials)

    def __iter__(self) -> Iterator[TrialConfig]:
        return iter(self.trials)

    def table(self) -> Any:
        """One row per trial: name, seed, config hash, resources, and its value on every axis."""
        import pandas as pd

        rows = []
        for t in self.trials:
            r = t.resources
            row = {
                "name": t.name,
                "seed": t.seed,
                "config_hash": config_hash(t),
                "workers": r.workers,
                "cpus": r.workers * r.cpus_per_worker,
                "gpus": r.workers * r.gpus_per_worker,
            }
            row.update(self.labels.get(t.name, {}))
            rows.append(row)
        return pd.DataFrame(rows)


def load_grid(
    path: str | Path, *, extra_plugins: Iterable[str] = (), overrides: Mapping[str, Any] | None = None
) -> Grid:
    """Read, validate and expand a grid file.

    ``extra_plugins``: more plugin specs (``--plugin``), relative to the working directory.
    ``overrides``: dotted keys set on every trial last (``--smoke`` passes ``smoke_overrides()``).
    Raises ``GridError``; nothing is run or written.
    """
    spec = _load_spec(_find_grid(path, None, None), ())
    plugins = list(spec.plugins)
    for p in extra_plugins:
        try:
            plugins.append(_Plugin(resolve_plugin_spec(p), _Loc(None, None, "--plugin")))
        except PluginError as e:
            raise GridError(str(e), key="--plugin") from None
    try:
        load_entry_point_plugins()
    except PluginError as e:
        raise GridError(str(e), file=spec.loc.file, key="plugins") from None
    for p in plugins:
        try:
            load_plugin(p.spec)
        except PluginError as e:
            raise GridError(str(e), file=p.loc.file, line=p.loc.line, key=p.loc.key) from None
    return _expand(spec, _dedupe([p.spec for p in plugins]), dict(overrides or {}))


# --- reading YAML with line numbers -----------------------------------------------------------------
# PyYAML's node tree already carries the line of every key; ``_Doc`` walks it once. ruamel.yaml's
# round-trip loader (``.lc.key``/``.lc.item``) was tried in its place (2026-12, all four built-in grids,
# test_grid.py and test_grid_fuzz.py): the walk stays (keys must be strings; its ScalarFloat,
# TaggedScalar and HexInt values must become plain Python before they reach a config), it reads YAML
# 1.2 unless pinned to 1.1 (``yes``, ``1e-3`` change meaning), its duplicate-key error loses the key's
# path, and it parses 2-9x slower (median of 45 parses: default.yaml 12.8 -> 29.2 ms, smoke.yaml 1.5 ->
# 11.6 ms). 47 lines against 64, for a new dependency and a worse error: not simpler, so not used.


@dataclass(frozen=True)
class _Loc:
    file: Path | None
    line: int | None
    key: str

    def error(self, message: str, key: str | None = None) -> GridError:
        key = key or self.key
        if message.startswith(f"{key}: "):  # ConfigError already names the key
            message = message[len(key) + 2 :]
        return GridError(message, file=self.file, line=self.line, key=key)


@dataclass
class _Val:
    value: Any
    loc: _Loc


@dataclass
class _AxisValue:
    label: str
    diff: dict[str, _Val]  # dotted key -> value


@dataclass
class _Axis:
    key: str
    values: list[_AxisValue]
    loc: _Loc
    named: bool  # a named axis (labelled diffs) rather than a config key


@dataclass
class _Point:
    name: str | None
    diff: dict[str, _Val]
    loc: _Loc


@dataclass
class _Plugin:
    spec: str
    loc: _Loc


@dataclass
class _Spec:
    loc: _Loc
    name: str | None = None
    description: str | None = None
    base: dict[str, _Val] = field(default_factory=dict)
    axes: dict[str, _Axis | None] = field(default_factory=dict)
    points: list[_Point] | None = None
    exclude: list[tuple[_Loc, dict[str, _Val]]] | None = None
    seeds: _Val | None = None
    plugins: list[_Plugin] = field(default_factory=list)
    margin: _Val | None = None  # equivalence_margin
    contrasts: list[tuple[Contrast, _Loc]] | None = None
    names_trials: bool = False  # has base:, axes: or points: (itself or through extends)
    files: list[Path] = field(default_factory=list)  # this grid's file, then each it extends, in order


class _Doc:
    """A YAML document as plain Python plus the line of every key path."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.lines: dict[tuple, int] = {(): 1}
        try:
            text = file.read_text()
        except OSError as e:
            raise GridError(f"cannot read the grid file: {e.strerror or e}", file=file) from None
        loader = None
        try:
            loader = yaml.SafeLoader(text)  # reads the text's first characters: may raise too
            node = loader.get_single_node()
            if node is None:
                raise GridError(
                    "the grid file is empty (a grid is a mapping with base:, axes: or points:)", file=file
                )
            self.data = self._construct(loader, node, ())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
            raise GridError(
                f"not valid YAML: {problem}", file=file, line=mark.line + 1 if mark else None
            ) from None
        finally:
            if loader is not None:
                loader.dispose()

    def _construct(self, loader: yaml.SafeLoader, node: yaml.Node, path: tuple) -> Any:
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
            out: dict[Any, Any] = {}
            for k_node, v_node in node.value:
                key = loader.construct_object(k_node, deep=True)
                line = k_node.start_mark.line + 1
                if not isinstance(key, str):
                    raise GridError(
                        f"keys must be strings, got {key!r}",
                        file=self.file,
                        line=line,
                        key=_dotted(path) or "<top level>",
                    )
                if key in out:
                    raise GridError(
                        "duplicate key (YAML keeps only the last one; write it once)",
                        file=self.file,
                        line=line,
                        key=_dotted(path + (key,)),
                    )
                self.lines[path + (key,)] = line
                out[key] = self._construct(loader, v_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            out_list = []
            for i, item in enumerate(node.value):
                self.lines[path + (i,)] = item.start_mark.line + 1
                out_list.append(self._construct(loader, item, path + (i,)))
            return out_list
        return loader.construct_object(node, deep=True)

    def loc(self, path: tuple, key: str | None = None) -> _Loc:
        p = path
        while p not in self.lines:
            p = p[:-1]
        return _Loc(self.file, self.lines[p], key if key is not None else _dotted(path))


def _dotted(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# --- parsing one file --------------------------------------------------------------------------------


def _find_grid(path: str | Path, base_dir: Path | None, loc: _Loc | None) -> Path:
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


def _load_spec(file: Path, chain: tuple[Path, ...]) -> _Spec:
    doc = _Doc(file)
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
    spec = _Spec(loc=_Loc(file, 1, "<grid>"), files=[file])

    for key in ("name", "description"):
        if key in data:
            if not isinstance(data[key], str):
                raise doc.loc((key,)).error(f"expected a string, got {data[key]!r}")
            setattr(spec, key, data[key])
    if spec.name is not None:
        _check_plain(spec.name, doc.loc(("name",)), "the grid's name (its experiment's folder)")
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
                spec.plugins.append(_Plugin(resolve_plugin_spec(s, file.parent), loc))
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
            spec.points.append(_Point(name, diff, doc.loc(path)))

    if "exclude" in data:
        ex = data["exclude"]
        if not isinstance(ex, list):
            raise doc.loc(("exclude",)).error(f"expected {TOP_LEVEL_KEYS['exclude']}, got {ex!r}")
        spec.exclude = []
        for i, rule in enumerate(ex):
            path = ("exclude", i)
            if not isinstance(rule, dict) or not rule:
                raise doc.loc(path).error(f"a rule is a non-empty mapping (key: value or list), got {rule!r}")
            spec.exclude.append((doc.loc(path), {k: _Val(v, doc.loc(path + (k,))) for k, v in rule.items()}))

    _read_comparisons(doc, data, spec)

    if "seeds" in data:
        s = data["seeds"]
        loc = doc.loc(("seeds",))
        if isinstance(s, int) and not isinstance(s, bool):
            if not 1 <= s <= _MAX_TRIALS:
                raise loc.error(f"expected a positive count up to {_MAX_TRIALS}, got {s}")
            seeds = list(range(s))
        elif isinstance(s, list) and s and all(isinstance(x, int) and not isinstance(x, bool) for x in s):
            if len(set(s)) != len(s):
                raise loc.error(f"seeds repeat: {s}")
            seeds = list(s)
        else:
            raise loc.error(f"expected {TOP_LEVEL_KEYS['seeds']}, got {s!r}")
        spec.seeds = _Val(seeds, loc)

    if "extends" in data:
        ext = data["extends"]
        loc = doc.loc(("extends",))
        if not isinstance(ext, str):
            raise loc.error(f"expected a grid file path, got {ext!r}")
        parent_file = _find_grid(ext, file.parent, loc)
        if parent_file in chain or parent_file == file:
            cycle = " -> ".join(str(c) for c in (*chain, file, parent_file))
            raise loc.error(f"extends forms a cycle: {cycle}")
        parent = _load_spec(parent_file, (*chain, file))
        spec = _merge(parent, spec)
    return spec


def _diff(doc: _Doc, data: Any, path: tuple, prefix: str = "") -> dict[str, _Val]:
    """A (possibly nested, possibly dotted) mapping of config keys -> flat dotted key -> value."""
    if not isinstance(data, dict):
        raise doc.loc(path).error(f"expected a mapping of trial config keys, got {data!r}")
    out: dict[str, _Val] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(_diff(doc, v, path + (k,), key))
        else:
            out[key] = _Val(v, doc.loc(path + (k,), key))
    return out


def _axis(doc: _Doc, key: str, values: Any) -> _Axis | None:
    path = ("axes", key)
    loc = doc.loc(path, key)
    if values is None:
        return None  # removes an inherited axis
    if isinstance(values, list):
        if not values:
            raise loc.error("an axis needs at least one value")
        vals = []
        for i, v in enumerate(values):
            vals.append(_AxisValue(_label(v), {key: _Val(v, doc.loc(path + (i,), key))}))
        labels = [v.label for v in vals]
        if len(set(labels)) != len(labels):
            raise loc.error(f"values repeat: {values}")
        return _Axis(key, vals, loc, named=False)
    if isinstance(values, dict):
        if not values:
            raise loc.error("an axis needs at least one value")
        if _is_config_key(key):
            raise loc.error(f"{key} is a config key: expected a list of its values, got a mapping")
        vals = []
        for label, diff in values.items():
            vpath = path + (label,)
            _check_plain(
                str(label), doc.loc(vpath, f"{key}.{label}"), "a named axis's label (part of trial names)"
            )
            if not isinstance(diff, dict) or not diff:
                raise doc.loc(vpath, f"{key}.{label}").error(
                    f"a named axis value is a non-empty mapping of config keys, got {diff!r}"
                )
            vals.append(_AxisValue(str(label), _diff(doc, diff, vpath)))
        return _Axis(key, vals, loc, named=True)
    raise loc.error(
        f"expected a list of values (config key axis) or a mapping label -> config diff "
        f"(named axis), got {values!r}"
    )


def _check_plain(name: str, loc: _Loc, what: str, key: str | None = None) -> None:
    problem = name_problem(name)
    if problem is not None:
        raise loc.error(f"{what} {name!r} is not a plain name: {problem}", key)


def _label(v: Any) -> str:
    if isinstance(v, list | tuple):
        return "-".join(_label(x) for x in v) or "none"
    if v is None:
        return "none"
    return str(v)


def _merge(parent: _Spec, child: _Spec) -> _Spec:
    out = copy.copy(parent)
    out.loc = child.loc
    out.name = child.name  # the name is the child file's, never inherited
    out.description = child.description if child.description is not None else parent.description
    out.base = _merge_diff(parent.base, child.base)
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


def _merge_diff(a: dict[str, _Val], b: dict[str, _Val]) -> dict[str, _Val]:
    """``b`` over ``a`` by dotted key: a key in ``b`` replaces the same key and any above or below it."""
    out = dict(a)
    for k, v in b.items():
        for old in list(out):
            if old == k or old.startswith(k + ".") or k.startswith(old + "."):
                del out[old]
        out[k] = v
    return out


# --- validation and expansion --------------------------------------------------------------------------


def _is_config_key(key: str) -> bool:
    try:
        get_dotted(_DEFAULTS, key)
        return True
    except KeyError:
        return False


def _check(key: str, v: _Val) -> None:
    """One dotted key and value, alone: known key, right type, a name some registry holds."""
    if key == "seed":
        raise v.loc.error("set seeds with the top-level `seeds:` key", key)
    if key == "plugins":
        raise v.loc.error("name plugins with the top-level `plugins:` key", key)
    if key.split(".")[0] in ("baseline", "axis", "plugin_sources"):
        raise v.loc.error(
            f"`{key.split('.')[0]}` is set by the grid itself (its dense point, its axes, its plugins' sources)",
            key,
        )
    d: dict[str, Any] = {}
    set_dotted(d, key, v.value)
    try:
        trial_from_dict(d, partial=True)  # rules between keys: when the whole trial resolves
    except ConfigError as e:
        raise v.loc.error(str(e), key) from None
    except KeyError as e:
        raise v.loc.error(str(e.args[0]) if e.args else str(e), key) from None
    except (TypeError, ValueError) as e:  # a value of a shape the config cannot take (a list for a section)
        raise v.loc.error(f"a value of the wrong type or shape ({e}), got {v.value!r}", key) from None
    if isinstance(v.value, dict):  # e.g. an axis over ``model.spa`` mappings: check the names inside
        for sub, value in flatten_config(v.value, key + ".").items():
            _check_name(sub, _Val(value, v.loc), key)
    _check_name(key, v, key)


def _check_name(key: str, v: _Val, where: str) -> None:
    """A value that names a registry entry, one of a fixed set of choices or a number in a range
    meets the rule its config field declares (``spa_core.config.rule_problem``)."""
    problem = rule_problem(_RULES.get(key, {}), v.value)
    if problem is not None:
        raise v.loc.error(problem, where)


def _expand(spec: _Spec, plugins: list[str], overrides: dict[str, Any]) -> Grid:
    file = spec.loc.file
    for key, v in spec.base.items():
        _check(key, v)
    axes = [a for a in spec.axes.values() if a is not None]
    for a in axes:
        for av in a.values:
            for key, v in av.diff.items():
                if not a.named and not _is_config_key(key):
                    raise v.loc.error(
                        "unknown config key for an axis; an axis key is a dotted path into the trial "
                        "config (e.g. model.spa.ratio), or a name whose values are labelled diffs",
                        key,
                    )
                _check(key, v)
    for p in spec.points or []:
        for key, v in p.diff.items():
            _check(key, v)
    over = {k: _Val(v, _Loc(None, None, f"overrides {k}")) for k, v in overrides.items()}
    for key, v in over.items():
        _check(key, v)
    seeds = spec.seeds.value if spec.seeds else [0]
    if not spec.names_trials:
        raise spec.loc.error(
            "the grid names no trial: give it base: (an empty base: {} is one trial of the defaults), "
            "axes: or points:, or extends: a grid that does"
        )
    grid_name = spec.name or file.stem
    if spec.name is None:
        _check_plain(
            grid_name, spec.loc, "the grid file's stem (its experiment's folder; set name: instead)", "name"
        )

    # variants: (name, labels, diff, loc)
    variants: list[tuple[str, dict[str, str], dict[str, _Val], _Loc]] = []
    n_trials = math.prod(len(a.values) for a in axes) * len(seeds) + len(spec.points or []) * len(seeds)
    if n_trials > _MAX_TRIALS:
        raise spec.loc.error(f"the grid expands to {n_trials} trials; at most {_MAX_TRIALS}", "axes")
    short = _short_names([a.key for a in axes])
    if axes:
        for combo in itertools.product(*[a.values for a in axes]):
            diff = dict(spec.base)
            labels = {}
            for a, av in zip(axes, combo):
                diff = _merge_diff(diff, av.diff)
                labels[a.key] = av.label
            name = ",".join(labels[a.key] if a.named else f"{short[a.key]}={labels[a.key]}" for a in axes)
            variants.append((name, labels, diff, axes[-1].loc))
    elif not spec.points:
        variants.append((grid_name, {}, dict(spec.base), spec.loc))

    resolved: list[tuple[str, dict[str, str], TrialConfig, _Loc]] = []
    for name, labels, diff, loc in variants:
        resolved.append((name, labels, _resolve(diff, over, name, loc), loc))

    # exclude rules apply to the crossed variants only
    kept = list(resolved)
    for rloc, rule in spec.exclude or []:
        for key, v in rule.items():
            if key not in spec.axes and not _is_config_key(key):
                raise v.loc.error(
                    f"unknown key in an exclude rule; expected a config key or an axis name "
                    f"({', '.join(a.key for a in axes) or 'no axes'})",
                    key,
                )
        matched = [r for r in resolved if _matches(rule, r[1], r[2])]
        if not matched:
            desc = ", ".join(f"{k}={v.value!r}" for k, v in rule.items())
            raise rloc.error(
                f"this exclude rule ({desc}) matches no trial of the axes; check its keys and values",
                "exclude",
            )
        kept = [r for r in kept if r not in matched]

    for i, p in enumerate(spec.points or []):
        name = p.name if p.name is not None else f"point{i}"
        if not isinstance(name, str):
            raise p.loc.error(f"expected a string name, got {name!r}", "name")
        _check_plain(name, p.loc, "a point's name (a trial name)", "name")
        diff = _merge_diff(spec.base, p.diff)
        kept.append((name, {}, _resolve(diff, over, name, p.loc), p.loc))

    if not kept:
        raise spec.loc.error(
            "the grid has no trials (every crossed point is excluded and there are no points)"
        )
    seen: dict[str, _Loc] = {}
    for name, _, _, loc in kept:
        if name in seen:
            raise loc.error(f"two variants are named {name!r}; give each point a distinct name", "name")
        seen[name] = loc
    _attach_baseline(kept)
    comparisons = _checked_comparisons(spec, [name for name, _, _, _ in kept])

    trials: list[TrialConfig] = []
    hashes: dict[str, str] = {}
    for name, labels, cfg, loc in kept:
        sources = plugin_sources(cfg)  # hashed: an edited plugin makes a new trial
        for seed in seeds:
            t = copy.deepcopy(cfg)
            t.seed = seed
            t.plugins = list(plugins)
            t.plugin_sources = dict(sources)
            t.axis = dict(labels)  # the report's axis tables read these (axis.<axis> columns of the row)
            h = config_hash(t)
            if h in hashes:
                raise loc.error(
                    f"variants {hashes[h]!r} and {name!r} resolve to the same config (hash {h}); "
                    "drop one (exclude, or remove the point)",
                    "name",
                )
            hashes[h] = name
            trials.append(t)
    return Grid(
        name=grid_name,
        description=spec.description or "",
        source=file,
        trials=trials,
        axes={a.key: [v.label for v in a.values] for a in axes},
        base={k: v.value for k, v in spec.base.items()},
        seeds=list(seeds),
        plugins=list(plugins),
        labels={name: labels for name, labels, _, _ in kept},
        comparisons=comparisons,
        warnings=_overridden_base_keys(spec, axes),
    )


def _overridden_base_keys(spec: _Spec, axes: list[_Axis]) -> list[str]:
    """A warning per base key that an axis sets in every one of its values (the same key, or one
    above or below it), so the base value reaches no crossed trial: ``FILE:LINE: axis AXIS (set at
    FILE:LINE) overrides KEY ...``. Not when the base value is one of the axis's values and both are
    written in the same file (a grid that names the default beside its sweep); always when the base
    key is in a grid that extends the axis's (the case a reader of the child file does not see)."""
    out = []
    rank = {f: i for i, f in enumerate(spec.files)}  # 0: the grid loaded; higher: what it extends

    def overlaps(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    for key, base in spec.base.items():
        for axis in axes:
            hits = [[v for k, v in av.diff.items() if overlaps(k, key)] for av in axis.values]
            if not all(hits):
                continue  # some value of the axis leaves the base key as it is
            b_rank, a_rank = rank.get(base.loc.file, 0), rank.get(axis.loc.file, 0)
            values = [v.value for vals in hits for v in vals]
            if b_rank == a_rank and base.value in values:
                continue
            if b_rank > a_rank:
                continue  # a grid sweeping a key its parent's base sets: the usual extension
            where = f"{base.loc.file}:{base.loc.line}"
            out.append(
                f"{axis.loc.file}:{axis.loc.line}: axis {axis.key} overrides {key} = {base.value!r} set at "
                f"{where} in every one of its values, so no crossed trial uses the base value; remove the "
                f"axis with `axes: {{{axis.key}: null}}` in the grid, or drop the base key"
            )
    return out


def _attach_baseline(variants: list[tuple[str, dict[str, str], TrialConfig, _Loc]]) -> None:
    """Set ``baseline`` (not hashed) of every variant that is not ``model.variant: dense`` to the grid's
    dense variant: the model its speedup is timed against (``harness.task.measure``). Of several dense
    variants (a dense value crossed with other axes) a variant gets the one whose resolved config
    differs from its own in the fewest keys, the first of them on a tie. No dense variant: none is set."""
    dense = [(name, cfg) for name, _, cfg, _ in variants if cfg.model.variant == "dense"]
    if not dense:
        return
    flat = {name: flatten_config(trial_to_dict(cfg)) for name, cfg in dense}
    for _, _, cfg, _ in variants:
        if cfg.model.variant == "dense":
            continue
        mine = flatten_config(trial_to_dict(cfg))

        def distance(name: str, mine: dict[str, Any] = mine) -> int:
            theirs = flat[name]
            return sum(mine.get(k) != theirs.get(k) for k in set(mine) | set(theirs) if k != "name")

        name, best = min(dense, key=lambda d: distance(d[0]))
        cfg.baseline = BaselineConfig(
            name=name, model=copy.deepcopy(best.model), head=copy.deepcopy(best.head)
        )


# --- how the report judges the rows: equivalence margin and contrasts -----------------------------------


def _margin_problem(margin: Any) -> str | None:
    if isinstance(margin, bool) or not isinstance(margin, int | float):
        return f"expected {TOP_LEVEL_KEYS['equivalence_margin']}, got {margin!r}"
    if not (math.isfinite(margin) and margin > 0):
        return f"expected a positive finite number, got {margin!r}"
    return None


def _read_comparisons(doc: _Doc, data: dict[str, Any], spec: _Spec) -> None:
    """``equivalence_margin`` and ``contrasts`` of one file, checked for shape (names: ``_checked_comparisons``)."""
    if "equivalence_margin" in data:
        loc = doc.loc(("equivalence_margin",))
        problem = _margin_problem(data["equivalence_margin"])
        if problem:
            raise loc.error(problem)
        spec.margin = _Val(float(data["equivalence_margin"]), loc)
    if "contrasts" not in data:
        return
    raw = data["contrasts"]
    if raw is None:
        spec.contrasts = []  # removes the parent's
        return
    if isinstance(raw, list):
        items = [(None, pair, ("contrasts", i)) for i, pair in enumerate(raw)]
    elif isinstance(raw, dict):
        items = [(label, pair, ("contrasts", label)) for label, pair in raw.items()]
    else:
        raise doc.loc(("contrasts",)).error(f"expected {TOP_LEVEL_KEYS['contrasts']}, got {raw!r}")
    spec.contrasts = []
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
        spec.contrasts.append((Contrast(label, a, b), loc))


def _checked_comparisons(spec: _Spec, names: list[str]) -> Comparisons:
    """The grid's ``Comparisons``; a contrast naming a variant the expanded grid does not have is an
    error at its line."""
    known = set(names)
    for c, loc in spec.contrasts or []:
        for v in (c.a, c.b):
            if v not in known:
                raise loc.error(
                    f"unknown variant {v!r} in a contrast; the grid's variants: {', '.join(names)}"
                )
    return Comparisons(
        spec.margin.value if spec.margin is not None else None, tuple(c for c, _ in spec.contrasts or [])
    )


def _resolve(diff: dict[str, _Val], over: dict[str, _Val], name: str, loc: _Loc) -> TrialConfig:
    d: dict[str, Any] = {}
    for key, v in _merge_diff(diff, over).items():
        set_dotted(d, key, copy.deepcopy(v.value))
    d["name"] = name
    try:
        return trial_from_dict(d)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise loc.error(f"trial {name!r} does not resolve: {msg}", "trial") from None


def _matches(rule: dict[str, _Val], labels: dict[str, str], cfg: TrialConfig) -> bool:
    d = trial_to_dict(cfg)
    for key, v in rule.items():
        want = v.value
        if key in labels:  # a named axis: compare labels
            wants = [str(w) for w in want] if isinstance(want, list) else [str(want)]
            if labels[key] not in wants:
                return False
            continue
        try:
            have = get_dotted(d, key)
        except KeyError:
            return False
        if not (have == want or (isinstance(want, list) and have in want)):
            return False
    return True


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted axis key, or the whole key where that is ambiguous."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
