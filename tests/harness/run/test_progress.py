"""harness/run/progress.py: outside a terminal, one line per trial event and a summary at most every N s."""

from __future__ import annotations

import re

from harness.results import Experiment
from harness.run.progress import GridCallback
from harness.run.rows import tune_payload


class _Trial:
    def __init__(self, h, node="127.0.0.1"):
        self.config = {"trial": tune_payload(h)}
        self.node_ip = node


def _callback(tmp_path, **kw):
    exp = Experiment(str(tmp_path), "exp")
    exp.write_manifest(
        {
            "run_id": "r1",
            "trials": [{"name": f"t{i}", "config_hash": f"h{i}", "workers": 1} for i in range(3)],
        }
    )
    cb = GridCallback(str(tmp_path), "exp", show=True, lines=True, **kw)
    return cb, exp


def test_one_line_per_event_with_node_map_speedup_and_reason(tmp_path, capsys):
    cb, exp = _callback(tmp_path)
    cb.setup()
    cb.on_trial_start(0, [], _Trial("h0", "10.9.9.9"))
    exp.write_row(
        "h0",
        {
            "status": "done",
            "config_hash": "h0",
            "map": 0.1234,
            "speedup_vs_dense": 1.07,
            "wall_s": 42.0,
            "hostname": "node-a",
        },
    )
    cb.on_trial_result(0, [], _Trial("h0"), {"status": "done", "wall_s": 42.0})
    cb.on_trial_start(0, [], _Trial("h1"))
    exp.write_row("h1", {"status": "failed", "config_hash": "h1", "error": "ValueError: bad plugin\nmore"})
    cb.on_trial_result(0, [], _Trial("h1"), {"status": "failed", "wall_s": 3.0})
    cb.on_experiment_end([])
    out = capsys.readouterr().out.splitlines()
    assert "3 trials: 0 done, 0 running, 0 failed, 3 pending" in out[0]
    assert any("started t0 (h0) on 10.9.9.9" in line for line in out)
    assert any("done t0 (h0) in 42 s on node-a: map 0.1234, speedup 1.07x" in line for line in out)
    assert any(line.endswith("started t1 (h1) on 127.0.0.1") for line in out)
    assert any("failed t1 (h1): ValueError: bad plugin" in line for line in out)
    assert "finished: 1 done, 0 running, 1 failed, 1 pending" in out[-1]
    assert all(re.match(r"\[\d\d:\d\d:\d\d\] exp: ", line) for line in out)


def test_summary_lines_are_throttled(tmp_path, capsys, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("harness.run.progress.time.time", lambda: clock[0])
    cb, _ = _callback(tmp_path, summary_every_s=30.0)
    cb.setup()
    capsys.readouterr()
    for _ in range(10):  # Tune calls on_step_begin many times a second
        clock[0] += 2.0
        cb.on_step_begin(0, [])
    assert capsys.readouterr().out == ""  # 20 s: nothing yet
    clock[0] += 11.0
    cb.on_step_begin(0, [])
    cb.on_step_begin(0, [])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "elapsed 31 s" in lines[0]


def test_terminal_keeps_the_live_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True, raising=False)
    exp = Experiment(str(tmp_path), "exp")
    exp.write_manifest({"run_id": "r1", "trials": []})
    cb = GridCallback(str(tmp_path), "exp", show=True)
    cb.setup()
    assert cb.lines is False and cb._live is not None
    cb.on_experiment_end([])
    assert capsys.readouterr().out == ""


def test_a_dead_trials_error_is_read_from_tunes_local_error_file(tmp_path):
    """Tune writes a failed trial's error locally and syncs it to the store later: the row takes
    Ray's words from the local file, not "died without an error report"."""
    from harness.run.rows import _error_line, _tune_error

    local = tmp_path / "error.txt"
    local.write_text(
        "Failure # 1 (occurred at 2026-01-01_00-00-00)\n"
        "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.\n"
        "\tclass_name: ImplicitFunc\n"
    )

    class Trial:  # what Tune's Trial offers: a local error file; nothing synced to storage yet
        error_file = str(local)

        def get_error(self):
            return None

        def get_pickled_error(self):
            return None

    text = _tune_error(Trial())
    assert (
        _error_line(text)
        == "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task."
    )
    Trial.error_file = str(tmp_path / "absent.txt")
    assert "without an error report" in _tune_error(Trial())


def test_without_the_view_each_trial_still_logs_its_start_and_end(tmp_path, capsys, monkeypatch):
    """--no-progress (show=False), on a terminal or not: a start line and an end line per trial,
    with the host and short node id it ran on; no summary lines, no live table."""
    for tty in (False, True):
        monkeypatch.setattr("sys.stdout.isatty", lambda tty=tty: tty, raising=False)
        exp = Experiment(str(tmp_path / str(tty)), "exp")
        exp.write_manifest({"run_id": "r1", "trials": [{"name": "t0", "config_hash": "h0", "workers": 1}]})
        cb = GridCallback(exp.store_uri, "exp", show=False)
        cb.setup()
        assert cb._live is None
        cb.on_trial_start(0, [], _Trial("h0"))
        node = "ab12cd34" + "0" * 48
        exp.write_row(
            "h0", {"status": "done", "config_hash": "h0", "wall_s": 5.0, "hostname": "hx", "node_id": node}
        )
        cb.on_trial_result(0, [], _Trial("h0"), {"status": "done", "wall_s": 5.0})
        for _ in range(3):
            cb.on_step_begin(0, [])
        cb.on_experiment_end([])
        out = capsys.readouterr().out.splitlines()
        assert len(out) == 2, out
        assert out[0].endswith("exp: started t0 (h0) on 127.0.0.1")
        assert out[1].endswith("exp: done t0 (h0) in 5 s on hx (node ab12cd34)")


def test_stored_rows_are_announced_per_reused_trial_and_counted_when_kept(capsys):
    from types import SimpleNamespace as P

    from harness.run.progress import announce_stored

    planned = [
        P(name="a", config_hash="h1", state="reused", reused_from="older"),
        P(name="b", config_hash="h2", state="pending", reused_from=None),
        *[P(name=f"k{i}", config_hash=f"k{i}", state="done", reused_from=None) for i in range(7)],
    ]
    announce_stored("exp", planned)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    assert out[0].endswith(
        "exp: reused a (h1) from experiment older: its done row is copied, not run again (--rerun runs it)"
    )
    assert out[1].endswith(
        "7 trial(s) already done in this experiment, kept: k0, k1, k2, k3, k4 and 2 more (--rerun runs them again)"
    )
    announce_stored("exp", planned[1:2])
    assert capsys.readouterr().out == ""  # every trial runs: nothing to say
