"""harness/errors.py: a one-line description of an exception names its type, its message, the
innermost frame of user code (not the harness's, spa_core's, torch's or Python's own) and where the
full traceback is."""

from __future__ import annotations

import sysconfig
import textwrap

import pytest
import torch

from harness.errors import describe, root_cause, user_frame


def _user_module(tmp_path, body: str):
    """A module in a user's folder (outside every system package), imported from its file."""
    import importlib.util

    path = tmp_path / "user_plugin.py"
    path.write_text(textwrap.dedent(body))
    spec = importlib.util.spec_from_file_location("user_plugin_for_errors", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, path


def _raised(fn, *args):
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return e
    pytest.fail("did not raise")


def test_the_innermost_user_frame_not_the_library_one(tmp_path):
    mod, path = _user_module(
        tmp_path,
        """
        import torch

        def select(scores):
            return torch.topk(scores, k=scores.numel() + 1)  # line 5: torch raises inside

        def outer(scores):
            return select(scores)
    """,
    )
    e = _raised(mod.outer, torch.ones(3))
    assert user_frame(e) == (str(path), 5, "select")
    line = describe(e, traceback_path="/store/exp/trials/abc/error.txt")
    first = line.splitlines()[0]
    assert first.startswith("RuntimeError: ") and "selected index k out of range" in first
    assert first.endswith(f"[in select at {path}:5; full traceback: /store/exp/trials/abc/error.txt]")


def test_a_wrapped_error_describes_its_root_cause(tmp_path):
    mod, path = _user_module(
        tmp_path,
        """
        def boom():
            raise ValueError("bad ratio\\nsecond line")
    """,
    )

    def harness_call():
        try:
            mod.boom()
        except ValueError as e:
            raise RuntimeError("trial failed") from e

    e = _raised(harness_call)
    assert type(root_cause(e)) is ValueError
    lines = describe(e).splitlines()
    assert lines == [f"ValueError: bad ratio [in boom at {path}:3]", "second line"]


def test_frames_written_in_a_message_count(tmp_path):
    """Ray Train hands a worker's traceback over as text inside its own exception."""
    stdlib = sysconfig.get_paths()["stdlib"]
    text = (
        f'Traceback (most recent call last):\n  File "{tmp_path}/plugin.py", line 12, in forward\n'
        f'    raise RuntimeError("x")\n  File "{stdlib}/json/decoder.py", line 3, in f\nRuntimeError: x'
    )

    class TrainingFailedError(Exception):
        pass

    e = TrainingFailedError(text)  # as Ray raises it: from its own frames, none of them user code
    assert user_frame(e) == (f"{tmp_path}/plugin.py", 12, "forward")


def test_no_user_frame_and_key_errors_read_plainly():
    e = _raised(lambda: {}["missing"])  # this test file is user code: its frame is found
    assert describe(e).startswith("KeyError: missing [in <lambda> at ")
    e = _raised(int, "x")  # raised by a builtin called from here: the caller's frame
    assert "[in _raised at " in describe(e)
    assert describe(RuntimeError("plain")) == "RuntimeError: plain"  # never raised: no traceback
    assert describe(MemoryError(), prefix="out of memory: ") == "out of memory: MemoryError"
