"""Which implementation runs an op: one switch for every op in ``kernels``.

``impl`` argument > ``SPA_ATTN_IMPL`` environment variable > ``"auto"``.

- ``"auto"``: ``"triton"`` for CUDA tensors when Triton imports; on CPU the C++ kernel where the op has one
  that serves the tensors (varlen attention forward, unpack, token scores: float32; the per-image
  top-k and the sequence layouts, ``resolve_helper_impl``) and it builds
  (``kernels.cpu_ext``), else the torch path;
- ``"triton"``: the Triton kernels: for varlen attention torch's FlexAttention, which torch compiles
  to Triton (``kernels.flex_attention``); pack and unpack are hand-written (``kernels/pack_triton.py``);
  token scores, top-k and the layouts have none and run torch, e.g. cuBLAS, on CUDA. On CPU tensors
  only under ``TRITON_INTERPRET=1`` (tests);
- ``"cpp"``: the C++ CPU kernel (``kernels/csrc``); ops without one (pack: one ``index_select``
  already) run their torch path;
- ``"torch"``: the fast torch path (also runs on GPU);
- ``"ref"``: the plain reference (per-sequence loops, explicit softmax), for tests and debugging.

Triton, FlexAttention and the C++ kernels are loaded lazily, only when they run, so ``import kernels`` needs neither
Triton, a compiler nor a GPU, and ``TRITON_INTERPRET`` can still be set after ``import kernels``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

__all__ = [
    "IMPLS", "ENV_VAR", "THREADS_ENV_VAR", "resolve_impl", "resolve_helper_impl", "triton_available",
    "cpu_op_threads", "cpu_op_thread_count", "direct_call", "run_cpu", "cpp_kernels", "counting_flops",
    "untraced",
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


_CPU_EXT = None  # kernels.cpu_ext once imported


def _cpu_ext():
    """``kernels.cpu_ext``, imported on first use and kept in a global (an import statement per op call
    costs tens of microseconds cache-cold). Not imported with the package: ``python -m kernels.cpu_ext``
    (the build command) would then run a second copy of the module."""
    global _CPU_EXT
    if _CPU_EXT is None:
        from kernels import cpu_ext

        _CPU_EXT = cpu_ext
    return _CPU_EXT


def cpp_kernels():
    """The built C++ extension module (``kernels.cpu_ext.module()``): raises RuntimeError, with the
    reason, when the kernels cannot load."""
    return _cpu_ext().module()


def resolve_impl(impl: str | None, *tensors: torch.Tensor, cpp: bool = False) -> str:
    """Resolve ``impl`` to one of ``"triton"``, ``"cpp"``, ``"torch"``, ``"ref"`` for the given tensors.

    ``cpp``: the op has a C++ CPU kernel (they take float32 CPU tensors). For an op without one, or
    tensors it does not take, ``"cpp"`` resolves to ``"torch"``. Otherwise ``"auto"`` on CPU picks it
    when it loads (else warns once and runs the torch path) and an explicit ``"cpp"`` raises when it
    cannot load."""
    return _resolve(_impl_name(impl), tensors, cpp)


def _impl_name(impl: str | None) -> str:
    """``impl``, or the environment's ``SPA_ATTN_IMPL``, or "auto", normalised; ValueError naming the
    source when it is none of ``IMPLS``."""
    name = impl if impl is not None else os.environ.get(ENV_VAR, "auto")
    if name not in IMPLS:
        name = name.strip().lower()
        if name not in IMPLS:
            src = "impl argument" if impl is not None else f"environment variable {ENV_VAR}"
            raise ValueError(
                f"unknown kernel implementation {name!r} from the {src}; known: {', '.join(IMPLS)}"
            )
    return name


def _resolve(name: str, tensors: tuple, cpp: bool) -> str:
    on_cuda = False
    for t in tensors:
        if t.is_cuda:
            on_cuda = True
            break
    if name == "auto" and on_cuda:
        return "triton" if triton_available() else "torch"
    if name in ("auto", "cpp"):
        if on_cuda:
            raise RuntimeError(
                "impl='cpp' is the CPU kernel; these tensors are on CUDA (use 'triton' or 'auto')"
            )
        if not cpp:
            return "torch"
        for t in tensors:
            if t.dtype is not torch.float32 or not t.is_cpu:
                return "torch"
        if name == "cpp":
            cpp_kernels()  # raises, with the reason, when the kernels cannot load
        elif _cpu_ext().load() is None:
            _cpu_ext().warn_fallback()
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
    name = _impl_name(impl)
    if name in ("triton", "torch", "ref"):
        return "ref" if name == "ref" else "torch"
    if torch._C._get_tracing_state() is not None or torch.compiler.is_compiling():
        return "torch"
    return "cpp" if _resolve(name, tensors, True) == "cpp" else "torch"


def counting_flops() -> bool:
    """True under a FLOP count: ``torch.jit.trace`` (fvcore's ``FlopCountAnalysis`` counts the ops of
    its trace) or ``torch.utils.flop_counter.FlopCounterMode``. An op whose fast path the counters
    cannot see through (FlexAttention: a compiled function, which ``torch.jit.trace`` refuses, and
    which ``FlopCounterMode`` counts as dense attention) runs its custom op there instead, so that
    the count is the op's formula whatever the device."""
    if torch._C._get_tracing_state() is not None:
        return True
    # a FlopCounterMode in use has imported its module (not imported here: it imports Triton)
    flop_counter = sys.modules.get("torch.utils.flop_counter")
    if flop_counter is None or not torch._C._len_torch_dispatch_stack():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(isinstance(m, flop_counter._FlopCounterMode) for m in _get_current_dispatch_mode_stack())


@contextlib.contextmanager
def untraced():
    """Host reads (``.tolist()`` of sizes) kept out of a ``torch.jit.trace``: fvcore would list the
    ops they dispatch (``aten::resolve_conj``, ...) as ops it cannot count."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def direct_call(*tensors: torch.Tensor | None) -> bool:
    """True when an op may call its CPU kernel directly instead of through its ``torch.library`` custom
    op: the tensors are plain CPU tensors and nothing needs the op itself, i.e. no autograd graph to record (grad mode off, as under
    ``torch.inference_mode``, or no input requiring grad), no ``torch.jit.trace`` (fvcore counts the op
    by name in the graph), no ``torch.compile``, no ``TorchDispatchMode`` (``FlopCounterMode`` counts
    the op, ``FakeTensorMode`` runs its fake) and plain tensors only. Why: the custom op's Python
    dispatch costs tens of microseconds a call, and several times that when it runs cache-cold
    between large ops, as it does in a network (see the README's performance section). Same kernel,
    same result either way."""
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or not t.is_cpu or (grad and t.requires_grad)):
            return False
    return not (
        torch._C._get_tracing_state() is not None
        or torch._C._len_torch_dispatch_stack()
        or torch.compiler.is_compiling()
    )


def run_cpu(name: str, fn, *args, single_region: bool = True):
    """``fn(*args)`` under ``cpu_op_threads(single_region=...)``, without entering the context manager
    when it would change nothing (the common case): an op's direct call. Under ``torch.profiler`` the
    call is recorded as ``name`` (the custom op's name, e.g. ``spa::varlen_attention``), as the custom
    op would be."""
    if torch._C._autograd._profiler_enabled():
        with torch.profiler.record_function(name):
            return _run_cpu(fn, args, single_region)
    return _run_cpu(fn, args, single_region)


def _run_cpu(fn, args, single_region: bool):
    if cpu_op_thread_count(single_region) >= torch.get_num_threads():
        return fn(*args)
    with cpu_op_threads(single_region=single_region):
        return fn(*args)


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
    setting = os.environ.get(THREADS_ENV_VAR)
    if not setting or not (setting := setting.strip()):
        return total if single_region else 1
    try:
        n = int(setting)
    except ValueError:
        raise ValueError(
            f"{THREADS_ENV_VAR} must be an integer (0: torch's setting), got {setting!r}"
        ) from None
    return total if n <= 0 else min(n, total)
