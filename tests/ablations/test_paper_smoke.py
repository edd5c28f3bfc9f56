"""ablations/grids/paper-smoke.yaml end to end (``spa-harness run`` on an embedded Ray, as a user runs
it): paper.yaml's recipe and pipeline at CI size on a COCO-format folder the built-in generator writes,
resized to non-square images of several shapes (keep-ratio resize, flips, multi-scale, crops, padded
batches), every model loading a timm Swin of the micro preset's shape saved with random weights, the
step schedule in epochs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.config import DataConfig
from harness.results import load
from harness.task.builtin_data import builtin_dataset
from harness.task.transforms import resize_boxes
from tests._timm import timm_swin

ROOT = Path(__file__).resolve().parents[2]

# The "ray" xdist group runs every test that starts Ray on one worker, one at a time (scripts/test.sh).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]


# (height, width) the generated squares are resized to, in turn: landscape, portrait and square shapes
# of several sizes, as COCO's are (the built-in generator draws fixed squares)
_SHAPES = [(96, 160), (160, 96), (128, 200), (112, 112)]


def _reshape(folder: Path) -> None:
    """Resize every image of a generated COCO folder to ``_SHAPES`` in turn, boxes scaled with it."""
    from PIL import Image

    for split in ("train", "val"):
        ann = folder / "annotations" / f"instances_{split}.json"
        coco = json.loads(ann.read_text())
        sizes = {}  # image id -> (old, new) (height, width)
        for k, img in enumerate(coco["images"]):
            h, w = _SHAPES[k % len(_SHAPES)]
            path = folder / split / img["file_name"]
            Image.open(path).convert("RGB").resize((w, h)).save(path)
            sizes[img["id"]] = ((img["height"], img["width"]), (h, w))
            img["width"], img["height"] = w, h
        for a in coco["annotations"]:
            x, y, bw, bh = a["bbox"]
            box = resize_boxes(torch.tensor([[x, y, x + bw, y + bh]]), *sizes[a["image_id"]])[0].tolist()
            a["bbox"] = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
            a["area"] = a["bbox"][2] * a["bbox"][3]
        ann.write_text(json.dumps(coco))


def test_the_paper_grid_at_ci_size_takes_every_path(tmp_path):
    ckpt = tmp_path / "swin_micro_timm.pth"
    torch.save(timm_swin("micro").state_dict(), ckpt)
    folder = builtin_dataset(
        DataConfig(num_train=16, num_val=8, cache_dir=str(tmp_path / "gen")), progress=False
    )
    _reshape(folder)
    sizes = {
        (i["height"], i["width"])
        for i in json.loads((folder / "annotations/instances_val.json").read_text())["images"]
    }
    assert any(h != w for h, w in sizes) and len(sizes) > 1  # non-square images of several shapes
    grid = tmp_path / "paper-ci.yaml"
    grid.write_text(
        "extends: paper-smoke\n"
        "name: paper-ci\n"
        "base:\n"
        f"  model: {{pretrained: {ckpt}}}\n"
        f"  data: {{dataset: coco, root: {folder}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["DS_ACCELERATOR"] = "cpu"
    store = tmp_path / "results"
    cmd = [sys.executable, "-m", "harness.cli", "run", str(grid), "--results", str(store), "--no-progress"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"stdout:\n{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"

    rows = load(store / "paper-ci").set_index("name")
    assert sorted(rows.index) == ["dense", "keep-all", "spt-t"] and (rows["status"] == "done").all()
    for name, row in rows.iterrows():
        cfg = json.loads(row["config_json"])
        assert cfg["data"]["resize"] == "keep_ratio" and cfg["data"]["flip"] == 0.5, name
        assert cfg["data"]["train_short_sides"] == [120, 160, 200] and cfg["data"]["crop_prob"] == 0.5
        assert cfg["train"]["schedule"] == "step" and cfg["train"]["epochs"] == 0.5
        assert row["steps"] == 4  # half an epoch of 16 images in batches of 2
        assert row["bench_padding_fraction"] > 0  # the benchmark batch is padded to its largest image
        # every model loaded the checkpoint; what it had no weights for is listed
        assert row["pretrained_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest(), name
        missing = set(row["pretrained_missing"].split(", "))
        assert "norms" in missing and not any(m.startswith(("patch_embed", "merges")) for m in missing)
        assert np.isfinite([row["task_loss"], row["map"], row["gmacs"]]).all()
    spt = rows.loc["spt-t"]
    extra = {f"stages.2.{j}" for j in range(1, 5)}  # SPT's 4 extra stage-3 blocks: no source in a Swin
    assert extra <= set(spt["pretrained_missing"].split(", "))
    assert {"stages.2.0.gate", "stages.3.0.gate"} <= set(spt["pretrained_missing"].split(", "))
    assert spt["speedup_baseline"] == "dense" and 0 <= spt["kept_fraction"] <= 1
    # the exact null: Swin-T's network through SPA's machinery, every real token kept, no gate scaling,
    # on padded batches: dense's training to float rounding
    keep, dense = rows.loc["keep-all"], rows.loc["dense"]
    assert keep["kept_fraction"] == 1.0  # padding is neither kept nor counted as dropped
    assert keep["task_loss"] == pytest.approx(dense["task_loss"], rel=1e-4)
    assert keep["gmacs"] == pytest.approx(dense["gmacs"], rel=0.01)  # the gates' scores only
