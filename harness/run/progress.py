"""The driver's view of a running grid, fed by Ray Tune callbacks.

``GridCallback`` (a ``ray.tune.Callback``) follows every trial of the experiment: on a terminal it
shows a live rich table (trials done / running / failed / pending, elapsed time and an ETA from the
mean duration of finished trials); when stdout is not a terminal (a Ray job's log, CI, ``nohup``) it
prints one line per trial event (started on which node, done with its mAP and speedup, failed with the
reason) and a summary line at most every ``summary_every_s`` seconds. It only shows: rows are written
by the trial and, for a trial whose process died, by ``harness.run.rows.DeadTrialRecorder``.

It holds only the store URI and the experiment name: Tune pickles it with the experiment state,
and ``Tuner.restore`` brings it back; everything else is read from the store in ``setup``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

from harness.results import Experiment
from harness.run.rows import tune_trial_hash

__all__ = ["GridCallback", "render_states"]

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
    """A rich table of trial states (``harness.results.trial_states`` entries or the live view's)."""
    from rich.table import Table

    table = Table(title=title or None, show_lines=False)
    several = len({s.get("experiment") for s in states}) > 1
    for col in (["experiment"] if several else []) + ["trial", "hash", "workers", "state", "detail"]:
        table.add_column(col, overflow="fold")
    for s in states:
        st = s["state"]
        cells = [
            str(s.get("name")),
            s["config_hash"],
            str(s.get("workers") or ""),
            f"[{_STYLE.get(st, 'white')}]{st}[/]",
            s.get("detail", ""),
        ]
        table.add_row(*([str(s.get("experiment"))] if several else []), *cells)
    return table


class GridCallback(Callback):
    """``show``: report progress at all; ``lines``: log lines instead of the live table (None: when
    stdout is not a terminal); ``summary_every_s``: the longest gap between two summary lines while
    trials run (a summary also follows every trial that ends)."""

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
                "detail": "",
                "started": None,
            }
        self._durations: list[float] = []
        self._last_summary = time.time()
        if self.lines is None:
            self.lines = not sys.stdout.isatty()
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
            if result["status"] != "done":
                row = self._exp.read_row(s["config_hash"]) or {}
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
        print(f"[{time.strftime('%H:%M:%S')}] {self.experiment}: {text}", flush=True)

    def _say_summary(self, prefix: str = "") -> None:
        self._say(prefix + self._summary())
        self._last_summary = time.time()

    def _event(self, text: str, summary: bool = False) -> None:
        if self.show and self.lines:
            self._say(text)
            if summary:
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
            where = row.get("hostname") or str(row.get("node_id") or "")[:12]  # a node id is 56 hex digits
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
