"""docs/write-a-variant.md: the plugin and the grid on that page, run exactly as written there, a whole
trial included (``spa-harness run my_grid.yaml`` on an embedded Ray), and an edit of the plugin
making its trial run again."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.grid import load_grid
from harness.plugins import isolated_registries, load_plugins
from harness.report import compare
from harness.results import load
from spa_core import contracts
from spa_core.block import SPABlock
from spa_core.config import SPAConfig
from spa_core.loss import gate_loss
from spa_core.select import select_gate, select_tokens

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "write-a-variant.md"
SMOKE = ROOT / "ablations" / "grids" / "smoke.yaml"


def _blocks(marker: str, lang: str) -> list[str]:
    """Every ```lang block of the page whose first line starts with ``# marker``, that line included."""
    text = PAGE.read_text()
    found = re.findall(rf"```{lang}\n(# {re.escape(marker)}.*?)```", text, re.S)
    assert found, f"no ```{lang} block starting with '# {marker}' in {PAGE}"
    return found


def _write(folder: Path) -> tuple[Path, Path]:
    """The page's plugin (its blocks in order: the file, then each 'continued') and grid, beside each
    other in ``folder``; the grid's ``extends: smoke.yaml`` pointed at the built-in smoke grid."""
    folder.mkdir(parents=True, exist_ok=True)
    plugin = folder / "my_variants.py"
    plugin.write_text("\n\n".join(_blocks("my_variants.py", "python")))
    grid = folder / "my_grid.yaml"
    [text] = _blocks("my_grid.yaml, beside my_variants.py", "yaml")
    grid.write_text(text.replace("extends: smoke.yaml", f"extends: {SMOKE}"))
    return plugin, grid


@pytest.fixture
def page(tmp_path):
    """The page's plugin loaded (its module) and its files."""
    plugin, grid = _write(tmp_path / "page")
    with isolated_registries(), contracts.checking("always"):
        [module] = load_plugins([str(plugin)])
        yield module, plugin, grid


def test_the_pages_plugin_keeps_at_least_ratio_n_tokens_and_trains_the_gate(page):
    torch.manual_seed(0)
    blk = SPABlock(16, 2, 4, SPAConfig(selection="gate_at_least", ratio=0.25)).train()
    blk.generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        blk.gate.score.bias.fill_(-6.0)  # a gate that keeps almost nothing on its own
    y, info = blk(torch.randn(3, 8, 8, 16))  # the contract checked on the way (mode always)
    assert (info.counts >= 16).all()  # round(0.25 * 64)
    y.sum().backward()
    assert blk.gate.score.weight.grad.abs().sum() > 0


def test_the_contract_error_the_page_quotes_is_what_a_wrong_mask_gives(tmp_path):
    """The page's plugin with a (B, 2N) mask: the error the page shows, with the file and line."""
    plugin, _ = _write(tmp_path)
    plugin.write_text(plugin.read_text().replace("return Selection(mask=mask, counts=mask.sum(1), weight=weight)",
                                                 "mask = torch.cat([mask, mask], 1)\n"
                                                 "    return Selection(mask=mask, counts=mask.sum(1), weight=weight)"))  # fmt: skip
    quoted = re.search(r"```text\n(ContractError: .*?)```", PAGE.read_text(), re.S).group(1)
    quoted = " ".join(quoted.split()).replace("/home/me/my_variants.py", str(plugin)).removesuffix(" ...")
    with isolated_registries():
        load_plugins([str(plugin)])
        blk = SPABlock(8, 2, 4, SPAConfig(selection="gate_at_least", ratio=0.25))
        with pytest.raises(contracts.ContractError) as info:
            blk(torch.randn(4, 4, 4, 8))
    assert f"ContractError: {info.value}".startswith(quoted)


@pytest.mark.parametrize("training", [True, False])
def test_the_compute_matched_control_keeps_the_gates_counts_elsewhere(page, training):
    torch.manual_seed(0)
    scores, tokens = torch.randn(4, 49) * 2, torch.randn(4, 49, 8)
    cfg = SPAConfig(selection="gate_count_unlike")
    mine = select_tokens(
        scores, cfg, training=training, generator=torch.Generator().manual_seed(3), tokens=tokens
    )
    gate = select_gate(scores, cfg=cfg, training=training, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mine.counts, gate.counts)  # the gate's compute, image by image
    assert not torch.equal(mine.mask, gate.mask)  # at other places
    unlike = -torch.nn.functional.cosine_similarity(tokens, tokens.mean(1, keepdim=True), dim=-1)
    for b in range(4):  # the kept tokens are the image's most unlike ones
        kept, dropped = unlike[b][mine.mask[b]], unlike[b][~mine.mask[b]]
        if len(kept) and len(dropped):
            assert kept.min() >= dropped.max()


def test_the_focal_supervision_mode_is_a_finite_scalar_that_trains_the_gate(page):
    torch.manual_seed(0)
    blk = SPABlock(16, 2, 4, SPAConfig(selection="topk", supervision="focal", alpha=0.5)).train()
    _, info = blk(torch.randn(2, 8, 8, 16))
    labels = {(8, 8): (torch.rand(2, 8, 8) < 0.3).float()}
    loss = gate_loss([info], labels, blk.cfg)  # checked: a finite scalar
    bce = torch.nn.functional.binary_cross_entropy_with_logits(info.logits, labels[(8, 8)].reshape(2, 64))
    assert 0 < loss.item() < 0.5 * bce.item()  # focal: the confident tokens weigh less than in BCE
    loss.backward()
    assert blk.gate.score.weight.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("selection", ["gate_at_least", "gate_count_unlike"])
def test_fvcore_traces_the_pages_policies(page, selection):
    """The page's code under fvcore's torch.jit.trace (what failed before: round() of a traced shape,
    scatter_ with a Python bool)."""
    from harness.config import trial_from_dict
    from harness.task.detector import build_detector
    from harness.task.measure import fvcore_macs

    cfg = trial_from_dict({"preset": "micro", "model": {"spa": {"selection": selection, "ratio": 0.1}}})
    macs = fvcore_macs(build_detector(cfg).eval(), torch.randn(2, 3, 64, 64))
    assert macs["total"] > macs["attn"] > 0


def test_the_pages_grid_loads_with_its_plugin_and_warns_of_nothing(page):
    _, plugin, grid_file = page
    grid = load_grid(grid_file)
    assert grid.warnings == []
    spa = [t for t in grid.trials if t.model.spa is not None]
    assert [(t.name, t.model.spa.selection, t.model.spa.supervision, t.model.spa.ratio) for t in spa] == [
        ("ratio=0.1", "gate_at_least", "focal", 0.1)
    ]
    assert set(spa[0].plugin_sources) == {"selection_policy:gate_at_least", "supervision_mode:focal"}
    assert [t.name for t in grid.trials if t.model.spa is None] == ["dense"]


def test_the_warning_the_page_quotes_is_what_a_base_ratio_gives(page):
    """The page says a ratio in ``base`` would be overridden by smoke.yaml's axis, and quotes the warning."""
    _, _, grid_file = page
    text = grid_file.read_text()
    moved = text.replace("  model.spa: {selection: gate_at_least, supervision: focal}",
                         "  model.spa: {selection: gate_at_least, ratio: 0.1, supervision: focal}")  # fmt: skip
    moved = moved[: moved.index("axes:")]
    grid_file.write_text(moved)
    [warning] = load_grid(grid_file).warnings
    quoted = re.search(r"`warning: \.\.\./(smoke\.yaml:\d+: .*?) set at\s+\.\.\./(my_grid\.yaml:\d+) \.\.\.`",
                       PAGE.read_text(), re.S)  # fmt: skip
    head, place = " ".join(quoted.group(1).split()), quoted.group(2)
    assert warning.startswith(f"{SMOKE.parent}/{head} set at {grid_file.parent}/{place} ")


def test_variants_lists_the_pages_entries(tmp_path):
    plugin, _ = _write(tmp_path)
    out = subprocess.run([sys.executable, "-m", "harness.cli", "variants", "--plugin", str(plugin)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    for name in ("gate_at_least", "gate_count_unlike", "focal"):
        assert re.search(rf"\b{name}\s+file {re.escape(str(plugin))}", out.stdout), out.stdout


# --- the whole walk-through: spa-harness run of the page's grid, then an edit of its plugin ------------


def _cli(*args, env, folder, timeout=900):
    cmd = [sys.executable, "-m", "harness.cli", *map(str, args)]
    p = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, (
        f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"
    )
    return p


@pytest.mark.slow
@pytest.mark.xdist_group("ray")
def test_the_walkthrough_end_to_end_and_an_edited_plugin_runs_again(tmp_path):
    """The page's commands in the page's folder: the plugin's trial trains, evaluates, counts FLOPs
    and times itself; after an edit of the plugin, --dry-run says its trial runs again and why, and
    the next run runs it (only it: dense is kept)."""
    folder = tmp_path / "me"
    plugin, grid = _write(folder)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "SPA_HARNESS_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    store = folder / "results"  # the default --results, in the page's folder
    first = _cli("run", "my_grid.yaml", "--no-progress", env=env, folder=folder)
    assert "warning:" not in first.stderr

    df = load(store / "gate_at_least").set_index("name")
    assert set(df.index) == {"ratio=0.1", "dense"} and set(df["status"]) == {"done"}, df[["status", "error"]]
    row = df.loc["ratio=0.1"]
    assert row["model.spa.selection"] == "gate_at_least" and row["model.spa.supervision"] == "focal"
    assert math.isfinite(row["map"]) and math.isfinite(row["gate_loss"]) and row["gate_loss"] > 0
    assert 0.1 <= row["kept_fraction"] <= 1.0  # at least round(0.1 * N) of every block's tokens
    assert row["gmacs"] > 0 and row["flop_images"] == 16  # smoke's 16 val images (bench.flop_images 32)
    assert row["analytic_attn_gmacs"] == pytest.approx(row["fvcore_attn_gmacs"], rel=1e-9)
    assert row["infer_ms"] > 0 and row["speedup_vs_dense"] > 0
    sources = json.loads(row["config_json"])["plugin_sources"]
    assert set(sources) == {"selection_policy:gate_at_least", "supervision_mode:focal"}
    dense_row = (
        store / "gate_at_least" / "trials" / df.loc["dense", "config_hash"] / "row.json"
    ).read_bytes()
    table = compare(store / "gate_at_least")  # what `spa-harness report` shows: the variant against dense
    assert table.loc["dense", "verdict"] == "baseline" and math.isfinite(table.loc["ratio=0.1", "map_delta"])
    assert "ratio=0.1" in first.stdout and "Δ" in first.stdout  # the report printed after the run

    plugin.write_text(plugin.read_text() + "\n# fixed a bug\n")
    dry = _cli("run", "my_grid.yaml", "--dry-run", env=env, folder=folder).stdout
    flat = " ".join(dry.replace("│", " ").split())
    assert "would run: plugin changed since the stored row: selection_policy 'gate_at_least'" in flat, dry
    assert "done (kept)" in flat  # dense uses no entry of the plugin

    second = _cli("run", "my_grid.yaml", "--no-progress", "--no-report", env=env, folder=folder)
    assert "rerun: ratio=0.1 (seed 0): plugin changed since the stored row" in second.stdout
    after = load(store / "gate_at_least")
    assert len(after) == 3 and set(after["status"]) == {"done"}  # the old row stays beside the new one
    hashes = after[after["name"] == "ratio=0.1"]["config_hash"]
    assert len(set(hashes)) == 2
    assert (
        store / "gate_at_least" / "trials" / df.loc["dense", "config_hash"] / "row.json"
    ).read_bytes() == dense_row
    status = _cli("status", store / "gate_at_least", env=env, folder=folder, timeout=120).stdout
    assert "2 done" in status  # the experiment's current trials
