"""A CPU stand-in for CUDA's sync debug mode (``torch.cuda.set_sync_debug_mode``): counts the calls
that would make the host wait for a GPU, while code runs on CPU tensors.

What counts as a sync (each one waits for the GPU's queue to drain on CUDA):

- a read of a tensor's value on the host: ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``
  (``aten::_local_scalar_dense``, ``aten::is_nonzero``, ``aten::equal``), ``.tolist()``, ``.cpu()``,
  ``.numpy()`` (patched: on CPU tensors they dispatch nothing);
- an op whose output size depends on values: ``aten::nonzero`` (not ``nonzero_static``),
  ``masked_select``, the ``unique`` family, ``repeat_interleave`` without ``output_size``, and
  indexing with a boolean mask (``aten::index`` / ``index_put_``);
- a copy between devices (``aten::_to_copy`` / ``aten::copy_`` whose source and result devices
  differ): visible when a test puts a module on the ``meta`` device, since a CPU-to-CPU ``.to`` is no
  op at all.

Blind spots: ops inside a ``torch.library`` custom op's implementation run below the dispatch mode
(its Python reads are still seen, through the patches); a host tensor made on CPU and copied to a
GPU cannot be told apart from any other CPU tensor here (the ``meta`` device test covers the caches).
"""

from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

aten = torch.ops.aten

_VALUE_READS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default}
_SIZE_FROM_VALUES = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.unique_dim_consecutive.default,
}
_PATCHED = ("tolist", "cpu", "numpy")


def _where() -> str:
    """The innermost frame of the project's code on the stack (file:line function)."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if (
            "/spa_core/" in path or "/kernels/" in path or "/harness/" in path
        ) and "/site-packages/" not in path:
            return f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
    return "?"


@dataclass
class HostSyncs:
    """The syncs seen: ``(what, where)`` pairs in call order."""

    seen: list[tuple[str, str]] = field(default_factory=list)
    paused: int = 0

    def record(self, what: str) -> None:
        if not self.paused:
            self.seen.append((what, _where()))

    @contextlib.contextmanager
    def pause(self):
        """Syncs inside are not counted."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    @contextlib.contextmanager
    def outside(self):
        """Runs code outside the count altogether (a kernel whose own behaviour is not under test,
        e.g. one that a dispatch mode cannot run through, as FlexAttention's eager path)."""
        with self.pause(), _disable_current_modes():
            yield

    def __len__(self) -> int:
        return len(self.seen)


class _Mode(TorchDispatchMode):
    def __init__(self, syncs: HostSyncs) -> None:
        super().__init__()
        self.syncs = syncs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _VALUE_READS:
            self.syncs.record(str(func.overloadpacket.__name__))
        elif func in _SIZE_FROM_VALUES:
            self.syncs.record(str(func.overloadpacket.__name__))
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self.syncs.record("repeat_interleave without output_size")
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self.syncs.record("boolean mask index")
        elif func in (aten._to_copy.default, aten.copy_.default):
            src = args[1] if func is aten.copy_.default else args[0]
            dst = args[0] if func is aten.copy_.default else out
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.device != dst.device:
                self.syncs.record(f"copy {src.device.type} -> {dst.device.type}")
        return out


@contextlib.contextmanager
def count_host_syncs():
    """``with count_host_syncs() as syncs: ...``; ``len(syncs)`` and ``syncs.seen`` afterwards."""
    syncs = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in _PATCHED}

    def patched(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            syncs.record(name)
            with syncs.pause():  # its own dispatch (a .cpu() of a meta tensor) is the same read
                return original(self, *args, **kwargs)

        return read

    for name in _PATCHED:
        setattr(torch.Tensor, name, patched(name))
    try:
        with _Mode(syncs):
            yield syncs
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
