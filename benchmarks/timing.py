"""Interleaved wall-clock timing for side-by-side benchmarks."""

from __future__ import annotations

import time


def time_pipelines(fns: dict, reps: int) -> dict[str, list[float]]:
    """Wall time of each function over ``reps`` rounds after one warm-up each, interleaved in a rotating order (so a
    slow spell of the machine hits every pipeline alike): the side-by-side timing every benchmark here uses."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    names = list(fns)
    for rep in range(reps):
        order = names[rep % len(names):] + names[: rep % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times
