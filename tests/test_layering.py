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


# --- inside harness: rooms and the arrows between them ---------------------------------------------
# The shared base (the trial config, grid files, the results store, plugins, names, errors,
# provenance) imports no room. The task (data, detector, training, measurement) imports only the
# base. Running a grid and reporting on it are siblings: run writes the store, report reads it, and
# neither imports the other (the run is handed a report renderer by the command line, which alone
# imports both). The bench times the task's models and imports neither run nor report.
HARNESS_BASE = {"cli", "config", "grid", "results", "plugins", "names", "errors", "provenance"}
HARNESS_ROOMS = {"run", "report", "task", "bench"}
MAY_IMPORT = {
    "base": set(),
    "task": set(),
    "run": {"task"},
    "report": set(),
    "bench": {"task"},
    "cli": {"run", "report", "task", "bench"},
}


def _room(module: str) -> str | None:
    """The room of ``harness.x.y`` (``run``, ``report``, ``task``, ``bench``), ``base``, ``cli``."""
    parts = module.split(".")
    if parts[0] != "harness" or len(parts) < 2:
        return None
    if parts[1] in HARNESS_ROOMS:
        return parts[1]
    return "cli" if parts[1] == "cli" else "base"


def _harness_imports(path: Path) -> set[str]:
    """Every ``harness.*`` module a file imports, at module level or inside a function."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("harness."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "harness":
                out.update(f"harness.{a.name}" for a in node.names)
            elif node.module.startswith("harness."):
                out.add(node.module)
    return out


def _harness_files() -> dict[str, Path]:
    files = {}
    for p in sorted((ROOT / "harness").rglob("*.py")):
        mod = ".".join(p.relative_to(ROOT).with_suffix("").parts)
        files[mod.removesuffix(".__init__")] = p
    return files


def test_harness_rooms_import_only_what_they_may() -> None:
    bad = {}
    for mod, path in _harness_files().items():
        room = _room(mod)
        if room is None:
            continue
        allowed = MAY_IMPORT[room] | {room, "base"}
        wrong = sorted(m for m in _harness_imports(path) if _room(m) not in allowed)
        if wrong:
            bad[str(path.relative_to(ROOT))] = wrong
    assert not bad, f"imports across harness rooms that the layout forbids: {bad}"


def test_harness_has_no_import_circle() -> None:
    files = _harness_files()
    graph = {m: {i for i in _harness_imports(p) if i in files and i != m} for m, p in files.items()}
    # a package's __init__ that re-exports its modules is a face, not an arrow back
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        seen[m] = 1
        for n in sorted(graph[m]):
            if seen.get(n) == 1:
                raise AssertionError(f"import circle: {' -> '.join([*path, m, n])}")
            if n not in seen:
                visit(n, [*path, m])
        seen[m] = 2

    for m in sorted(graph):
        if m not in seen:
            visit(m, [])


def test_every_harness_file_is_in_a_known_room() -> None:
    """A new top-level module or package is a decision about the layout: add it to the base or to a
    room. A part of the base may be a package of its own (``harness/grid/``): it stays in the base."""
    top = {p.stem for p in (ROOT / "harness").glob("*.py")} - {"__init__"}
    packages = {p.name for p in (ROOT / "harness").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert top <= HARNESS_BASE, sorted(top - HARNESS_BASE)
    assert packages <= HARNESS_ROOMS | HARNESS_BASE, sorted(packages - HARNESS_ROOMS - HARNESS_BASE)
