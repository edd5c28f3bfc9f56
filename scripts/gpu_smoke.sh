#!/usr/bin/env bash
# The first thing to run on a machine with one or more GPUs, before any real grid (docs/cluster.md,
# "GPU cluster", describes its output):
#   1. what torch sees: CUDA build, devices, bf16; DS_ACCELERATOR must not be set to anything but cuda;
#   2. the CUDA tests (pytest -m gpu): a detector trains in bf16 through FlexAttention, its FLOP count
#      on the GPU equals the CPU's, the DeepSpeed engine runs bf16 and the row says so;
#   3. the GPU smoke grid (ablations/grids/gpu_smoke.yaml: dense, SPA containers, SPA varlen), each a
#      2-worker NCCL DeepSpeed trial on 2 GPUs (1 worker when the machine has one GPU), and a check
#      of every row: done, on CUDA, bf16, FLOPs, timings, checkpoints saved, no measurement failed.
# Usage: bash scripts/gpu_smoke.sh [RESULTS]   (default /tmp/spa-gpu-smoke; PYTHON=... picks the Python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
RESULTS="${1:-/tmp/spa-gpu-smoke}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n "${DS_ACCELERATOR:-}" && "${DS_ACCELERATOR}" != "cuda" ]]; then
    echo "warning: DS_ACCELERATOR=${DS_ACCELERATOR} is set; unset here (on GPU nodes leave it unset)" >&2
    unset DS_ACCELERATOR
fi

echo "== 1/3 torch and the GPUs"
GPUS=$("$PY" - <<'PY'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda}); "
             "install torch's CUDA build (docs/cluster.md, GPU cluster)")
n = torch.cuda.device_count()
for i in range(n):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm{p.major}{p.minor}", file=sys.stderr)
print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), bf16: {torch.cuda.is_bf16_supported()}",
      file=sys.stderr)
if not torch.cuda.is_bf16_supported():
    sys.exit("error: this GPU has no bf16; the smoke grid runs bf16")
print(n)
PY
)

echo "== 2/3 the CUDA tests (pytest -m gpu)"
"$PY" -m pytest -m gpu -p no:cacheprovider -q tests/harness/task/test_cuda.py

echo "== 3/3 the GPU smoke grid on ${GPUS} GPU(s), results in ${RESULTS}"
GRID=ablations/grids/gpu_smoke.yaml
WORKERS=2
if (( GPUS < 2 )); then  # one GPU: one worker per trial (two NCCL ranks cannot share a device)
    WORKERS=1
    GRID=$(mktemp --suffix=.yaml)
    trap 'rm -f "$GRID"' EXIT
    printf 'extends: %s\nname: gpu-smoke\nresources: {workers: 1}\n' "$PWD/ablations/grids/gpu_smoke.yaml" > "$GRID"
fi
"$PY" -m harness.cli run "$GRID" --results "$RESULTS" --name gpu-smoke --rerun --no-progress --no-report

"$PY" - "$RESULTS/gpu-smoke" "$WORKERS" <<'PY'
import math
import sys

from harness.results import load

rows, workers = load(sys.argv[1]), int(sys.argv[2])
problems = []
for _, r in rows.sort_values("name").iterrows():
    def bad(why):
        problems.append(f"{r['name']}: {why}")

    if r["status"] != "done":
        bad(f"{r['status']}: {r.get('error')}")
        continue
    checks = {
        "device is CUDA": str(r.get("device", "")).startswith("cuda"),
        f"world size {workers}": r.get("world_size") == workers,
        "engine ran bf16": r.get("precision") == "bf16",
        "FLOPs counted": (r.get("gmacs") or 0) > 0,
        "inference timed": (r.get("infer_ms") or 0) > 0,
        "training step timed": (r.get("train_step_ms") or 0) > 0,
        "checkpoints saved": (r.get("checkpoint_s") or 0) > 0,
        "no measurement failed": not r.get("measure_failed"),
        "finite mAP": isinstance(r.get("map"), float) and math.isfinite(r["map"]),
    }
    for what, ok in checks.items():
        if not ok:
            bad(f"not {what}")
    print(f"  {r['name']:15s} {r['device']:>8s} x{r['world_size']} {r['precision']}  "
          f"gmacs {r['gmacs']:.3f}  infer {r['infer_ms']:.1f} ms  step {r['train_step_ms']:.1f} ms  "
          f"checkpoints {r['checkpoint_s']:.1f} s  mAP {r['map']:.4f}  kept {r['kept_fraction']:.2f}")
if len(rows) != 3:
    problems.append(f"{len(rows)} rows, expected 3")
if problems:
    print("GPU smoke FAILED:\n  " + "\n  ".join(problems))
    sys.exit(1)
print("GPU smoke passed: 3 trials on CUDA in bf16 with FLOPs, timings and checkpoints")
PY
