"""The harness's one timer: calls in rotation, so that machine load falls on every timed function alike.

A trial's speedup against its baseline (``harness.task.measure``) and every mode of the benchmark
(``harness.bench``) time their calls with ``time_in_rotation``; ``quartiles`` summarises the times.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

__all__ = ["time_in_rotation", "quartiles"]


def time_in_rotation(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 0,
    *,
    clock: Callable[[], float] = time.perf_counter,
    sync: Callable[[], None] | None = None,
    start: int = 0,
) -> dict[str, list[float]]:
    """Per-call times (seconds, ``repeats`` of them) of every function of ``fns``, called in rotation.

    Round ``r`` (``warmup`` untimed rounds, then ``repeats`` timed ones) calls every function once,
    starting with function number ``(start + r) % len(fns)``: each goes first as often as the others,
    and load on the machine during a round falls on all of them. With two functions the rounds are
    pairs whose first call alternates, so ``times["a"][i] / times["b"][i]`` is a paired ratio.
    ``clock``: ``time.perf_counter`` (wall) or ``time.process_time`` (this process's CPU time);
    ``sync`` (e.g. a CUDA synchronize) runs after every call, inside its time.
    """
    if not fns:
        raise ValueError("time_in_rotation: no functions to time")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_in_rotation: repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + repeats):
        first = (start + r) % len(names)
        for name in names[first:] + names[:first]:
            t0 = clock()
            fns[name]()
            if sync is not None:
                sync()
            if r >= warmup:
                times[name].append(clock() - t0)
    return times


def quartiles(xs: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``xs``, interpolated linearly between the sorted
    values (numpy's default percentile); one value is its own three quartiles."""
    if not xs:
        raise ValueError("quartiles of no values")
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, med, q3
