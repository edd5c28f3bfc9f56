"""Grid files for the grid tests: a base that resolves, three variants for contrasts, writing a file,
and the check every bad grid meets (one error naming the file, the line, the key and what was expected)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.grid import GridError, load_grid

BASE = """\
base:
  preset: micro
  train.steps: 2
"""

POINTS = (  # three variants, for the contrasts
    "points:\n  - {name: dense, model.variant: dense}\n  - {name: gate, model.spa.selection: gate}\n"
    "  - {name: gate-random, model.spa.selection: gate_random}\n"
)


def write(tmp_path: Path, text: str, name: str = "grid.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def grid_error(path: Path, **kw) -> GridError:
    """The ``GridError`` that loading ``path`` raises (``kw``: ``load_grid``'s)."""
    with pytest.raises(GridError) as info:
        load_grid(path, **kw)
    return info.value


def assert_bad_grid(tmp_path: Path, text: str, line: int, key: str | None, expected: str) -> None:
    """A grid file of ``text`` is refused with ``FILE:LINE: KEY: ...`` holding ``expected``."""
    path = write(tmp_path, text)
    err = grid_error(path)
    assert err.file == str(path.resolve())
    assert err.line == line, str(err)
    assert err.key == key, str(err)
    assert expected in str(err), str(err)
    prefix = f"{path.resolve()}:{line}: " + (f"{key}: " if key else "")
    assert str(err).startswith(prefix), str(err)
