"""Small CPU jobs in worker processes, each with single-threaded BLAS (the same bits for any core count)."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence


def _single_threaded(fn: Callable[..., Any], *args: Any) -> Any:
    from threadpoolctl import threadpool_limits  # threadpoolctl: optional (comes with sklearn)

    with threadpool_limits(1):
        return fn(*args)


def parallel_map(fn: Callable[..., Any], calls: Sequence[tuple], jobs: int | None = None) -> list[Any]:
    """``[fn(*args) for args in calls]`` in up to ``jobs`` worker processes (default: the CPU count),
    every call with single-threaded BLAS, so the results are the same bits whatever the number of
    cores or workers. The gate's fits (MLP members, cross-fitting folds, LODO datasets) are small
    and many: processes use the cores far better than BLAS threads do on them."""
    n = max(1, min(len(calls), jobs or os.cpu_count() or 1))
    if n == 1:
        return [_single_threaded(fn, *args) for args in calls]
    from joblib import Parallel, delayed  # joblib: optional (comes with sklearn)

    return list(Parallel(n_jobs=n)(delayed(_single_threaded)(fn, *args) for args in calls))
