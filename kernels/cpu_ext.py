"""The C++ CPU kernels of ``kernels`` (``kernels/csrc/*.cpp``): built on first use with torch's JIT
extension builder, as DeepSpeed builds its ops, and cached per machine, Python, torch version and CPU
capability (under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).

``python -m kernels.cpu_ext`` builds them ahead of time (``scripts/setup.sh`` does; on a cluster, run it
on every node, or let the first trial on a node build them, about a minute on 2 cores). A build needs a
C++ compiler and ``ninja`` (a dependency of DeepSpeed). When the build fails, or
``SPA_CPU_KERNELS=0``, the ops fall back to their torch path with one warning (``impl="auto"``) or
raise (``impl="cpp"``).

The code is vectorised with torch's own ``at::vec`` at the CPU capability torch itself dispatches to
(``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2, or the portable default, which is what
other architectures get).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

__all__ = ["ENV_VAR", "load", "module", "unavailable_reason", "build_name", "main"]

ENV_VAR = "SPA_CPU_KERNELS"
_CSRC = Path(__file__).parent / "csrc"
SOURCES = tuple(
    _CSRC / f
    for f in ("bindings.cpp", "varlen_attention_cpu.cpp", "pack_cpu.cpp", "scores_cpu.cpp", "select_cpu.cpp")
)
_STALE_LOCK_S = 15 * 60  # a build lock this old was left by a killed build
_FAILED = "spa_build_failed.txt"  # fingerprint of a failed build's sources and flags, and its error
_BUILT = "spa_build_ok.txt"  # fingerprint of the last good build, its .so and module name

_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY=AVX512",
               "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}  # fmt: skip

_state: dict[str, object] = {}


def _capability() -> str:
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in _CAPABILITY_FLAGS else "DEFAULT"


def build_name(capability: str | None = None) -> str:
    """Extension name: one build per torch version and capability (a build for another torch would
    load against the wrong libtorch)."""
    cap = (capability or _capability()).lower()
    version = re.sub(r"[^0-9a-zA-Z]+", "_", torch.__version__)
    return f"spa_kernels_cpu_{cap}_torch{version}"


def _enabled() -> bool:
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def _build_dir(name: str) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False))


def _flags(capability: str) -> list[str]:
    # -fopenmp: at::parallel_for is inlined around `#pragma omp parallel`; without it the kernels run
    # on one thread. The extension then needs libgomp.so.1, which resolves to the copy torch loaded,
    # so torch.set_num_threads governs it.
    return ["-O3", "-fopenmp", *_CAPABILITY_FLAGS.get(capability, [])]


def _fingerprint(capability: str) -> str:
    """Sources, flags, torch and Python: what a build depends on."""
    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    h.update(" ".join([*_flags(capability), torch.__version__, sys.version]).encode())
    return h.hexdigest()[:16]


def _import_built(build_dir: Path, fingerprint: str):
    """The module of an earlier build of these sources and flags, imported straight from its .so (no
    ninja run, no lock: what every process after the first does), or None."""
    try:
        fp, so_path, module_name = (build_dir / _BUILT).read_text().split("\n")[:3]
    except (OSError, ValueError):
        return None
    if fp != fingerprint or not Path(so_path).is_file():
        return None
    spec = importlib.util.spec_from_file_location(module_name, so_path)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _ninja_on_path():
    """torch's builder runs `ninja`; pip's ninja (a DeepSpeed dependency) sits beside this Python,
    which is not on PATH when the venv is used without activating it."""
    path = os.environ.get("PATH", "")
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
    try:
        yield
    finally:
        os.environ["PATH"] = path


def _build(capability: str, verbose: bool, force: bool = False):
    from torch.utils.cpp_extension import load as jit_load

    name = build_name(capability)
    build_dir = _build_dir(name)
    fingerprint = _fingerprint(capability)
    if not force:
        module = _import_built(build_dir, fingerprint)
        if module is not None:
            return module
    lock, failed = build_dir / "lock", build_dir / _FAILED
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:
        lock.unlink(missing_ok=True)  # torch's FileBaton would wait for it forever
    if failed.exists() and not force:
        first, _, error = failed.read_text().partition("\n")
        if first == fingerprint:  # these sources and flags failed here before: don't spend a minute again
            raise RuntimeError(
                f"{error.strip()} (recorded in {failed}; `python -m kernels.cpu_ext --rebuild` retries)"
            )
    if not any(build_dir.glob(f"{name}*.so")):
        print(
            f"spa-harness: building the C++ CPU kernels ({capability}) in {build_dir}; once per machine "
            "and torch version, about a minute",
            file=sys.stderr,
            flush=True,
        )
    try:
        with _ninja_on_path():
            module = jit_load(name, [str(s) for s in SOURCES], extra_cflags=_flags(capability),
                              extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=verbose)  # fmt: skip
    except Exception as e:
        failed.write_text(f"{fingerprint}\n{type(e).__name__}: {str(e).strip()[-800:]}")
        raise
    failed.unlink(missing_ok=True)
    built = build_dir / _BUILT
    tmp = built.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(f"{fingerprint}\n{module.__file__}\n{module.__name__}\n")
    tmp.replace(built)  # atomic: a concurrent reader sees the old record or the new one
    return module


def load(verbose: bool = False, force: bool = False):
    """The built extension module, or None when it is disabled or cannot be built (see
    ``unavailable_reason``). Builds on the first call of a process if needed; thread-safe enough for
    the op's use (the first caller builds, torch's file lock serialises processes). ``force``: retry
    a build that failed before on this machine."""
    if "module" in _state and not force:
        return _state["module"]
    module, reason = None, None
    if not _enabled():
        reason = f"disabled by {ENV_VAR}={os.environ.get(ENV_VAR)}"
    else:
        cap = _capability()
        try:
            module = _build(cap, verbose, force)
        except Exception as e:  # compiler missing, headers broken, ...
            reason = f"building the {cap} C++ CPU kernels failed: {type(e).__name__}: {str(e).strip()[-800:]}"
            if cap != "DEFAULT":  # the portable build: plain at::vec, no ISA flags
                try:
                    module, reason = _build("DEFAULT", verbose, force), None
                except Exception:
                    pass
    _state["module"], _state["reason"] = module, reason
    return module


def module():
    """The built extension module; raises RuntimeError with the reason when it cannot load."""
    ext = load()
    if ext is None:
        raise RuntimeError(f"the C++ CPU kernels are unavailable: {unavailable_reason()}")
    return ext


def unavailable_reason() -> str | None:
    """Why ``load()`` returned None (None when the kernels loaded)."""
    load()
    return _state["reason"]  # type: ignore[return-value]


@functools.cache
def warn_fallback() -> None:
    """Warn once per process that the CPU ops run their slower torch path."""
    warnings.warn(
        f"spa kernels: the C++ CPU kernels are unavailable ({unavailable_reason()}); the ops run their torch "
        "paths (varlen attention about 2x slower at SPA's sequence lengths)",
        RuntimeWarning,
        stacklevel=4,  # warn_fallback <- resolve_impl <- the op <- its caller
    )


def main(argv=None) -> int:
    """``python -m kernels.cpu_ext [-v] [--rebuild]``: build (or find) the kernels, print where; exit 1
    on failure. ``--rebuild`` retries a build that failed before on this machine."""
    args = argv if argv is not None else sys.argv[1:]
    t0 = time.perf_counter()
    module = load(verbose="-v" in args, force="--rebuild" in args)
    if module is None:
        print(f"spa-harness: C++ CPU kernels unavailable: {unavailable_reason()}", file=sys.stderr)
        return 1
    print(f"spa-harness: C++ CPU kernels ready ({module.__file__}, {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
