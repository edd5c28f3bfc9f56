"""harness/plugins.py and spa_core/registry.py: duplicate / unknown names, plugins by file, module and
entry point, and the variants listing."""

from __future__ import annotations

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
        "from spa_core.registry import PACK_STRATEGIES\n"
        "from spa_core.strategies import PackStrategy\n"
        "def register():\n"
        "    f = lambda *a, **k: None\n"
        "    PACK_STRATEGIES.register('tp_ep_pack', PackStrategy(f, f, f))\n"
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
