"""docs/CONTRACTS.md points at the code instead of repeating it: every dotted name it gives resolves
and carries a docstring (the contract), every file it names exists."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "CONTRACTS.md"
NAME = re.compile(r"`((?:kernels|spa_core|harness|ablations)(?:\.\w+)*)`")
FILE = re.compile(r"`((?:[\w.-]+/)+[\w.-]*)`")


def _resolve(dotted: str) -> object:
    """The module, or the attribute of the longest importable module prefix, named ``dotted``."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)  # AttributeError names what is missing
        return obj
    raise ModuleNotFoundError(dotted)


def test_the_page_names_code():
    assert len(set(NAME.findall(PAGE.read_text()))) > 40


@pytest.mark.parametrize("dotted", sorted(set(NAME.findall(PAGE.read_text()))))
def test_every_name_resolves_to_documented_code(dotted):
    obj = _resolve(dotted)
    if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj):
        doc = inspect.getdoc(obj)
        assert doc and len(doc) > 20, f"{dotted} has no docstring: its contract belongs there"


@pytest.mark.parametrize("path", sorted(set(FILE.findall(PAGE.read_text()))))
def test_every_file_exists(path):
    assert (ROOT / path).exists(), path
