"""docs/write-a-variant.md: the plugin and the grid on that page, run exactly as written there."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from harness.grid import load_grid
from harness.plugins import isolated_registries, load_plugins
from spa_core.block import SPABlock
from spa_core.config import SPAConfig

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "write-a-variant.md"


def _block_after(marker: str, lang: str) -> str:
    text = PAGE.read_text()
    m = re.search(rf"```{lang}\n# {re.escape(marker)}\n(.*?)```", text, re.S)
    assert m, f"no ```{lang} block starting with '# {marker}' in {PAGE}"
    return m.group(1)


def _write(tmp_path: Path) -> tuple[Path, Path]:
    plugin = tmp_path / "my_variants.py"
    plugin.write_text(_block_after("my_variants.py", "python"))
    grid = tmp_path / "my_grid.yaml"
    grid.write_text(
        _block_after("my_grid.yaml, beside my_variants.py", "yaml").replace(
            "extends: smoke.yaml", f"extends: {ROOT / 'ablations' / 'grids' / 'smoke.yaml'}"
        )
    )
    return plugin, grid


def test_the_pages_plugin_keeps_at_least_ratio_n_tokens_and_trains_the_gate(tmp_path):
    plugin, _ = _write(tmp_path)
    with isolated_registries():
        load_plugins([str(plugin)])
        torch.manual_seed(0)
        blk = SPABlock(16, 2, 4, SPAConfig(selection="gate_at_least", ratio=0.25)).train()
        blk.generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            blk.gate.score.bias.fill_(-6.0)  # a gate that keeps almost nothing on its own
        y, info = blk(torch.randn(3, 8, 8, 16))
        assert (info.counts >= 16).all()  # round(0.25 * 64)
        y.sum().backward()
        assert blk.gate.score.weight.grad.abs().sum() > 0


def test_the_pages_grid_loads_with_its_plugin_and_variants_lists_it(tmp_path):
    plugin, grid_file = _write(tmp_path)
    with isolated_registries():
        grid = load_grid(grid_file)
        assert {t.model.spa.selection for t in grid.trials if t.model.spa is not None} == {"gate_at_least"}
    out = subprocess.run(
        [sys.executable, "-m", "harness.cli", "variants", "--plugin", str(plugin)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "gate_at_least" in out.stdout
