"""harness/errors.py: a one-line description of an exception names its type, its message, the
innermost frame of user code (not the harness's, spa_core's, torch's or Python's own) and where the
full traceback is."""

from __future__ import annotations

import sysconfig
import textwrap
import traceback

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_a_note_says_where_the_harness_was():
    """The probe and the measurements note their stage on the exception; the bracket names it."""

    def traced():
        try:
            raise TypeError("type Tensor doesn't define __round__ method")
        except TypeError as e:
            e.add_note("probe before training: FLOP trace of one batch")
            raise

    e = _raised(traced)
    first = describe(e, traceback_path="error.txt").splitlines()[0]
    assert first.startswith("TypeError: type Tensor doesn't define __round__ method [in traced at ")
    assert first.endswith("; probe before training: FLOP trace of one batch; full traceback: error.txt]")
    wrapped = RuntimeError("trial failed")
    wrapped.__cause__ = e
    assert "probe before training: FLOP trace of one batch" in describe(wrapped)  # a cause's note too


def test_a_ray_train_worker_group_error_describes_the_lowest_rank_failure():
    from ray.train import WorkerGroupError

    e1 = _raised(lambda: {}["rank one"])
    e0 = ValueError("rank zero's own error")
    group = WorkerGroupError("Training failed due to worker errors:\n[Rank 0] ...", {1: e1, 0: e0})
    assert root_cause(group) is e0
    assert describe(group) == "ValueError: rank zero's own error"


# A dump of the kind torch appends to an internal assert (seen: fvcore's trace of a plugin's scatter
# with a Python bool), and a Python traceback as Ray or a dead process leave it in an error text.
_SCHEMA_DUMP = (
    'RuntimeError: 0 INTERNAL ASSERT FAILED at "/pytorch/torch/csrc/jit/ir/alias_analysis.cpp":617, '
    "please report a bug to PyTorch. We don't have an op for aten::scatter but it isn't a special case. "
    "[in select at plugin.py:9]\nArgument types: Tensor, int, Tensor, bool, \n\nCandidates:\n"
    "\taten::scatter.src(Tensor self, int dim, Tensor index, Tensor src) -> Tensor\n"
    "\taten::scatter.value(Tensor self, int dim, Tensor index, Scalar value) -> Tensor"
)


def test_first_line_is_the_type_and_message_not_the_end_of_a_dump():
    from harness.errors import first_line

    assert first_line(_SCHEMA_DUMP).startswith("RuntimeError: 0 INTERNAL ASSERT FAILED")
    assert first_line(_SCHEMA_DUMP).endswith("[in select at plugin.py:9]")
    assert first_line(_SCHEMA_DUMP, limit=40) == first_line(_SCHEMA_DUMP)[:37] + "..."
    tb = "".join(traceback.format_exception(_raised(lambda: int("x"))))  # a traceback as text
    assert first_line(tb) == "ValueError: invalid literal for int() with base 10: 'x'"
    assert first_line("") == "" and first_line("\n\n  only line  \n") == "only line"


_ONE_LINE = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=60)


@given(message=_ONE_LINE.filter(str.strip), dump=st.lists(_ONE_LINE, max_size=6))
@settings(max_examples=60, deadline=None)
def test_first_line_of_any_described_error_is_its_type_line(message, dump):
    """Whatever a message dumps after its first line, the line a table shows is the one that names
    the type and the message's first line."""
    from harness.errors import first_line

    line = first_line(describe(RuntimeError("\n".join([message, *dump]))))
    expected = f"RuntimeError: {message.strip()}"
    assert line == (expected if len(expected) <= 400 else expected[:397] + "...")
