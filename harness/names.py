"""Names that become parts of paths: what a plain name is, and a safe one made of any text.

An experiment's name (a grid's ``name``, its file's stem, ``--name``), a point's name and a named
axis's labels are folder or file names in the results store and in Ray Tune's state, so each must
be a *plain name*: 1 to ``MAX_NAME_LEN`` characters among ASCII letters, digits and ``. _ - = , +``,
not starting with ``.`` (so never ``.`` or ``..``, and no hidden files).
``check_name`` says what is wrong with one; ``safe_name`` maps any text (a label made from a config
value) onto a plain name; ``inside`` checks that a joined path stays under its root.
"""

from __future__ import annotations

import os
import re

__all__ = [
    "MAX_NAME_LEN",
    "NAME_RULE",
    "UnsafeNameError",
    "name_problem",
    "check_name",
    "safe_name",
    "inside",
]

MAX_NAME_LEN = 100
NAME_RULE = (
    f"1-{MAX_NAME_LEN} characters among letters, digits and . _ - = , + (ASCII), not starting with '.'"
)
_PLAIN = re.compile(r"[A-Za-z0-9_=,+-][A-Za-z0-9._=,+-]*")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9._=,+-]")


class UnsafeNameError(ValueError):
    """A name that would become part of a path is not a plain name; the message says why."""


def name_problem(name: object) -> str | None:
    """What keeps ``name`` from being a plain name, or ``None`` when it is one."""
    if not isinstance(name, str):
        return f"expected a string, got {type(name).__name__}"
    if not name:
        return "a name cannot be empty"
    if len(name) > MAX_NAME_LEN:
        return f"{len(name)} characters; at most {MAX_NAME_LEN}"
    if not _PLAIN.fullmatch(name):
        bad = sorted(set(_UNSAFE_CHAR.findall(name)))
        if bad:
            return f"contains {', '.join(repr(c) for c in bad)}; a name is {NAME_RULE}"
        return f"starts with {name[0]!r}; a name is {NAME_RULE}"
    return None


def check_name(name: object, what: str = "name") -> str:
    """``name`` itself if it is a plain name; else ``UnsafeNameError`` naming ``what`` and the problem."""
    problem = name_problem(name)
    if problem is not None:
        raise UnsafeNameError(f"{what} {name!r} is not a plain name: {problem}")
    return name  # type: ignore[return-value]


def safe_name(text: str, max_len: int = MAX_NAME_LEN) -> str:
    """A plain name made of ``text``: characters outside the plain set become ``_``, a leading ``.``
    becomes ``_``, cut at ``max_len``; empty text gives ``_``."""
    out = _UNSAFE_CHAR.sub("_", text)[:max_len] or "_"
    return "_" + out[1:] if out[0] == "." else out


def inside(root: str, path: str) -> bool:
    """Whether ``path`` lies under ``root`` once both are made absolute and ``..`` is resolved (for
    local paths; a user's own symlinks inside the root are followed as they are)."""
    r = os.path.normpath(os.path.abspath(root))
    p = os.path.normpath(os.path.abspath(path))
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)
