#!/usr/bin/env bash
# Set up .venv (reused when present), then lint, check the formatting and the types (mypy, over the
# files pyproject.toml names) and run the whole test suite, slow end-to-end tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu
# The lint: the same three commands as .pre-commit-config.yaml (tests/test_habits.py checks they agree).
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
.venv/bin/python -m mypy
# Two pytest workers (pytest-xdist). The tests that start an embedded Ray form the "ray" group and the
# two-node cluster tests the "cluster" group: each group runs on one worker, one test at a time, so at
# most two Rays share the machine. SPA_TEST_WORKERS=0 runs serially.
.venv/bin/python -m pytest -n "${SPA_TEST_WORKERS:-2}" --dist loadgroup "$@"
