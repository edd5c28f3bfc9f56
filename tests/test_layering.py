"""The direction of imports: ablations -> harness -> spa_core -> kernels; nothing lower imports higher,
and the method (spa_core, kernels) is importable without Ray or DeepSpeed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["kernels", "spa_core", "harness", "ablations"]  # low -> high


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", ORDER)
def test_no_upward_imports(package: str) -> None:
    higher = set(ORDER[ORDER.index(package) + 1 :])
    bad = {
        str(p.relative_to(ROOT)): sorted(_imports(p) & higher)
        for p in sorted((ROOT / package).rglob("*.py"))
        if _imports(p) & higher
    }
    assert not bad, f"{package} imports from higher layers: {bad}"


@pytest.mark.parametrize("package", ["kernels", "spa_core"])
def test_method_imports_without_ray_or_deepspeed(package: str) -> None:
    code = (
        f"import sys, {package}; "
        "bad = sorted(m for m in ('ray', 'deepspeed', 'triton') if m in sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
