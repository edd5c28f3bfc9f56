"""Which implementation runs an op: one switch for every op in ``kernels``.

``impl`` argument > ``SPA_ATTN_IMPL`` environment variable > ``"auto"``.

- ``"auto"``: Triton for CUDA tensors when Triton imports; on CPU the C++ kernel where the op has one
  that serves the tensors (varlen attention forward, unpack, token scores: float32; the per-image
  top-k and the sequence layouts, ``resolve_helper_impl``) and it builds
  (``kernels.cpu_ext``), else the torch path;
- ``"triton"``: the Triton kernels (varlen attention, pack, unpack; token scores, top-k and the
  layouts have none and run torch, e.g. cuBLAS, on CUDA); on CPU tensors only under
  ``TRITON_INTERPRET=1`` (tests);
- ``"cpp"``: the C++ CPU kernel (``kernels/csrc``); ops without one (pack: one ``index_select``
  already) run their torch path;
- ``"torch"``: the fast torch path (also runs on GPU);
- ``"ref"``: the plain reference (per-sequence loops, explicit softmax), for tests and debugging.

Triton and the C++ kernels are loaded lazily, only when they run, so ``import kernels`` needs neither
Triton, a compiler nor a GPU, and ``TRITON_INTERPRET`` can still be set after ``import kernels``.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

__all__ = [
    "IMPLS", "ENV_VAR", "THREADS_ENV_VAR", "resolve_impl", "resolve_helper_impl", "triton_available",
    "cpu_op_threads", "cpu_op_thread_count",
]  # fmt: skip

IMPLS = ("auto", "triton", "cpp", "torch", "ref")
ENV_VAR = "SPA_ATTN_IMPL"
THREADS_ENV_VAR = "SPA_CPU_OP_THREADS"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str | None, *tensors: torch.Tensor, cpp: bool = False) -> str:
    """Resolve ``impl`` to one of ``"triton"``, ``"cpp"``, ``"torch"``, ``"ref"`` for the given tensors.

    ``cpp``: the op has a C++ CPU kernel (they take float32 CPU tensors). For an op without one, or
    tensors it does not take, ``"cpp"`` resolves to ``"torch"``. Otherwise ``"auto"`` on CPU picks it
    when it loads (else warns once and runs the torch path) and an explicit ``"cpp"`` raises when it
    cannot load."""
    name = impl if impl is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in IMPLS:
        src = "impl argument" if impl is not None else f"environment variable {ENV_VAR}"
        raise ValueError(f"unknown kernel implementation {name!r} from the {src}; known: {', '.join(IMPLS)}")
    on_cuda = any(t.is_cuda for t in tensors)
    if name == "auto" and on_cuda:
        return "triton" if triton_available() else "torch"
    if name in ("auto", "cpp"):
        if on_cuda:
            raise RuntimeError("impl='cpp' is the CPU kernel; these tensors are on CUDA (use 'triton' or 'auto')")
        if not (cpp and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)):
            return "torch"
        from kernels import cpu_ext

        if name == "cpp":
            cpu_ext.module()  # raises, with the reason, when the kernels cannot load
        elif cpu_ext.load() is None:
            cpu_ext.warn_fallback()
            return "torch"
        return "cpp"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("impl='triton' requested but triton is not importable; use 'torch' or 'auto'")
        if not on_cuda and not _interpret():
            raise RuntimeError(
                "impl='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
            )
    return name


def resolve_helper_impl(impl: str | None, *tensors: torch.Tensor) -> str:
    """``"cpp"``, ``"torch"`` or ``"ref"`` for a helper op that has a C++ CPU kernel, a torch path and a
    reference only (no Triton kernel: the selection and layout ops, whose torch path also serves CUDA).
    "triton" and "torch" give the torch path, "ref" the reference; "auto" and "cpp" resolve as in
    ``resolve_impl`` (tensors: those the C++ kernel must take as float32 CPU; none for integer-only
    ops), except under ``torch.jit.trace`` or ``torch.compile``, which get the torch path (a call into
    the extension would leave a constant in the trace)."""
    name = (impl if impl is not None else os.environ.get(ENV_VAR, "auto")).strip().lower()
    if name in ("triton", "torch", "ref"):
        return "ref" if name == "ref" else "torch"
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        resolve_impl(impl)  # still rejects an unknown name
        return "torch"
    return "cpp" if resolve_impl(impl, *tensors, cpp=True) == "cpp" else "torch"


@contextlib.contextmanager
def cpu_op_threads(*tensors: torch.Tensor, single_region: bool = False):
    """Run the CPU path of an op with ``cpu_op_thread_count(single_region)`` intra-op threads. No
    effect for CUDA tensors.

    ``single_region``: the op's CPU path is one parallel region (a C++ kernel, or one torch call such
    as pack's ``index_select``), as against many small torch calls (the torch attention path: three
    per sequence; the torch unpack: a clone, then a scatter). Why it matters: every multi-threaded
    torch op ends in an OpenMP barrier, and when other processes compete for the cores (concurrent
    Ray trials, other jobs) a barrier waits a scheduler tick for a descheduled thread. Measured on
    this project's 2-core machine under load (wall clock, 2 threads vs 1): ``clone + index_add_`` of a
    (6272, 384) tensor 82 ms vs 1.0 ms; 32 per-sequence SDPA calls 340 ms vs 8 ms. A single region
    pays that at most once per call, as the block's Linear layers do.
    """
    n = cpu_op_thread_count(single_region)
    prev = torch.get_num_threads()
    if n >= prev or any(t.is_cuda for t in tensors):
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def cpu_op_thread_count(single_region: bool = False) -> int:
    """Intra-op threads the CPU path of an op runs with now, never more than torch's
    (``torch.get_num_threads()``), set by ``SPA_CPU_OP_THREADS``:

    - unset (default): ops that are one parallel region (``single_region``: the C++ kernels, pack)
      use torch's setting; paths of many small torch calls use 1;
    - ``N >= 1``: every op uses ``min(N, torch's)`` (1: nothing of SPA's ops multi-threads, the
      setting for a machine shared with other jobs);
    - ``0``: every op uses torch's setting.

    Benchmarks report both counts, since the layers around the ops (Linear) run on torch's setting."""
    total = torch.get_num_threads()
    setting = os.environ.get(THREADS_ENV_VAR, "").strip()
    if not setting:
        return total if single_region else 1
    try:
        n = int(setting)
    except ValueError:
        raise ValueError(f"{THREADS_ENV_VAR} must be an integer (0: torch's setting), got {setting!r}") from None
    return total if n <= 0 else min(n, total)
