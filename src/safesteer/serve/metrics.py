"""A small, thread-safe Prometheus text-format registry (no client library needed).

Exposed at ``GET /metrics`` (``text/plain; version=0.0.4``)::

    safesteer_requests_total{endpoint="/v1/score",method="POST",status="200"} 12
    safesteer_request_duration_seconds_bucket{endpoint="/v1/score",le="0.05"} 9
    safesteer_request_duration_seconds_sum{endpoint="/v1/score"} 0.41
    safesteer_request_duration_seconds_count{endpoint="/v1/score"} 12
    safesteer_policy_swaps_total{op="put"} 3
    safesteer_texts_total{endpoint="/v1/score"} 48
    safesteer_model_batches_total 10
    safesteer_model_batch_requests_bucket{le="1"} …
    safesteer_policies 2
    safesteer_queue_depth 0
    process_resident_memory_bytes 1.2e+08
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import defaultdict
from typing import Iterable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    body = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + body + "}" if body else ""


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v))


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: list[tuple[str, str]]) -> list[str]:
        out = [
            f"{name}_bucket"
            f"{_labels(labels + [('le', _num(float(b)) if not float(b).is_integer() else str(b))])} {c}"
            for b, c in zip(self.buckets, self.counts)
        ]
        out.append(f"{name}_bucket{_labels(labels + [('le', '+Inf')])} {self.count}")
        out.append(f"{name}_sum{_labels(labels)} {_num(self.sum)}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class Metrics:
    """Counters and histograms of one server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.latency: dict[str, _Histogram] = {}
        self.swaps: dict[str, int] = defaultdict(int)
        self.texts: dict[str, int] = defaultdict(int)
        self.batches = 0
        self.batch_requests = _Histogram(BATCH_BUCKETS)
        self.started = time.time()

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(endpoint, method, str(status))] += 1
            hist = self.latency.get(endpoint)
            if hist is None:
                hist = self.latency[endpoint] = _Histogram(LATENCY_BUCKETS)
            hist.observe(seconds)

    def observe_swap(self, op: str) -> None:
        with self._lock:
            self.swaps[op] += 1

    def observe_texts(self, endpoint: str, n: int) -> None:
        with self._lock:
            self.texts[endpoint] += int(n)

    def observe_batch(self, n_requests: int, n_texts: int) -> None:
        with self._lock:
            self.batches += 1
            self.batch_requests.observe(n_requests)

    def render(self, gauges: dict[str, tuple[str, float]] | None = None) -> str:
        """The exposition text; ``gauges`` adds ``name → (help, value)`` gauges."""
        with self._lock:
            lines = [
                "# HELP safesteer_requests_total HTTP requests by endpoint, method and status.",
                "# TYPE safesteer_requests_total counter",
            ]
            for (ep, method, status), n in sorted(self.requests.items()):
                lines.append(
                    "safesteer_requests_total"
                    f"{_labels([('endpoint', ep), ('method', method), ('status', status)])} {n}"
                )
            lines += [
                "# HELP safesteer_request_duration_seconds Request latency by endpoint.",
                "# TYPE safesteer_request_duration_seconds histogram",
            ]
            for ep, hist in sorted(self.latency.items()):
                lines += hist.lines("safesteer_request_duration_seconds", [("endpoint", ep)])
            lines += [
                "# HELP safesteer_policy_swaps_total Policy writes (put creates or replaces, delete "
                "removes).",
                "# TYPE safesteer_policy_swaps_total counter",
            ]
            for op in ("put", "delete"):
                lines.append(f"safesteer_policy_swaps_total{_labels([('op', op)])} {self.swaps.get(op, 0)}")
            lines += [
                "# HELP safesteer_texts_total Texts processed by endpoint.",
                "# TYPE safesteer_texts_total counter",
            ]
            for ep, n in sorted(self.texts.items()):
                lines.append(f"safesteer_texts_total{_labels([('endpoint', ep)])} {n}")
            lines += [
                "# HELP safesteer_model_batches_total Jobs run by the model worker (a coalesced batch "
                "counts once).",
                "# TYPE safesteer_model_batches_total counter",
                f"safesteer_model_batches_total {self.batches}",
                "# HELP safesteer_model_batch_requests Requests served per model job.",
                "# TYPE safesteer_model_batch_requests histogram",
            ]
            lines += self.batch_requests.lines("safesteer_model_batch_requests", [])
        all_gauges = {
            "safesteer_uptime_seconds": ("Seconds since the server started.", time.time() - self.started)
        }
        rss = resident_memory_bytes()
        if rss is not None:
            all_gauges["process_resident_memory_bytes"] = (
                "Resident memory of the server process.",
                float(rss),
            )
        all_gauges.update(gauges or {})
        for name, (help_text, value) in all_gauges.items():
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {_num(value)}"]
        return "\n".join(lines) + "\n"


def resident_memory_bytes() -> int | None:
    """RSS of this process (psutil when installed, else /proc/self/statm)."""
    try:
        import psutil  # psutil: optional

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # noqa: BLE001 - psutil is optional
        pass
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
