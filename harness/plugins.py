"""Plugins: modules that register new variants in ``spa_core.registry`` without editing the package.

A plugin is a Python module whose import registers entries, e.g.

    from spa_core.registry import SELECTION_POLICIES

    @SELECTION_POLICIES.register("feature_norm")
    def select_feature_norm(scores, *, cfg, training, generator=None, tokens=None): ...

It is named in one of three ways, all loaded by this module:

- a Python entry point in the group ``spa_harness.plugins`` of an installed distribution
  (``[project.entry-points."spa_harness.plugins"] mine = "my_pkg.spa_variants"``); the entry point
  may name a module (imported) or a callable (called with no arguments after import);
- ``plugins:`` in a grid file, a dotted module (``my_pkg.spa_variants``) or a file path
  (``plugins/feature_norm.py``, relative to the grid file);
- ``--plugin FILE`` on the command line (a file path or dotted module, relative to the working dir).

The built-in variants are registered the same way: spa_core's modules register theirs at import,
``load_builtins`` imports them, and their origin reads ``builtin``. Loading is idempotent (a plugin
named twice, or by file and by module, is imported once), so a trial worker can call
``load_plugins(cfg.plugins)`` whatever its process has already loaded.

A plugin's source is part of the identity of every trial that uses one of its entries:
``plugin_sources(cfg)`` maps each registry entry the trial names (its selection policy, pack strategy,
gate, supervision mode, model variant) that is not built in to ``sha256:...`` of the plugin's source
files (the file the entry was registered from and the files defining the registered object, outside
this project's packages; an installed entry point adds ``DIST==VERSION``). The grid records it in
``TrialConfig.plugin_sources``, which the config hash covers: an edited plugin makes new trials, not
old rows answered again, and a trial whose plugin changed between the grid's expansion and the
trial's start fails with ``PluginChangedError`` (``check_plugin_sources``). Code a plugin imports
from other files or packages, which its entries do not name, is not covered.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import pkgutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import spa_core
from harness.errors import describe, is_user_file
from spa_core.registry import ALL_REGISTRIES, registering_as

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginError",
    "PluginChangedError",
    "plugin_sources",
    "check_plugin_sources",
    "entry_source",
    "load_builtins",
    "load_plugin",
    "load_plugins",
    "load_entry_point_plugins",
    "resolve_plugin_spec",
    "is_file_spec",
    "list_variants",
    "isolated_registries",
]

ENTRY_POINT_GROUP = "spa_harness.plugins"

# Loaded plugins, keyed by resolved file path (or module name when it has no file): import once.
_LOADED: dict[str, ModuleType | Any] = {}
_ENTRY_POINTS_DONE: set[str] = set()
# Registry origin (``file PATH``, ``module NAME``, ``entry point NAME (DIST)``) -> (its source file or
# None, ``DIST==VERSION`` or None): what ``entry_source`` hashes.
_ORIGIN_SOURCES: dict[str, tuple[str | None, str | None]] = {}


class PluginError(ImportError):
    """A plugin could not be found or imported, or its registration failed; names the plugin, and
    for a failure inside it the exception's type and message and the plugin's own file and line
    (``harness.errors.describe``)."""


class PluginChangedError(RuntimeError):
    """A trial's plugin source is not the one its config was made with (edited since the grid was
    expanded): running it would store another plugin's results under this trial's hash."""


def is_file_spec(spec: str) -> bool:
    """A file path (``x.py``, anything with a path separator) rather than a dotted module name."""
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def resolve_plugin_spec(spec: str, base_dir: str | Path | None = None) -> str:
    """A file spec made absolute (relative to ``base_dir``, else the working directory); a dotted
    module name unchanged. Raises ``PluginError`` for a file that does not exist."""
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"plugin: expected a dotted module name or a .py file path, got {spec!r}")
    spec = spec.strip()
    if not is_file_spec(spec):
        return spec
    path = Path(spec).expanduser()
    candidates = [path] if path.is_absolute() else [Path(base_dir or ".") / path, Path.cwd() / path]
    for cand in candidates:
        if cand.is_file():
            return str(cand.resolve())
    tried = ", ".join(str(c.resolve()) for c in candidates)
    raise PluginError(f"plugin file {spec!r} does not exist (looked at: {tried})")


def load_builtins() -> None:
    """Import every spa_core module, so the built-in variants are registered (origin ``builtin``)."""
    for info in pkgutil.iter_modules(spa_core.__path__, "spa_core."):
        importlib.import_module(info.name)


def load_plugin(spec: str, *, base_dir: str | Path | None = None, origin: str | None = None) -> ModuleType:
    """Import one plugin (dotted module or file path) with its registrations attributed to ``origin``
    (default: ``file <path>`` or ``module <name>``). Idempotent. Raises ``PluginError`` naming the plugin."""
    load_builtins()  # a plugin may register next to (or on top of) the built-ins: have them first
    resolved = resolve_plugin_spec(spec, base_dir)
    if is_file_spec(resolved):
        return _load_file(resolved, origin or f"file {resolved}")
    return _load_module(resolved, origin or f"module {resolved}")


def load_plugins(specs: Iterable[str], *, base_dir: str | Path | None = None) -> list[ModuleType]:
    """``load_plugin`` for each spec, in order."""
    return [load_plugin(s, base_dir=base_dir) for s in specs]


def load_entry_point_plugins(group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Load every entry point of ``group`` (once per process); returns the names loaded now."""
    load_builtins()
    done = []
    for ep in importlib.metadata.entry_points(group=group):
        key = f"{group}:{ep.name}={ep.value}"
        if key in _ENTRY_POINTS_DONE:
            continue
        dist = getattr(getattr(ep, "dist", None), "name", None)
        origin = f"entry point {ep.name} ({dist})" if dist else f"entry point {ep.name}"
        version = getattr(getattr(ep, "dist", None), "version", None)
        _ORIGIN_SOURCES[origin] = (_module_file(ep.module), f"{dist}=={version}" if dist else None)
        try:
            with registering_as(origin):
                obj = ep.load()
                if callable(obj) and not isinstance(obj, ModuleType):
                    obj()
        except Exception as e:  # noqa: BLE001 - re-raised with the entry point named
            raise PluginError(
                f"entry point {ep.name!r} ({ep.value}) of group {group!r}: {describe(e)}"
            ) from e
        _ENTRY_POINTS_DONE.add(key)
        done.append(ep.name)
    return done


def list_variants() -> Any:
    """Everything registered (built-ins, entry points and plugins loaded so far), as a DataFrame with
    columns ``registry``, ``name``, ``origin`` (``builtin``, ``entry point NAME (DIST)``, ``file PATH``,
    ``module NAME``) and
    ``object`` (its module and qualified name)."""
    import pandas as pd

    load_builtins()
    load_entry_point_plugins()
    rows = []
    for reg_name, reg in ALL_REGISTRIES.items():
        for name, obj in reg.items():
            qual = getattr(obj, "__qualname__", type(obj).__name__)
            rows.append(
                {
                    "registry": reg_name,
                    "name": name,
                    "origin": reg.origin(name),
                    "object": f"{getattr(obj, '__module__', '?')}.{qual}",
                }
            )
    return pd.DataFrame(rows, columns=["registry", "name", "origin", "object"])


@contextlib.contextmanager
def isolated_registries() -> Iterator[None]:
    """Entries registered (and plugins loaded) inside the block are forgotten on exit (for tests)."""
    load_builtins()
    before = {name: set(reg) for name, reg in ALL_REGISTRIES.items()}
    loaded, eps, modules = dict(_LOADED), set(_ENTRY_POINTS_DONE), set(sys.modules)
    try:
        yield
    finally:
        for name, reg in ALL_REGISTRIES.items():
            for entry in set(reg) - before[name]:
                reg.unregister(entry)
        plugin_modules = {id(m) for k, m in _LOADED.items() if k not in loaded}
        for mod in set(sys.modules) - modules:  # so the next load imports (and registers) again
            if id(sys.modules[mod]) in plugin_modules or mod.startswith("spa_harness_plugin_"):
                del sys.modules[mod]
        _LOADED.clear()
        _LOADED.update(loaded)
        _ENTRY_POINTS_DONE.clear()
        _ENTRY_POINTS_DONE.update(eps)


def _already_loaded(path: str) -> ModuleType | None:
    if path in _LOADED:
        return _LOADED[path]
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and _same_file(f, path):
            _LOADED[path] = mod
            return mod
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _load_file(path: str, origin: str) -> ModuleType:
    mod = _already_loaded(path)
    if mod is not None:
        return mod
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    mod_name = f"spa_harness_plugin_{Path(path).stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin file {path!r} cannot be imported as a Python module")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod  # dataclasses and pickling look the module up by name
    _ORIGIN_SOURCES[origin] = (path, None)
    try:
        with registering_as(origin):
            spec.loader.exec_module(mod)
    except Exception as e:  # noqa: BLE001 - re-raised with the plugin named
        sys.modules.pop(mod_name, None)
        raise PluginError(f"plugin file {path!r} failed to load: {describe(e)}") from e
    _LOADED[path] = mod
    return mod


def _load_module(name: str, origin: str) -> ModuleType:
    if name in _LOADED:
        return _LOADED[name]
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as e:
        raise PluginError(f"plugin module {name!r} cannot be found: {e}") from e
    if spec is None:
        raise PluginError(f"plugin module {name!r} cannot be found (not importable from sys.path)")
    key = spec.origin if spec.origin and spec.origin not in ("built-in", "frozen", "namespace") else name
    _ORIGIN_SOURCES[origin] = (key if key != name else None, None)
    mod = _already_loaded(key) if key != name else None
    if mod is None:
        try:
            with registering_as(origin):
                mod = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - re-raised with the plugin named
            raise PluginError(f"plugin module {name!r} failed to load: {describe(e)}") from e
    _LOADED[name] = _LOADED[key] = mod
    return mod


# --- a plugin's source in a trial's identity --------------------------------------------------------------

# Config keys whose value names a registry entry (``selection_policy`` ...), from the config's own rules.
_REGISTRY_KEYS: dict[str, str] | None = None


def _registry_keys() -> dict[str, str]:
    global _REGISTRY_KEYS
    if _REGISTRY_KEYS is None:
        from harness.config import TrialConfig
        from spa_core.config import config_rules

        _REGISTRY_KEYS = {
            key: rule["registry"]
            for key, rule in config_rules(TrialConfig).items()
            if "registry" in rule and not key.startswith("baseline.")  # the baseline is only timed
        }
    return _REGISTRY_KEYS


def _module_file(module: str | None) -> str | None:
    try:
        spec = importlib.util.find_spec(module) if module else None
    except (ImportError, ValueError):
        return None
    return spec.origin if spec and spec.origin and Path(spec.origin).is_file() else None


def _defining_files(obj: Any) -> list[str]:
    """The source files of a registered object: a function's or class's own, an instance's class's
    and its function-valued attributes' (a ``PackStrategy`` of plugin functions)."""
    targets = [obj] if inspect.isfunction(obj) or inspect.isclass(obj) else [type(obj)]
    targets += [v for v in getattr(obj, "__dict__", {}).values() if inspect.isfunction(v)]
    files = []
    for t in targets:
        try:
            f = inspect.getsourcefile(inspect.unwrap(t))
        except (TypeError, OSError):
            continue
        if f:
            files.append(f)
    return files


def entry_source(registry: str, name: str) -> str | None:
    """``sha256:<16 hex>`` of the source of registry entry ``name`` (see the module docstring), or
    ``None`` for a built-in entry. Raises ``KeyError`` for a name the registry does not hold."""
    reg = ALL_REGISTRIES[registry]
    origin = reg.origin(name)
    if origin == "builtin":
        return None
    origin_file, version = _ORIGIN_SOURCES.get(origin, (None, None))
    files = {os.path.realpath(f) for f in [origin_file, *_defining_files(reg.get(name))] if f}
    files = sorted(f for f in files if is_user_file(f) and os.path.isfile(f))
    h = hashlib.sha256()
    for f in files:  # content only: a plugin moved elsewhere is the same plugin
        h.update(Path(f).read_bytes())
        h.update(b"\0")
    if version:
        h.update(version.encode())
    if not files and not version:
        h.update(origin.encode())  # nothing to read: at least the origin's name
    return f"sha256:{h.hexdigest()[:16]}"


def plugin_sources(cfg: Any) -> dict[str, str]:
    """``{"registry:name": entry_source(...)}`` for every registry entry ``cfg`` (a ``TrialConfig``)
    names that is not built in; the entries must be registered (the trial's plugins loaded)."""
    from harness.config import get_dotted, trial_to_dict

    d = trial_to_dict(cfg)
    out: dict[str, str] = {}
    for key, registry in _registry_keys().items():
        try:
            name = get_dotted(d, key)
        except KeyError:  # model.spa is None: the dense model names no SPA entry
            continue
        source = entry_source(registry, name) if isinstance(name, str) else None
        if source is not None:
            out[f"{registry}:{name}"] = source
    return dict(sorted(out.items()))


def check_plugin_sources(cfg: Any) -> None:
    """Raise ``PluginChangedError`` when the loaded plugins' sources are not those ``cfg`` was made
    with (``cfg.plugin_sources``): a plugin edited between the grid's expansion and this trial."""
    now = plugin_sources(cfg)
    if now == cfg.plugin_sources:
        return
    changed = sorted(k for k in set(now) | set(cfg.plugin_sources) if now.get(k) != cfg.plugin_sources.get(k))
    where = []
    for k in changed:
        registry, _, name = k.partition(":")
        try:
            where.append(f"{registry} {name!r} ({ALL_REGISTRIES[registry].origin(name)})")
        except KeyError:
            where.append(f"{registry} {name!r}")
    raise PluginChangedError(
        f"plugin source changed since the grid was expanded: {'; '.join(where)}; run the grid again so "
        "that the trial is made (and hashed) with the plugin as it is now"
    )
