"""harness/plugins.py and spa_core/registry.py: duplicate / unknown names, plugins by file, module and
entry point, and the variants listing."""

from __future__ import annotations

import sys
import textwrap

import pytest

from harness.plugins import (
    PluginError,
    isolated_registries,
    list_variants,
    load_entry_point_plugins,
    load_plugin,
    load_plugins,
)
from spa_core.registry import ALL_REGISTRIES, SELECTION_POLICIES, Registry

PLUGIN = textwrap.dedent(
    """
    from spa_core.registry import SELECTION_POLICIES
    from spa_core.select import select_topk

    @SELECTION_POLICIES.register("{name}")
    def policy(scores, *, cfg, training, generator=None, tokens=None):
        return select_topk(scores, cfg=cfg, training=training)
    """
)


@pytest.fixture
def clean_registries():
    with isolated_registries():
        yield


def _write_plugin(path, name):
    path.write_text(PLUGIN.format(name=name))
    return path


def test_registry_rejects_duplicates():
    reg = Registry("things")
    reg.register("a", object())
    with pytest.raises(KeyError, match=r"registry 'things': 'a' is already registered"):
        reg.register("a", object())


def test_registry_unknown_name_lists_contents():
    reg = Registry("things")
    reg.register("b", 1)
    reg.register("a", 2)
    with pytest.raises(KeyError, match=r"no 'zz' in registry 'things'; it holds: a, b"):
        reg.get("zz")


@pytest.mark.parametrize("registry", sorted(ALL_REGISTRIES))
def test_builtins_registered_as_builtin(registry, clean_registries):
    reg = ALL_REGISTRIES[registry]
    assert len(reg) > 0, f"spa_core registers no {registry}"
    builtin = [n for n in reg if reg.origin(n) == "builtin"]
    assert builtin, f"no builtin {registry}"


def test_plugin_by_file_path(tmp_path, clean_registries):
    path = _write_plugin(tmp_path / "my_policy.py", "tp_file_policy")
    load_plugin(str(path))
    assert "tp_file_policy" in SELECTION_POLICIES
    assert SELECTION_POLICIES.origin("tp_file_policy") == f"file {path.resolve()}"
    load_plugin(str(path))  # idempotent: no duplicate error on a second load
    load_plugins(["my_policy.py"], base_dir=tmp_path)  # relative to a base dir (a grid's folder)


def test_plugin_by_dotted_module(tmp_path, monkeypatch, clean_registries):
    pkg = tmp_path / "tp_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    _write_plugin(pkg / "variants.py", "tp_module_policy")
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugin("tp_pkg.variants")
    assert SELECTION_POLICIES.origin("tp_module_policy") == "module tp_pkg.variants"
    load_plugin(str(pkg / "variants.py"))  # the same file by path: not imported twice


def _fake_dist(tmp_path, entry_points: str):
    dist = tmp_path / "tp_dist-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-dist\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(entry_points)


def test_plugin_by_entry_point(tmp_path, monkeypatch, clean_registries):
    _write_plugin(tmp_path / "tp_ep_module.py", "tp_ep_policy")
    (tmp_path / "tp_ep_hook.py").write_text(
        "import dataclasses\n"
        "from spa_core.attention import attend_varlen\n"
        "from spa_core.pack import pack_varlen\n"
        "from spa_core.registry import PACK_STRATEGIES\n"
        "from spa_core.strategies import PackStrategy\n"
        "def pack(x, mask, *, cfg, order=None):\n"
        "    return dataclasses.replace(pack_varlen(x, mask, cfg=cfg, order=order), strategy='tp_ep_pack')\n"
        "def register():\n"
        "    PACK_STRATEGIES.register('tp_ep_pack', PackStrategy(pack, attend_varlen, lambda *a: 0.0))\n"
    )
    _fake_dist(tmp_path, "[spa_harness.plugins]\nmod = tp_ep_module\nhook = tp_ep_hook:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_entry_point_plugins()
    assert set(loaded) >= {"mod", "hook"}
    assert SELECTION_POLICIES.origin("tp_ep_policy") == "entry point mod (tp-dist)"
    assert ALL_REGISTRIES["pack_strategy"].origin("tp_ep_pack") == "entry point hook (tp-dist)"
    assert load_entry_point_plugins() == []  # once per process
    table = list_variants()
    row = table[(table.registry == "selection_policy") & (table.name == "tp_ep_policy")]
    assert row.origin.tolist() == ["entry point mod (tp-dist)"]


def test_broken_entry_point_names_itself(tmp_path, monkeypatch, clean_registries):
    _fake_dist(tmp_path, "[spa_harness.plugins]\nbroken = tp_missing_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match=r"entry point 'broken' \(tp_missing_module\)"):
        load_entry_point_plugins()


def test_plugin_errors_name_the_plugin(tmp_path, clean_registries):
    with pytest.raises(PluginError, match=r"plugin file 'nope.py' does not exist"):
        load_plugin("nope.py", base_dir=tmp_path)
    with pytest.raises(PluginError, match=r"plugin module 'tp_no_such_module' cannot be found"):
        load_plugin("tp_no_such_module")
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(PluginError, match=r"bad.py' failed to load: RuntimeError: boom"):
        load_plugin(str(bad))
    dup = _write_plugin(tmp_path / "dup.py", "topk")  # a built-in's name
    with pytest.raises(PluginError, match=r"'topk' is already registered \(by builtin\)"):
        load_plugin(str(dup))


def test_list_variants_frame(clean_registries):
    table = list_variants()
    assert list(table.columns) == ["registry", "name", "origin", "object"]
    assert set(table.registry) == set(ALL_REGISTRIES)
    topk = table[(table.registry == "selection_policy") & (table.name == "topk")]
    assert topk.origin.tolist() == ["builtin"]
    assert topk.object.tolist() == ["spa_core.select.select_topk"]


# --- a plugin's source in a trial's identity ---------------------------------------------------------------


def _grid(tmp_path, plugin):
    grid = tmp_path / "g.yaml"
    grid.write_text(
        f"plugins: [{plugin}]\n"
        "base: {preset: micro, model.spa.selection: tp_src_policy}\n"
        "points: [{name: dense, model.variant: dense}, {name: spa}]\n"
    )
    return grid


def _hashes(grid_file):
    from harness.config import config_hash
    from harness.grid import load_grid

    with isolated_registries():
        grid = load_grid(grid_file)
        return {t.name: config_hash(t) for t in grid.trials}, {t.name: t.plugin_sources for t in grid.trials}


def test_an_edited_plugin_makes_a_new_trial_and_a_moved_one_does_not(tmp_path):
    plugin = _write_plugin(tmp_path / "src_policy.py", "tp_src_policy")
    first, sources = _hashes(_grid(tmp_path, plugin))
    assert sources["dense"] == {} and list(sources["spa"]) == ["selection_policy:tp_src_policy"]
    assert sources["spa"]["selection_policy:tp_src_policy"].startswith("sha256:")

    plugin.write_text(plugin.read_text() + "# a comment is an edit too\n")
    edited, _ = _hashes(_grid(tmp_path, plugin))
    assert edited["spa"] != first["spa"]  # the plugin's trial is a new trial
    assert edited["dense"] == first["dense"]  # a trial that uses none of its entries is not

    other = tmp_path / "elsewhere"
    other.mkdir()
    moved = other / "renamed.py"
    moved.write_bytes(plugin.read_bytes())
    again, _ = _hashes(_grid(other, moved))
    assert again == edited  # the content, not the path, is the identity


def test_the_file_defining_a_registered_object_counts_too(tmp_path, monkeypatch):
    """A plugin that registers a function imported from a helper file of its own: editing the helper
    makes a new trial."""
    (tmp_path / "tp_helper_mod.py").write_text(
        "from spa_core.select import select_topk\n"
        "def helper_policy(scores, *, cfg, training, generator=None, tokens=None):\n"
        "    return select_topk(scores, cfg=cfg, training=training)\n"
    )
    plugin = tmp_path / "src_policy.py"
    plugin.write_text(
        "from spa_core.registry import SELECTION_POLICIES\n"
        "from tp_helper_mod import helper_policy\n"
        "SELECTION_POLICIES.register('tp_src_policy', helper_policy)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    first, _ = _hashes(_grid(tmp_path, plugin))
    sys.modules.pop("tp_helper_mod", None)
    (tmp_path / "tp_helper_mod.py").write_text((tmp_path / "tp_helper_mod.py").read_text() + "# edited\n")
    second, _ = _hashes(_grid(tmp_path, plugin))
    assert second["spa"] != first["spa"]


def test_an_entry_points_distribution_version_is_part_of_its_source(tmp_path, monkeypatch):
    from harness.plugins import entry_source

    _write_plugin(tmp_path / "tp_ep_module.py", "tp_ep_policy")
    _fake_dist(tmp_path, "[spa_harness.plugins]\nmod = tp_ep_module\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sources = []
    for version in ("1.0", "2.0"):
        (tmp_path / "tp_dist-1.0.dist-info" / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: tp-dist\nVersion: {version}\n"
        )
        sys.modules.pop("tp_ep_module", None)  # a fresh process imports it anew: here too
        with isolated_registries():
            load_entry_point_plugins()
            sources.append(entry_source("selection_policy", "tp_ep_policy"))
    assert sources[0] != sources[1] and all(s.startswith("sha256:") for s in sources)
    assert entry_source("selection_policy", "topk") is None  # a built-in has no plugin source


def test_a_trial_whose_plugin_changed_after_expansion_refuses_to_run(tmp_path):
    from harness.grid import load_grid
    from harness.plugins import PluginChangedError, check_plugin_sources

    plugin = _write_plugin(tmp_path / "src_policy.py", "tp_src_policy")
    with isolated_registries():
        trial = [t for t in load_grid(_grid(tmp_path, plugin)).trials if t.name == "spa"][0]
        check_plugin_sources(trial)  # as expanded
    plugin.write_text(plugin.read_text() + "# edited while the grid ran\n")
    with isolated_registries():
        load_plugins(trial.plugins)  # what the trial's worker does
        with pytest.raises(
            PluginChangedError, match=r"selection_policy 'tp_src_policy' \(file .*src_policy.py\)"
        ):
            check_plugin_sources(trial)


def test_a_grid_may_not_set_plugin_sources(tmp_path):
    from harness.grid import GridError, load_grid

    grid = tmp_path / "g.yaml"
    grid.write_text("base: {preset: micro, plugin_sources: {a: b}}\n")
    with pytest.raises(GridError, match="set by the grid itself"):
        load_grid(grid)
