"""Expansion: a grid's merged ``Spec`` into the ``Grid`` of fully resolved trials (``load_grid``).

``load_grid`` finds and reads the file (``harness.grid.spec``), loads its plugins (so their names are
registered), checks every key of base, axes, points and overrides (``harness.grid.checks``), crosses the
axes, drops what ``exclude`` matches, adds the points, resolves each variant with
``harness.config.trial_from_dict``, gives the non-dense variants their dense ``baseline``, checks the
contrasts against the variants' names and repeats each variant per seed. Two trials with one config
hash, a rule that matches nothing, a variant that does not resolve: ``GridError`` at the line that made
it. What the grid sets but no trial uses (a base key an axis overrides in every value) is a warning in
``Grid.warnings``.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
from harness.grid.checks import check_key, check_plain, is_config_key
from harness.grid.comparisons import Comparisons, checked_comparisons
from harness.grid.spec import MAX_TRIALS, Axis, Plugin, Spec, find_grid, load_spec, merge_diff
from harness.grid.yaml_lines import GridError, Loc, Val
from harness.plugins import (
    PluginError,
    load_entry_point_plugins,
    load_plugin,
    plugin_sources,
    resolve_plugin_spec,
)
from spa_core.config import ConfigError

__all__ = ["Grid", "load_grid"]


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
    spec = load_spec(find_grid(path, None, None), ())
    plugins = list(spec.plugins)
    for p in extra_plugins:
        try:
            plugins.append(Plugin(resolve_plugin_spec(p), Loc(None, None, "--plugin")))
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


def _expand(spec: Spec, plugins: list[str], overrides: dict[str, Any]) -> Grid:
    file = spec.loc.file
    for key, v in spec.base.items():
        check_key(key, v)
    axes = [a for a in spec.axes.values() if a is not None]
    for a in axes:
        for av in a.values:
            for key, v in av.diff.items():
                if not a.named and not is_config_key(key):
                    raise v.loc.error(
                        "unknown config key for an axis; an axis key is a dotted path into the trial "
                        "config (e.g. model.spa.ratio), or a name whose values are labelled diffs",
                        key,
                    )
                check_key(key, v)
    for p in spec.points or []:
        for key, v in p.diff.items():
            check_key(key, v)
    over = {k: Val(v, Loc(None, None, f"overrides {k}")) for k, v in overrides.items()}
    for key, v in over.items():
        check_key(key, v)
    seeds = spec.seeds.value if spec.seeds else [0]
    if not spec.names_trials:
        raise spec.loc.error(
            "the grid names no trial: give it base: (an empty base: {} is one trial of the defaults), "
            "axes: or points:, or extends: a grid that does"
        )
    grid_name = spec.name or file.stem
    if spec.name is None:
        check_plain(
            grid_name, spec.loc, "the grid file's stem (its experiment's folder; set name: instead)", "name"
        )

    # variants: (name, labels, diff, loc)
    variants: list[tuple[str, dict[str, str], dict[str, Val], Loc]] = []
    n_trials = math.prod(len(a.values) for a in axes) * len(seeds) + len(spec.points or []) * len(seeds)
    if n_trials > MAX_TRIALS:
        raise spec.loc.error(f"the grid expands to {n_trials} trials; at most {MAX_TRIALS}", "axes")
    short = _short_names([a.key for a in axes])
    if axes:
        for combo in itertools.product(*[a.values for a in axes]):
            diff = dict(spec.base)
            labels = {}
            for a, av in zip(axes, combo):
                diff = merge_diff(diff, av.diff)
                labels[a.key] = av.label
            name = ",".join(labels[a.key] if a.named else f"{short[a.key]}={labels[a.key]}" for a in axes)
            variants.append((name, labels, diff, axes[-1].loc))
    elif not spec.points:
        variants.append((grid_name, {}, dict(spec.base), spec.loc))

    resolved: list[tuple[str, dict[str, str], TrialConfig, Loc]] = []
    for name, labels, diff, loc in variants:
        resolved.append((name, labels, _resolve(diff, over, name, loc), loc))

    # exclude rules apply to the crossed variants only
    kept = list(resolved)
    for rloc, rule in spec.exclude or []:
        for key, v in rule.items():
            if key not in spec.axes and not is_config_key(key):
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
        check_plain(name, p.loc, "a point's name (a trial name)", "name")
        diff = merge_diff(spec.base, p.diff)
        kept.append((name, {}, _resolve(diff, over, name, p.loc), p.loc))

    if not kept:
        raise spec.loc.error(
            "the grid has no trials (every crossed point is excluded and there are no points)"
        )
    seen: dict[str, Loc] = {}
    for name, _, _, loc in kept:
        if name in seen:
            raise loc.error(f"two variants are named {name!r}; give each point a distinct name", "name")
        seen[name] = loc
    _attach_baseline(kept)
    comparisons = checked_comparisons(spec.margin, spec.contrasts, [name for name, _, _, _ in kept])

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


def _overridden_base_keys(spec: Spec, axes: list[Axis]) -> list[str]:
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


def _attach_baseline(variants: list[tuple[str, dict[str, str], TrialConfig, Loc]]) -> None:
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


def _resolve(diff: dict[str, Val], over: dict[str, Val], name: str, loc: Loc) -> TrialConfig:
    d: dict[str, Any] = {}
    for key, v in merge_diff(diff, over).items():
        set_dotted(d, key, copy.deepcopy(v.value))
    d["name"] = name
    try:
        return trial_from_dict(d)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        raise loc.error(f"trial {name!r} does not resolve: {msg}", "trial") from None


def _matches(rule: dict[str, Val], labels: dict[str, str], cfg: TrialConfig) -> bool:
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
