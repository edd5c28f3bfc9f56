"""Repository habits that a reader relies on: the LICENSE is the license pyproject.toml declares, the
pre-commit hooks run the lint of the test command, module docstrings say what a module is for."""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["kernels", "spa_core", "harness", "ablations"]
# First words of the full text of each license pyproject.toml may name (SPDX id).
LICENSE_HEADS = {"Apache-2.0": ("Apache License", "Version 2.0, January 2004")}


def test_license_file_is_the_license_pyproject_declares():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"]
    assert declared in LICENSE_HEADS, f"no known full text for {declared!r}"
    head = [line.strip() for line in (ROOT / "LICENSE").read_text().splitlines()[:4]]
    for words in LICENSE_HEADS[declared]:
        assert words in head, (words, head)
    assert "END OF TERMS AND CONDITIONS" in (ROOT / "LICENSE").read_text()  # the full text, not a stub


def _test_sh_lint() -> list[str]:
    """The commands of scripts/test.sh before its test run (the lint), without the .venv prefix."""
    out = []
    for line in (ROOT / "scripts" / "test.sh").read_text().splitlines():
        if line.startswith(".venv/bin/python -m ") and " pytest " not in line:
            out.append(line.removeprefix(".venv/bin/python -m "))
    return out


def test_pre_commit_runs_the_lint_of_the_test_command():
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = [h for repo in config["repos"] for h in repo["hooks"]]
    entries = []
    for h in hooks:
        assert h["language"] == "system" and h["pass_filenames"] is False, h  # whole repository, as CI
        entries.append(shlex.join(shlex.split(h["entry"])).removeprefix(".venv/bin/python -m "))
    lint = _test_sh_lint()
    assert lint == ["ruff check .", "ruff format --check .", "mypy"]
    assert entries == lint


def _module_docstrings() -> list[tuple[str, str]]:
    out = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text()))
            if doc:
                out.append((str(path.relative_to(ROOT)), doc))
    return out


# A docstring defending its module's length: "(about 800 lines)", "in one file (about", "one file for".
SIZE_TALK = re.compile(r"\babout \d+ lines\b|\b\d+ lines\)|\bin one file\b|\bone file for\b", re.IGNORECASE)


def test_the_size_pattern_sees_what_it_is_for():
    assert SIZE_TALK.search("One file for one format (about 800 lines): reading it")
    assert SIZE_TALK.search("its layers in one file (about 500 lines) as flash-attention keeps")
    assert not SIZE_TALK.search("Grid files: what an ablation runs, expanded into trial configs.")


@pytest.mark.parametrize("path,doc", _module_docstrings(), ids=lambda v: v if v.endswith(".py") else "")
def test_module_docstrings_say_what_a_module_is_for_not_how_long_it_is(path, doc):
    assert not SIZE_TALK.search(doc), f"{path}: {SIZE_TALK.search(doc).group(0)!r}"
