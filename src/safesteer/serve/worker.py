"""The single worker thread that owns the model: jobs run one after another under the engine's lock.

See :mod:`safesteer.serve.engine` for why (hook state is global to a model). With a batching window
the worker coalesces queued jobs that share a key into one call.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable


class Overloaded(Exception):
    """The job queue is full."""


@dataclass
class _Job:
    fn: Callable[[list[Any]], list[Any]]
    payload: Any
    key: Hashable | None
    size: int
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)


class ModelWorker:
    """One daemon thread that runs model jobs in order, holding ``lock`` while each job runs.

    ``submit(fn, payload, key, size)`` queues a job; ``fn`` takes a list of payloads and returns
    one result per payload. Jobs with the same non-None ``key`` that arrive within the batching
    window are handed to ``fn`` together (up to ``max_batch`` in total ``size``).
    """

    def __init__(
        self,
        lock: threading.RLock,
        max_queue: int = 256,
        window_s: float = 0.0,
        max_batch: int = 64,
        on_batch: Callable[[int, int], None] | None = None,
    ):
        self.lock = lock
        self.max_queue = int(max_queue)
        self.window_s = float(window_s)
        self.max_batch = int(max_batch)
        self.on_batch = on_batch
        self._queue: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def submit(
        self, fn: Callable[[list[Any]], list[Any]], payload: Any, key: Hashable | None = None, size: int = 1
    ) -> Future:
        job = _Job(fn, payload, key, max(1, int(size)))
        with self._cv:
            if self._stopping:
                raise Overloaded("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise Overloaded(f"{len(self._queue)} requests are waiting for the model; retry later")
            self._queue.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="safesteer-model", daemon=True)
                self._thread.start()
            self._cv.notify()
        return job.future

    @property
    def queued(self) -> int:
        return len(self._queue)

    def reopen(self) -> None:
        """Accept jobs again after :meth:`close` (an app served twice, e.g. by two test clients)."""
        with self._cv:
            self._stopping = False

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _take(self) -> list[_Job] | None:
        with self._cv:
            while not self._queue:
                if self._stopping:
                    return None
                self._cv.wait()
            first = self._queue.popleft()
            group = [first]
            if first.key is None or self.window_s <= 0:
                return group
            total = first.size
            deadline = time.perf_counter() + self.window_s
            while total < self.max_batch:
                for job in list(self._queue):
                    if job.key == first.key and total + job.size <= self.max_batch:
                        self._queue.remove(job)
                        group.append(job)
                        total += job.size
                left = deadline - time.perf_counter()
                if left <= 0 or total >= self.max_batch or self._stopping:
                    break
                self._cv.wait(left)
            return group

    def _loop(self) -> None:
        while True:
            group = self._take()
            if group is None:
                return
            group = [j for j in group if j.future.set_running_or_notify_cancel()]
            if not group:
                continue
            try:
                with self.lock:
                    results = group[0].fn([j.payload for j in group])
                if len(results) != len(group):
                    raise RuntimeError(f"job returned {len(results)} results for {len(group)} payloads")
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting requests
                for j in group:
                    j.future.set_exception(exc)
                continue
            if self.on_batch is not None:
                self.on_batch(len(group), sum(j.size for j in group))
            for j, r in zip(group, results):
                j.future.set_result(r)


__all__ = ["ModelWorker", "Overloaded"]
