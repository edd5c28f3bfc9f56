"""harness/grid/yaml_lines.py: a grid that is not valid YAML, or repeats a key, is one error naming
the file and the line."""

from __future__ import annotations

import pytest

from tests.harness.grid._grid_files import BASE, assert_bad_grid

# --- bad grids: one error naming file, line, key and what was expected ------------------------------

BAD = {
    "duplicate YAML key": (BASE + "  preset: tiny\n", 4, "base.preset", "duplicate key"),
    "YAML syntax": (BASE + "axes: {model.spa.ratio: [0.5}\n", 4, None, "not valid YAML"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_grid(tmp_path, case):
    assert_bad_grid(tmp_path, *BAD[case])
