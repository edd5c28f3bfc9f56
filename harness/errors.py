"""One-line descriptions of exceptions that point at the user's code.

A trial that fails inside a plugin, or a plugin that fails to load, is reported as
``Type: message [in func at file:line; full traceback: error.txt]``: the exception's type and
message, the innermost frame of *user code* (any file outside the harness, spa_core and kernels
packages, torch, ray, deepspeed and the Python standard library) and where the whole traceback is.
The frame comes from the exception's own traceback, its causes', or, for an error that crossed a
process boundary as text (Ray Train's ``TrainingFailedError`` carries the worker's traceback in its
message), from that text.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sysconfig
import traceback
from functools import cache

__all__ = ["root_cause", "user_frame", "describe", "is_oom", "is_user_file"]

_SYSTEM_PACKAGES = ("harness", "spa_core", "kernels", "torch", "ray", "deepspeed")
_FRAME_LINE = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)', re.MULTILINE)


@cache
def _system_dirs() -> tuple[str, ...]:
    """Folders whose files are not user code (found without importing the packages)."""
    dirs = []
    for name in _SYSTEM_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for loc in (spec.submodule_search_locations or []) if spec else []:
            dirs.append(os.path.realpath(loc))
    # The interpreter's own library; not platstdlib, which in a venv is the folder holding site-packages.
    dirs.append(os.path.realpath(sysconfig.get_paths()["stdlib"]))
    return tuple(dict.fromkeys(d.rstrip(os.sep) + os.sep for d in dirs))


def is_user_file(filename: str) -> bool:
    """A file outside this project's packages, torch, ray, deepspeed and the Python library: code of
    the user's own (a plugin, a script)."""
    if not filename or filename.startswith("<"):  # <frozen importlib._bootstrap>, <string>
        return False
    path = os.path.realpath(filename)
    return not any(path.startswith(d) for d in _system_dirs())


def root_cause(exc: BaseException) -> BaseException:
    """The innermost cause (``__cause__``, or Ray's ``cause``) of ``exc``; ``exc`` itself if none."""
    seen = exc
    for _ in range(8):
        nxt = seen.__cause__ or getattr(seen, "cause", None)
        if not isinstance(nxt, BaseException) or nxt is seen:
            break
        seen = nxt
    return seen


def user_frame(exc: BaseException) -> tuple[str, int, str] | None:
    """``(file, line, function)`` of the innermost user-code frame of ``exc`` (its root cause first,
    then the chain outwards, then frames written in its message), or ``None``."""
    chain, seen = [], exc
    for _ in range(8):
        chain.append(seen)
        nxt = seen.__cause__ or getattr(seen, "cause", None) or seen.__context__
        if not isinstance(nxt, BaseException) or nxt in chain:
            break
        seen = nxt
    for e in reversed(chain):
        frames = [f for f in traceback.extract_tb(e.__traceback__) if is_user_file(f.filename)]
        if frames:
            return frames[-1].filename, frames[-1].lineno or 0, frames[-1].name
    for e in reversed(chain):
        found = [m for m in _FRAME_LINE.finditer(str(e)) if is_user_file(m["file"])]
        if found:
            return found[-1]["file"], int(found[-1]["line"]), found[-1]["func"]
    return None


def describe(exc: BaseException, *, traceback_path: str | None = None, prefix: str = "") -> str:
    """``[prefix]Type: message [in func at file:line; full traceback: PATH]``, the bracket on the
    first line (what a table shows); a message's further lines follow it."""
    root = root_cause(exc)
    if isinstance(root, KeyError) and len(root.args) == 1 and isinstance(root.args[0], str):
        message = root.args[0].strip()  # str(KeyError) is the repr of its message: quotes and escapes
    else:
        message = str(root).strip() or str(exc).strip()
    message = message.replace("\r", "")
    first, _, rest = message.partition("\n")
    where = []
    frame = user_frame(exc)
    if frame is not None:
        where.append(f"in {frame[2]} at {frame[0]}:{frame[1]}")
    if traceback_path:
        where.append(f"full traceback: {traceback_path}")
    line = f"{prefix}{type(root).__name__}: {first}" if first else f"{prefix}{type(root).__name__}"
    if where:
        line += f" [{'; '.join(where)}]"
    return f"{line}\n{rest}" if rest else line


def is_oom(error: BaseException | str) -> bool:
    """Whether an exception, or a dead process's error text, is an out-of-memory error (Python's
    ``MemoryError``, torch's ``OutOfMemoryError``, the Linux OOM killer or Ray's memory monitor)."""
    if isinstance(error, BaseException):
        if isinstance(root_cause(error), MemoryError) or isinstance(error, MemoryError):
            return True
        error = f"{type(root_cause(error)).__name__} {error}"
    return "OutOfMemory" in error or "out of memory" in error.lower()
