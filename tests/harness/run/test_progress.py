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
