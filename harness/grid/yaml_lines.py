"""Reading a grid file's YAML with the line of every key, and the error that names that line.

``Doc`` parses one file into plain Python and keeps the line of every key path; ``Loc`` is a place in
a grid (file, line, dotted key) and ``Val`` a value with its place. ``GridError`` is the one error of
``harness.grid``: ``file:line: key: what was expected``. Reading, merging, checking and expanding carry
``Val`` values, so an error found at any stage names the line that set the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Doc", "GridError", "Loc", "Val"]


class GridError(ValueError):
    """A grid file is wrong; the message reads ``file:line: key: what was expected``."""

    def __init__(
        self, message: str, *, file: str | Path | None = None, line: int | None = None, key: str | None = None
    ) -> None:
        message = " ".join(message.split())  # one line, whatever the message was made of
        self.file, self.line, self.key, self.detail = (str(file) if file else None), line, key, message
        where = f"{file}:{line}" if file and line else str(file) if file else ""
        text = f"{key}: {message}" if key else message
        super().__init__(f"{where}: {text}" if where else text)


# PyYAML's node tree already carries the line of every key; ``Doc`` walks it once. ruamel.yaml's
# round-trip loader (``.lc.key``/``.lc.item``) was tried in its place (2026-12, all four built-in grids,
# the grid tests and their fuzzing): the walk stays (keys must be strings; its ScalarFloat,
# TaggedScalar and HexInt values must become plain Python before they reach a config), it reads YAML
# 1.2 unless pinned to 1.1 (``yes``, ``1e-3`` change meaning), its duplicate-key error loses the key's
# path, and it parses 2-9x slower (median of 45 parses: default.yaml 12.8 -> 29.2 ms, smoke.yaml 1.5 ->
# 11.6 ms). 47 lines against 64, for a new dependency and a worse error: not simpler, so not used.


@dataclass(frozen=True)
class Loc:
    """A place in a grid: the file, the line and the dotted key that an error about it names."""

    file: Path | None
    line: int | None
    key: str

    def error(self, message: str, key: str | None = None) -> GridError:
        key = key or self.key
        if message.startswith(f"{key}: "):  # ConfigError already names the key
            message = message[len(key) + 2 :]
        return GridError(message, file=self.file, line=self.line, key=key)


@dataclass
class Val:
    """A value read from a grid, with its place."""

    value: Any
    loc: Loc


class Doc:
    """A YAML document as plain Python plus the line of every key path."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.lines: dict[tuple, int] = {(): 1}
        try:
            text = file.read_text()
        except OSError as e:
            raise GridError(f"cannot read the grid file: {e.strerror or e}", file=file) from None
        loader = None
        try:
            loader = yaml.SafeLoader(text)  # reads the text's first characters: may raise too
            node = loader.get_single_node()
            if node is None:
                raise GridError(
                    "the grid file is empty (a grid is a mapping with base:, axes: or points:)", file=file
                )
            self.data = self._construct(loader, node, ())
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
            raise GridError(
                f"not valid YAML: {problem}", file=file, line=mark.line + 1 if mark else None
            ) from None
        finally:
            if loader is not None:
                loader.dispose()

    def _construct(self, loader: yaml.SafeLoader, node: yaml.Node, path: tuple) -> Any:
        if isinstance(node, yaml.MappingNode):
            loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
            out: dict[Any, Any] = {}
            for k_node, v_node in node.value:
                key = loader.construct_object(k_node, deep=True)
                line = k_node.start_mark.line + 1
                if not isinstance(key, str):
                    raise GridError(
                        f"keys must be strings, got {key!r}",
                        file=self.file,
                        line=line,
                        key=_dotted(path) or "<top level>",
                    )
                if key in out:
                    raise GridError(
                        "duplicate key (YAML keeps only the last one; write it once)",
                        file=self.file,
                        line=line,
                        key=_dotted(path + (key,)),
                    )
                self.lines[path + (key,)] = line
                out[key] = self._construct(loader, v_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            out_list = []
            for i, item in enumerate(node.value):
                self.lines[path + (i,)] = item.start_mark.line + 1
                out_list.append(self._construct(loader, item, path + (i,)))
            return out_list
        return loader.construct_object(node, deep=True)

    def loc(self, path: tuple, key: str | None = None) -> Loc:
        p = path
        while p not in self.lines:
            p = p[:-1]
        return Loc(self.file, self.lines[p], key if key is not None else _dotted(path))


def _dotted(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out
