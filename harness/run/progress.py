"""The driver's view of a running grid, fed by Ray Tune callbacks.

``GridCallback`` (a ``ray.tune.Callback``) follows every trial of the experiment: on a terminal it
shows a live rich table (trials done / running / failed / pending, elapsed time and an ETA from the
mean duration of finished trials); when stdout is not a terminal (a Ray job's log, CI, ``nohup``) it
prints one line per trial event (started on which node, done with its mAP and speedup and the host
and node it ran on, failed with the reason) and a summary line at most every ``summary_every_s``
seconds. With ``show=False`` (``--no-progress``) it still prints each trial's start and end line, so
a job's log shows life, and nothing else. It only shows: rows are written by the trial and, for a
trial whose process died, by ``harness.run.rows.DeadTrialRecorder``.

``announce_stored`` prints, before any trial runs and whatever the view, one line per trial whose row
is copied from another experiment (naming it) and one line for the trials kept from earlier runs of
this experiment: a row that is not computed again is never a silent one.

It holds only the store URI and the experiment name: Tune pickles it with the experiment state,
and ``Tuner.restore`` brings it back; everything else is read from the store in ``setup``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from ray.tune import Callback

from harness.provenance import node_label, short_commit
from harness.results import Experiment
from harness.run.rows import tune_trial_hash

__all__ = ["GridCallback", "announce_stored", "render_states"]

_STYLE = {
    "done": "green",
    "reused": "green",
    "failed": "red",
    "timeout": "red",
    "running": "yellow",
    "pending": "dim",
    "interrupted": "magenta",
}


def render_states(states: list[dict[str, Any]], title: str = "") -> Any:
    """A rich table of trial states (``harness.results.trial_states`` entries or the live view's):
    trial, hash, workers, state, the node it ran on (or runs on), the commit of its row, detail."""
    from rich.table import Table

    table = Table(title=title or None, show_lines=False)
    several = len({s.get("experiment") for s in states}) > 1
    cols = ["trial", "hash", "workers", "state", "node", "commit", "detail"]
    for col in (["experiment"] if several else []) + cols:
        table.add_column(col, overflow="fold")
    for s in states:
        st = s["state"]
        cells = [
            str(s.get("name")),
            s["config_hash"],
            str(s.get("workers") or ""),
            f"[{_STYLE.get(st, 'white')}]{st}[/]",
            node_label(s.get("hostname"), s.get("node_id")),
            short_commit(s.get("git_commit")),
            s.get("detail", ""),
        ]
        table.add_row(*([str(s.get("experiment"))] if several else []), *cells)
    return table


def _say(experiment: str, text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {experiment}: {text}", flush=True)


def announce_stored(experiment: str, planned: Sequence[Any]) -> None:
    """One line per planned trial (``harness.run.runner.PlannedTrial``) whose row is copied from
    another experiment, naming it, and one line counting those kept from this experiment's earlier
    runs; nothing when every trial runs."""
    kept = [p for p in planned if p.state == "done"]
    for p in planned:
        if p.state == "reused":
            _say(
                experiment,
                f"reused {p.name} ({p.config_hash}) from experiment {p.reused_from}: its done row is "
                "copied, not run again (--rerun runs it)",
            )
    if kept:
        _say(
            experiment,
            f"{len(kept)} trial(s) already done in this experiment, kept: "
            + ", ".join(p.name for p in kept[:5])
            + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
            + " (--rerun runs them again)",
        )


class GridCallback(Callback):
    """``show``: the progress view (the live table or summary lines); without it, only one line per
    trial start and end. ``lines``: log lines instead of the live table (None: when stdout is not a
    terminal); ``summary_every_s``: the longest gap between two summary lines while trials run (a
    summary also follows every trial that ends)."""

    def __init__(
        self,
        store_uri: str,
        experiment: str,
        show: bool = True,
        lines: bool | None = None,
        summary_every_s: float = 30.0,
    ) -> None:
        self.store_uri, self.experiment, self.show = store_uri, experiment, show
        self.lines, self.summary_every_s = lines, summary_every_s
        self._live: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {
            "store_uri": self.store_uri,
            "experiment": self.experiment,
            "show": self.show,
            "lines": self.lines,
            "summary_every_s": self.summary_every_s,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._live = None

    # --- Tune hooks ------------------------------------------------------------------------------
    def setup(self, **info: Any) -> None:
        self._exp = Experiment(self.store_uri, self.experiment)
        manifest = self._exp.read_manifest() or {}
        self.run_id = manifest.get("run_id")
        self._t0 = time.time()
        self._states: dict[str, dict[str, Any]] = {}
        for t in manifest.get("trials", []):
            state = t.get("state", "pending")
            self._states[t["config_hash"]] = {
                "name": t["name"],
                "config_hash": t["config_hash"],
                "workers": t.get("workers"),
                "state": state,
                "detail": f"from {t['reused_from']}" if t.get("reused_from") else "",
                "started": None,
            }
        self._durations: list[float] = []
        self._last_summary = time.time()
        if self.lines is None or not self.show:  # without the view: its start and end lines only
            self.lines = not self.show or not sys.stdout.isatty()
        if self.show and self.lines:
            self._say_summary(f"{len(self._states)} trials: ")
        elif self.show:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(
                self._render(), console=Console(stderr=True), refresh_per_second=2, transient=False
            )
            self._live.start()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        s = self._state(trial)
        if s is not None:
            s.update(state="running", started=time.time(), detail="")
            node = getattr(trial, "node_ip", None)  # Tune knows it once the trial's actor is placed
            self._event(f"started {s['name']} ({s['config_hash']})" + (f" on {node}" if node else ""))
        self._refresh()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self.show and self.lines and time.time() - self._last_summary >= self.summary_every_s:
            self._say_summary()
        self._refresh()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        s = self._state(trial)
        if s is None or "status" not in result:
            return
        if result.get("skipped"):
            s.update(
                state="reused" if result["status"] == "done" else result["status"],
                detail="row already stored",
            )
        else:
            s["state"] = result["status"]
            if result.get("wall_s") is not None:
                self._durations.append(float(result["wall_s"]))
                s["detail"] = f"{result['wall_s']:.1f} s"
            row = self._exp.read_row(s["config_hash"]) or {}
            s.update({k: row.get(k) for k in ("hostname", "node_id", "git_commit")})
            if result["status"] != "done":
                s["detail"] = (row.get("error") or "").splitlines()[0][:90] if row.get("error") else ""
        self._event(self._ended(s), summary=True)
        self._refresh()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """The trial's process died, or its function raised outside the trial's own handling; its row
        is the trial's own or ``DeadTrialRecorder``'s, which runs before this callback."""
        s = self._state(trial)
        if s is None:
            return
        row = self._exp.read_row(s["config_hash"])
        s["state"] = row.get("status", "failed") if row else "failed"
        s.update({k: (row or {}).get(k) for k in ("hostname", "node_id", "git_commit")})
        s["detail"] = (
            ((row or {}).get("error") or "").splitlines()[0][:90] if row and row.get("error") else ""
        )
        self._event(self._ended(s), summary=True)
        self._refresh()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.show and self.lines:
            self._say_summary("finished: ")
        self._refresh()
        if self._live is not None:
            self._live.stop()
            self._live = None

    # --- view --------------------------------------------------------------------------------------
    def _state(self, trial: Any) -> dict[str, Any] | None:
        try:
            return self._states.get(tune_trial_hash(trial) or "")
        except (KeyError, TypeError, AttributeError):
            return None

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _say(self, text: str) -> None:
        _say(self.experiment, text)

    def _say_summary(self, prefix: str = "") -> None:
        self._say(prefix + self._summary())
        self._last_summary = time.time()

    def _event(self, text: str, summary: bool = False) -> None:
        """A trial's start or end: a line, whatever ``show`` says (not on the live table, which
        shows it); the summary after it only with ``show``."""
        if self.lines:
            self._say(text)
            if summary and self.show:
                self._say_summary()

    def _ended(self, s: dict[str, Any]) -> str:
        """One line for a trial that ended: done with its mAP and speedup, or why it did not finish."""
        what = f"{s['name']} ({s['config_hash']})"
        if s["state"] in ("done", "reused"):
            row = self._exp.read_row(s["config_hash"]) or {}
            parts = [f"{k} {row[k]:.4f}" for k in ("map",) if isinstance(row.get(k), int | float)]
            if isinstance(row.get("speedup_vs_dense"), int | float):
                parts.append(f"speedup {row['speedup_vs_dense']:.2f}x")
            took = f" in {row['wall_s']:.0f} s" if isinstance(row.get("wall_s"), int | float) else ""
            where = node_label(row.get("hostname"), row.get("node_id"))
            took += f" on {where}" if where else ""
            reused = " (reused a stored row)" if s["state"] == "reused" else ""
            return f"done {what}{took}{reused}" + (f": {', '.join(parts)}" if parts else "")
        return f"{s['state']} {what}: {s.get('detail') or 'no error recorded'}"

    def _counts(self) -> tuple[int, int, int, int]:
        counts: dict[str, int] = {}
        for s in self._states.values():
            counts[s["state"]] = counts.get(s["state"], 0) + 1
        done = counts.get("done", 0) + counts.get("reused", 0)
        failed = counts.get("failed", 0) + counts.get("timeout", 0)
        return done, counts.get("running", 0), failed, counts.get("pending", 0)

    def _eta(self) -> str:
        _, running, _, pending = self._counts()
        if self._durations and (running or pending):
            mean = sum(self._durations) / len(self._durations)
            return f"{mean * (pending + running) / max(1, running):.0f} s"
        return "0 s" if not (running or pending) else "?"

    def _summary(self) -> str:
        done, running, failed, pending = self._counts()
        return (
            f"{done} done, {running} running, {failed} failed, {pending} pending; "
            f"elapsed {time.time() - self._t0:.0f} s, ETA {self._eta()}"
        )

    def _render(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        states = list(self._states.values())
        done, running, failed, pending = self._counts()
        elapsed = time.time() - self._t0
        eta = self._eta()
        now = time.time()
        view = []
        for s in states:
            v = dict(s)
            if s["state"] == "running" and s.get("started"):
                v["detail"] = f"{now - s['started']:.0f} s"
            view.append(v)
        head = Text.from_markup(
            f"[bold]{self.experiment}[/]: [green]{done} done[/], [yellow]{running} running[/], "
            f"[red]{failed} failed[/], {pending} pending; elapsed {elapsed:.0f} s, ETA {eta}"
        )
        return Group(head, render_states(view))
