"""timm Swin Transformers with random weights for the tests: what a pretrained checkpoint on disk
looks like without a download (tests/spa_core/test_pretrained.py, tests/ablations/test_paper_smoke.py)."""

from __future__ import annotations

import sys

import torch

__all__ = ["TIMM_ARGS", "import_timm", "timm_swin"]

_TORCHVISION_OPS: list = []  # keeps the op declarations below alive

# This project's presets and the timm SwinTransformer arguments of the same architecture.
TIMM_ARGS = {
    "tiny": dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4),
    "micro": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=4),
}


def import_timm():
    """timm, which needs torchvision. PyPI's torchvision wheels are CUDA builds: on a CPU-only torch
    their C++ ops do not load, and torchvision (0.28) then fails at import, registering a fake kernel
    for its ``nms`` op, which does not exist. timm's Swin uses none of torchvision's ops, so the two
    ops it registers at import are declared here (schemas without kernels: a call would fail) and the
    import is retried."""
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_OPS.append(lib)
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import torchvision  # noqa: F401
    import timm

    return timm


def timm_swin(preset: str, img_size: int = 128, seed: int = 0) -> torch.nn.Module:
    """A timm Swin of ``preset``'s architecture (``swin_t``: timm's ``swin_tiny_patch4_window7_224``),
    every weight moved away from its initialisation (LayerNorms at 1/0 and biases at 0 would hide a
    swap), in eval mode."""
    timm = import_timm()
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(seed)
    if preset == "swin_t":
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=10)
    else:
        model = SwinTransformer(img_size=img_size, num_classes=10, **TIMM_ARGS[preset])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()
