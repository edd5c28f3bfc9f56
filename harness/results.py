"""The results store: one directory per experiment, one flat row per trial, keyed by config hash.

Layout (a local folder or any pyarrow filesystem URI, e.g. ``s3://bucket/spa``)::

    ROOT/                             --results: a store of experiments
      <experiment>/                   one per grid (its name)
        experiment.json               grid name and source, the trial list (name, config_hash)
        trials/<config_hash>/
          row.json                    the flat result row (written once, atomically)
          config.json                 the resolved trial config (re-run it with trial_from_dict)
          log.txt                     the trial's log (log.rank<k>.txt for other ranks)
          error.txt                   traceback of a failed / timed-out trial
          running.json                heartbeat while the trial runs (removed when its row lands)
          reused.json                 where a row copied from another experiment came from
        tune/                         Ray Tune's experiment state (``Tuner.restore``)

A row is written to a temporary name and renamed into place (on object stores a single PUT is
atomic already), so a crash never leaves half a row. A row file that is there but cannot be read
as a row (truncated by hand, a disk that lost it) counts as no row, so the trial runs again, and
``damaged_files(path)`` lists it with its path and what is wrong, for ``run``, ``status`` and
``report`` to warn about. ``load(path)`` reads a store or one experiment into a pandas DataFrame
with at least the columns ``status`` (done / failed / timeout), ``config_hash`` and ``gmacs``.

Every path is joined from the store root and single path components: an experiment's name, a
config hash and a file name are each checked to be one component (not empty, ``.`` or ``..``,
without ``/``, ``\\`` or NUL, at most 255 bytes), and a local path is checked to stay under the
root, so nothing is written outside the store whatever a name says.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from harness.names import UnsafeNameError, inside

__all__ = [
    "STATUSES",
    "REQUIRED_COLUMNS",
    "ResultsStore",
    "Experiment",
    "DamagedFile",
    "UnsafeNameError",
    "damaged_files",
    "join_uri",
    "split_uri",
    "load",
    "trial_states",
]

STATUSES = ("done", "failed", "timeout")
REQUIRED_COLUMNS = ("experiment", "name", "status", "config_hash", "gmacs", "error")
HEARTBEAT_S = 10.0  # a running trial touches running.json this often
_STALE_S = 6 * HEARTBEAT_S  # a marker older than this belongs to a trial that is no longer running
_WHERE = ("hostname", "node_id", "git_commit")  # where a trial ran and from which code, for ``status``
_DETAIL_CHARS = 400  # of a failed trial's error in ``trial_states``: enough for its type, place and error.txt


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it; plain paths are made absolute."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts if p)


def join_uri(uri: str, *parts: str) -> str:
    """``uri`` with path components appended; a URI's query (``?endpoint_override=...``, the
    filesystem's options) stays at its end."""
    base, sep, query = uri.partition("?") if "://" in uri else (uri, "", "")
    return _join(base, *parts) + sep + query


def split_uri(uri: str) -> tuple[str, str]:
    """``(parent, last component)`` of a path or URI, the URI's query kept on the parent."""
    if "://" not in uri:
        return os.path.split(os.path.abspath(os.path.expanduser(uri)))
    base, sep, query = uri.partition("?")
    parent, name = base.rstrip("/").rsplit("/", 1)
    return parent + sep + query, name


def _component(part: str, what: str) -> str:
    """``part`` if it is a single path component; else ``UnsafeNameError``."""
    if not isinstance(part, str) or part in ("", ".", "..") or any(c in part for c in "/\\\0"):
        raise UnsafeNameError(f"{what} {part!r} is not a single path component (no '/', '\\', '.', '..')")
    if len(part.encode()) > 255:
        raise UnsafeNameError(
            f"{what} {part[:40]!r}... is {len(part.encode())} bytes long; a path component holds at most 255"
        )
    return part


@dataclass(frozen=True)
class DamagedFile:
    """A store file that is there but cannot be read for what it should hold."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def _jsonable(value: Any) -> Any:
    """NaN/inf become None (strict JSON); tensors and numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def dumps(obj: Any) -> bytes:
    return (json.dumps(_jsonable(obj), indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


class ResultsStore:
    """A store root (``--results``): a folder or URI holding one folder per experiment.

    ``experiment(name)`` raises ``UnsafeNameError`` for a name that is not one path component."""

    def __init__(self, uri: str):
        self.uri = uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))
        self.fs, self.root = _filesystem(uri)

    def experiment(self, name: str) -> Experiment:
        return Experiment(self.uri, name)

    def experiments(self) -> list[str]:
        """Names of the experiments in the store (folders holding an ``experiment.json``)."""
        info = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        names = []
        for entry in info:
            if entry.type == pafs.FileType.Directory and _exists(
                self.fs, _join(entry.path, "experiment.json")
            ):
                names.append(entry.base_name)
        return sorted(names)

    def find_done(self, config_hash: str, *, exclude: str | None = None) -> Experiment | None:
        """Another experiment of this store holding a ``done`` row for this config hash."""
        for name in self.experiments():
            if name == exclude:
                continue
            exp = self.experiment(name)
            row = exp.read_row(config_hash)
            if row is not None and row.get("status") == "done":
                return exp
        return None


@dataclass
class Experiment:
    """One experiment's folder in a store; every method works on local folders and object stores."""

    store_uri: str
    name: str

    def __post_init__(self) -> None:
        _component(self.name, "experiment name")
        self.fs, root = _filesystem(self.store_uri)
        self.path = _join(root, self.name)
        self.uri = join_uri(self.store_uri, self.name)
        if isinstance(self.fs, pafs.LocalFileSystem) and not inside(root, self.path):
            raise UnsafeNameError(f"experiment {self.name!r} would lie outside the store {root}")

    # --- paths ---------------------------------------------------------------------------------
    def trial_path(self, config_hash: str, filename: str = "") -> str:
        _component(config_hash, "config hash")
        if filename:
            _component(filename, "trial file name")
        return _join(self.path, "trials", config_hash, filename)

    def trial_uri(self, config_hash: str, filename: str = "") -> str:
        """``trial_path`` as the user names it: a local path, or the store's URI scheme and path."""
        self.trial_path(config_hash, filename)  # the same checks
        return join_uri(self.uri, "trials", config_hash, filename)

    @property
    def tune_uri(self) -> str:
        """Where Ray Tune keeps this experiment's state (``RunConfig(storage_path=...)``)."""
        return self.uri

    # --- generic I/O -------------------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes) -> None:
        """Write-then-rename on local disks; a single PUT (atomic already) on object stores."""
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):
            tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def read_bytes(self, path: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read()
        except (FileNotFoundError, OSError):
            return None

    def read_json(self, path: str) -> Any:
        """The parsed file; ``None`` when it is missing or cannot be parsed (``damaged`` tells which)."""
        data = self.read_bytes(path)
        if data is None:
            return None
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None

    def damaged(self, path: str, *, row: bool = False) -> DamagedFile | None:
        """What is wrong with the JSON file at ``path`` (a row when ``row``), or ``None`` when it is
        fine or missing."""
        data = self.read_bytes(path)
        if data is None:
            return None
        try:
            obj = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return DamagedFile(path, f"cannot be parsed ({len(data)} bytes: {e})")
        if not isinstance(obj, dict):
            return DamagedFile(path, f"holds a JSON {type(obj).__name__}, not an object")
        if row and obj.get("status") not in STATUSES:
            return DamagedFile(path, f"has status {obj.get('status')!r}, not one of {', '.join(STATUSES)}")
        return None

    def delete(self, path: str) -> None:
        try:
            self.fs.delete_file(path)
        except (FileNotFoundError, OSError):
            pass

    # --- experiment ----------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        m = self.read_json(_join(self.path, "experiment.json"))
        return m if isinstance(m, dict) else None

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        self.write_bytes(_join(self.path, "experiment.json"), dumps(manifest))

    def exists(self) -> bool:
        return _exists(self.fs, _join(self.path, "experiment.json"))

    # --- trials --------------------------------------------------------------------------------
    def read_row(self, config_hash: str) -> dict[str, Any] | None:
        """The trial's row; ``None`` when there is none, or when its file is damaged (the trial is
        not done; ``damaged_rows`` names the file)."""
        row = self.read_json(self.trial_path(config_hash, "row.json"))
        return row if isinstance(row, dict) and row.get("status") in STATUSES else None

    def damaged_rows(self) -> list[DamagedFile]:
        """The experiment's row files (and manifest) that are there but cannot be read."""
        out = [self.damaged(_join(self.path, "experiment.json"))]
        out += [self.damaged(self.trial_path(h, "row.json"), row=True) for h in self.trial_hashes()]
        return [d for d in out if d is not None]

    def write_row(self, config_hash: str, row: dict[str, Any]) -> None:
        if row.get("status") not in STATUSES:
            raise ValueError(f"row status must be one of {STATUSES}, got {row.get('status')!r}")
        self.write_bytes(self.trial_path(config_hash, "row.json"), dumps(row))
        self.delete(self.trial_path(config_hash, "running.json"))

    def write_config(self, config_hash: str, config: dict[str, Any]) -> None:
        self.write_bytes(self.trial_path(config_hash, "config.json"), dumps(config))

    def write_text(self, config_hash: str, filename: str, text: str) -> None:
        self.write_bytes(self.trial_path(config_hash, filename), text.encode())

    def heartbeat(self, config_hash: str, info: dict[str, Any]) -> None:
        self.write_bytes(
            self.trial_path(config_hash, "running.json"), dumps({**info, "heartbeat": time.time()})
        )

    def copy_trial_from(self, other: Experiment, config_hash: str) -> None:
        """Reuse a finished trial of another experiment: its files copied byte for byte."""
        for filename in ("config.json", "log.txt", "row.json"):  # the row last: it marks the trial done
            data = other.read_bytes(other.trial_path(config_hash, filename))
            if data is not None:
                self.write_bytes(self.trial_path(config_hash, filename), data)
        self.write_bytes(
            self.trial_path(config_hash, "reused.json"),
            dumps({"from_experiment": other.name, "at": time.time()}),
        )

    def trial_hashes(self) -> list[str]:
        info = self.fs.get_file_info(pafs.FileSelector(_join(self.path, "trials"), allow_not_found=True))
        return sorted(
            e.base_name for e in info if e.type == pafs.FileType.Directory and e.base_name[:1] != "."
        )

    def rows(self) -> Iterator[dict[str, Any]]:
        for h in self.trial_hashes():
            row = self.read_row(h)
            if row is not None:
                yield row


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _experiments_at(uri: str) -> list[Experiment]:
    """``uri`` is one experiment's folder or a store root; the experiments it names."""
    fs, path = _filesystem(uri)
    if _exists(fs, _join(path, "experiment.json")):
        return [Experiment(*split_uri(uri))]
    store = ResultsStore(uri)
    return [store.experiment(n) for n in store.experiments()]


def damaged_files(path: str | os.PathLike) -> list[DamagedFile]:
    """Row files and manifests of the experiments at ``path`` (a store root or one experiment) that
    are there but cannot be read; their trials count as not done."""
    return [d for exp in _experiments_at(os.fspath(path)) for d in exp.damaged_rows()]


def load(path: str | os.PathLike, *, dedupe: bool = True):
    """The results at ``path`` (a store root or one experiment's folder) as one pandas DataFrame.

    One row per trial with its metrics, provenance and flattened config (dotted keys such as
    ``model.spa.ratio``; lists become tuples), plus ``experiment``. Guaranteed columns: ``status``
    (done / failed / timeout), ``config_hash``, ``gmacs``, ``error``, ``name``, ``experiment``.
    Across a whole store the same trial can sit in several experiments (a reused row is a copy);
    ``dedupe`` keeps one row per config hash, preferring ``done`` and then the latest. A damaged row
    file is left out (``damaged_files(path)`` lists them).
    """
    import pandas as pd

    uri = os.fspath(path)
    records = []
    for exp in _experiments_at(uri):
        for row in exp.rows():
            rec = {k: tuple(v) if isinstance(v, list) else v for k, v in row.items()}
            rec["experiment"] = exp.name
            records.append(rec)
    df = pd.DataFrame.from_records(records)
    for col in REQUIRED_COLUMNS:
        if col not in df.columns:
            df[col] = pd.Series(dtype="float64" if col == "gmacs" else "object")
    if dedupe and len(df) and df["experiment"].nunique() > 1:
        rank = df["status"].map({"done": 0}).fillna(1)
        end = df["end_time"] if "end_time" in df.columns else pd.Series(0, index=df.index)
        df = (
            df.assign(_rank=rank, _end=end)
            .sort_values(["_rank", "_end"], ascending=[True, False])
            .drop_duplicates("config_hash")
            .drop(columns=["_rank", "_end"])
        )
    front = [c for c in ("experiment", "name", "status", "config_hash") if c in df.columns]
    return df[front + [c for c in df.columns if c not in front]].reset_index(drop=True)


def trial_states(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Per trial of each experiment at ``path``: name, config_hash, state (done / failed / timeout /
    running / interrupted / pending), the ``hostname`` and ``node_id`` it ran on (or runs on, from
    its heartbeat) and the ``git_commit`` of its row, for ``spa-harness status``."""
    out = []
    now = time.time()
    for exp in _experiments_at(os.fspath(path)):
        manifest = exp.read_manifest() or {}
        listed = manifest.get("trials") or [{"name": "?", "config_hash": h} for h in exp.trial_hashes()]
        for t in listed:
            if not isinstance(t, dict) or not isinstance(t.get("config_hash"), str):
                continue
            h = t["config_hash"]
            row = exp.read_row(h)
            entry = {
                "experiment": exp.name,
                "name": t.get("name", "?"),
                "config_hash": h,
                "workers": t.get("workers"),
                "state": "pending",
                "detail": "",
            }
            if t.get("reason"):  # why the run planned it although a row of it was stored
                entry["detail"] = str(t["reason"])[:_DETAIL_CHARS]
            damaged = exp.damaged(exp.trial_path(h, "row.json"), row=True) if row is None else None
            if damaged is not None:
                entry["detail"] = f"damaged row file: {damaged}"
                entry["damaged"] = damaged.path
            if row is not None:
                entry["state"] = row.get("status", "?")
                entry.update({k: row.get(k) for k in _WHERE})
                if entry["state"] == "done":
                    entry["detail"] = f"{float(row.get('wall_s') or math.nan):.1f} s"
                    if t.get("reused_from"):
                        entry["detail"] += f", reused from {t['reused_from']}"
                elif row.get("error"):  # its first line: type, message, where in user code, error.txt
                    entry["detail"] = str(row["error"]).splitlines()[0][:_DETAIL_CHARS]
            else:
                marker = exp.read_json(exp.trial_path(h, "running.json"))
                if isinstance(marker, dict):
                    age = now - float(marker.get("heartbeat", 0))
                    entry["state"] = "running" if age < _STALE_S else "interrupted"
                    entry.update({k: marker.get(k) for k in _WHERE})
                    entry["detail"] = (
                        f"attempt {marker.get('attempt', 1)}, started {time.ctime(marker.get('start_time', 0))}"
                    )
            out.append(entry)
    return out
