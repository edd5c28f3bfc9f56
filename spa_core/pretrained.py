"""Loading a Swin checkpoint (Liu et al., 2021) from disk into the SPA backbone (arXiv 2410.23608).

Swin detection results, the paper's included, start from an ImageNet Swin. Two key layouts are read,
told apart by where patch merging sits (the classifier cannot tell them apart: headless checkpoints
have none):

- official (microsoft/Swin-Transformer, and the ``.pth`` files mmdetection's configs load; the dict
  may be under ``"model"`` or ``"state_dict"``): ``layers.{i}.blocks.{j}.*`` and
  ``layers.{i}.downsample.*`` at the *end* of stage i (stages 0..2 have one);
- timm (``timm.models.swin_transformer``): the same block names, ``layers.{i}.downsample.*`` at the
  *start* of stage i (stages 1..3 have one; timm's ``checkpoint_filter_fn`` moves it by one the same way).

Mapping onto this backbone (``spa_core.backbone.SPABackbone``): ``patch_embed.*`` as is,
``layers.{i}.blocks.{j}.{norm1,attn.qkv,attn.proj,attn.relative_position_bias_table,norm2,mlp.fc1,mlp.fc2}``
-> ``stages.{i}.{j}.*`` (Swin and SPA blocks alike: an SPA block holds its Swin block's weights under
the same names), the downsample -> ``merges.{k}.*`` (k the stage it follows). Ignored: the classifier
(``head.*``), the classification norm after the last stage (``norm.*``: the backbone has one output
norm per stage instead, as Swin for detection), and the buffers ``relative_position_index`` and
``attn_mask`` (this backbone computes both from the geometry). Left as initialised (and listed): the
gates, the per-stage output norms ``norms.*`` and the blocks ``extra_stage3_blocks`` adds to stage 3.

Anything else is an error that names the key: a checkpoint key that maps nowhere, a shape that
differs, a window that differs (the relative position table is sized ``(2M-1)^2`` by the window it
was trained with; it is not interpolated here), a backbone weight with no source.

Not done: no download (the path is a file on disk); the per-stage output norms are not taken from the
classification ``norm`` (mmdetection leaves them new, too).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["PretrainedLoad", "PretrainedError", "read_checkpoint", "checkpoint_layout", "load_pretrained"]


class PretrainedError(ValueError):
    """A checkpoint does not fit the backbone; the message names the key and what is wrong."""


@dataclass
class PretrainedLoad:
    """What ``load_pretrained`` did: ``layout`` ("official" | "timm"), ``loaded`` (backbone keys that
    got a weight), ``missing`` (backbone modules with no source, left as initialised: qualified names,
    a whole module where all its weights are missing), ``ignored`` (checkpoint keys not used),
    ``source`` (the path, or "<state dict>") and ``sha256`` of the file (None for a state dict)."""

    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    source: str = "<state dict>"
    sha256: str | None = None


_BLOCK_PARTS = (
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "attn.relative_position_bias_table",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
)
_MERGE_PARTS = ("norm.weight", "norm.bias", "reduction.weight")
_EMBED_PARTS = ("proj.weight", "proj.bias", "norm.weight", "norm.bias")
_BLOCK = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)")
_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.(.+)")
# Buffers the official code saves and the classification parts, none of which the backbone needs.
_IGNORED = re.compile(r"(.*\.relative_position_index|.*\.attn_mask|head\..*|norm\.(weight|bias))")


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict in the file at ``path`` (``torch.save`` / ``.pth``, or ``.safetensors``),
    unwrapped from ``"model"`` / ``"state_dict"`` when nested. Tensors only (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint {str(path)!r} does not exist (no download is attempted)"
        )
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # a dependency of timm, not of this package
            raise ImportError(
                f"reading {path} needs the safetensors package (pip install safetensors)"
            ) from e
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    return _unwrap(state, str(path))


def _unwrap(state: Mapping, where: str) -> dict[str, Tensor]:
    for key in ("model", "state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedError(
            f"{where}: expected a state dict of tensors (possibly under 'model'), got {type(state)}"
        )
    return dict(state)


def checkpoint_layout(keys) -> str:
    """ "official" or "timm", from where the patch merging weights sit (see the module docstring)."""
    keys = list(keys)
    stages = {int(m.group(1)) for k in keys if (m := _DOWNSAMPLE.fullmatch(k))}
    if not any(_BLOCK.fullmatch(k) for k in keys):
        raise PretrainedError(
            "not a Swin checkpoint in the official or timm layout: no 'layers.{i}.blocks.{j}.*' key "
            f"(first keys: {keys[:5]})"
        )
    if not stages:
        raise PretrainedError(
            "cannot tell the official layout from timm's: the checkpoint has no downsample keys"
        )
    if 0 in stages:
        return "official"
    return "timm"


def _target(key: str, layout: str) -> str | None:
    """The backbone key of checkpoint key ``key`` (None: ignored); PretrainedError if it maps nowhere."""
    if _IGNORED.fullmatch(key):
        return None
    if key.startswith("patch_embed.") and key[len("patch_embed.") :] in _EMBED_PARTS:
        return key
    m = _BLOCK.fullmatch(key)
    if m and m.group(3) in _BLOCK_PARTS:
        return f"stages.{m.group(1)}.{m.group(2)}.{m.group(3)}"
    m = _DOWNSAMPLE.fullmatch(key)
    if m and m.group(2) in _MERGE_PARTS:
        stage = int(m.group(1)) - (1 if layout == "timm" else 0)  # the stage the merge follows
        return f"merges.{stage}.{m.group(2)}"
    raise PretrainedError(f"checkpoint key {key!r} maps to nothing in this backbone")


def _table_window(rows: int) -> int | None:
    side = math.isqrt(rows)
    return (side + 1) // 2 if side * side == rows and side % 2 == 1 else None


def _allowed_missing(name: str, cfg) -> bool:
    """Backbone weights a Swin checkpoint has no source for: gates, output norms, extra stage-3 blocks."""
    if name.startswith("norms.") or ".gate." in name:
        return True
    m = re.match(r"stages\.2\.(\d+)\.", name)
    return m is not None and int(m.group(1)) >= cfg.depths[2]


def _collapse(names: list[str], all_names: list[str]) -> list[str]:
    """Qualified names -> the shortest module prefixes all of whose weights are in ``names``."""
    missing = set(names)
    out: list[str] = []
    for name in names:
        parts = name.split(".")
        best = name
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i]) + "."
            if all(n in missing for n in all_names if n.startswith(prefix)):
                best = prefix[:-1]
                break
        if best not in out:
            out.append(best)
    return out


@torch.no_grad()
def load_pretrained(model: nn.Module, source: str | Path | Mapping[str, Tensor]) -> PretrainedLoad:
    """Copy a Swin checkpoint into ``model`` (an ``SPABackbone``) in place; returns a ``PretrainedLoad``.

    source: a path (see ``read_checkpoint``) or a state dict (possibly under "model"). Raises
    ``PretrainedError`` naming the key for a key that maps nowhere, a shape or window that differs, or
    a backbone weight without a source other than gates, output norms and extra stage-3 blocks; the
    model is left unchanged then (every check runs before the first copy)."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or not hasattr(model, "stages") or not hasattr(model, "merges"):
        raise PretrainedError(
            f"pretrained weights load into spa_core's SPABackbone, not {type(model).__name__}"
        )
    if cfg.stem != "patch":
        raise PretrainedError(
            f"a Swin checkpoint holds a one-conv patch embedding; model.stem {cfg.stem!r} has no source "
            "in it: set model.stem: patch to load pretrained weights"
        )
    if isinstance(source, Mapping):
        state, where, digest = _unwrap(source, "state dict"), "<state dict>", None
    else:
        state, where = read_checkpoint(source), str(source)
        digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    layout = checkpoint_layout(state)
    own = model.state_dict()
    plan: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in state.items():
        try:
            target = _target(key, layout)
        except PretrainedError as e:
            raise PretrainedError(f"{where}: {e}") from None
        if target is None:
            ignored.append(key)
            continue
        if target not in own:
            raise PretrainedError(
                f"{where}: checkpoint key {key!r} ({layout} layout) maps to {target!r}, which this backbone "
                f"does not have (depths {tuple(cfg.depths)}, extra_stage3_blocks {cfg.extra_stage3_blocks})"
            )
        if target.endswith("relative_position_bias_table") and value.shape[0] != own[target].shape[0]:
            theirs = _table_window(value.shape[0])
            raise PretrainedError(
                f"{where}: checkpoint key {key!r} is a relative position table for window "
                f"{theirs if theirs else '?'} ({value.shape[0]} rows), the backbone's window is "
                f"{cfg.window_size} ({own[target].shape[0]} rows): the windows must match (set "
                "model.window_size; tables are not interpolated)"
            )
        if value.shape != own[target].shape:
            raise PretrainedError(
                f"{where}: checkpoint key {key!r} has shape {tuple(value.shape)}, the backbone's {target!r} "
                f"has {tuple(own[target].shape)}"
            )
        plan[target] = value
    unfed = [n for n in own if n not in plan]
    bad = [n for n in unfed if not _allowed_missing(n, cfg)]
    if bad:
        raise PretrainedError(
            f"{where}: {len(bad)} backbone weight(s) have no source in the {layout}-layout checkpoint, "
            f"first {bad[:3]} (depths {tuple(cfg.depths)}: does the checkpoint have as many blocks?)"
        )
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    params.update(model.named_buffers())
    for target, value in plan.items():
        params[target].copy_(value.to(params[target].dtype))
    return PretrainedLoad(
        layout=layout,
        loaded=sorted(plan),
        missing=_collapse(unfed, list(own)),
        ignored=ignored,
        source=where,
        sha256=digest,
    )
