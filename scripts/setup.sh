#!/usr/bin/env bash
# Make (or reuse) the virtual environment at .venv in this checkout and install the project into it.
# torch is installed first, pinned to the CPU build on this machine's disk; with it present, the
# project's torch range installs nothing more (a bare `torch` would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
# DeepSpeed's setup.py imports torch: build it against the torch installed above.
.venv/bin/python -c "import deepspeed" 2>/dev/null || \
    DS_BUILD_OPS=0 .venv/bin/python -m pip install -q --no-build-isolation "deepspeed>=0.17.6,<0.20"
# The installed torch is pinned for this step: timm (a test dependency) needs torchvision, and pip would
# otherwise satisfy it with the newest torchvision and the newer (CUDA) torch that one pins.
PIN=$(mktemp)
.venv/bin/python -c "import torch; print('torch==' + torch.__version__)" > "$PIN"
.venv/bin/python -m pip install -q -e ".[test]" -c "$PIN"
rm -f "$PIN"
# Build the C++ CPU kernels now (about a minute, once per machine and torch version; cached under
# ~/.cache/torch_extensions) rather than in the first test or trial that runs attention.
.venv/bin/python -m kernels.cpu_ext
# And DeepSpeed's shared-memory collectives, which its first CPU initialisation would build (about 30 s):
# a trial ended by its deadline during that build leaves torch's lock file behind, and every later
# DeepSpeed start on the machine would wait on it for good.
DS_ACCELERATOR=cpu .venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
