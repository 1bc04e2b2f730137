"""Progress bars on stderr (rich), silent when disabled or when stderr is not a terminal."""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable


def progress(iterable: Iterable, total: int | None, description: str, enabled: bool = True):
    """Iterate with a rich progress bar on stderr (plain iteration when disabled or not a terminal)."""
    if not enabled:
        yield from iterable
        return
    from rich.console import Console  # rich: only when a bar is shown
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=not console.is_terminal,
        disable=not console.is_terminal,
    ) as prog:
        task = prog.add_task(description, total=total)
        for item in iterable:
            yield item
            prog.advance(task)


def say(msg: str) -> None:
    """One status line on stderr (the library's default logger)."""
    print(f"[safesteer] {msg}", file=sys.stderr, flush=True)


def ticker(
    total: int,
    label: str,
    every: float = 30.0,
    write: Callable[[str], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[int], None]:
    """``advance(n)`` for a loop over ``total`` rows: a status line (rows done, rows/s, ETA) at most
    once per ``every`` seconds, the first after ``every`` seconds — a short call prints nothing, a long
    one shows it is moving in a log as on a terminal. ``write``: where the line goes (:func:`say`)."""
    out = write or say
    t0 = last = clock()
    done = 0

    def advance(n: int) -> None:
        nonlocal done, last
        done += int(n)
        now = clock()
        if now - last < every or done >= total:
            return
        last = now
        rate = done / max(now - t0, 1e-9)
        eta = (total - done) / rate if rate > 0 else float("inf")
        out(f"{label}: {done}/{total} rows, {rate:.1f} rows/s, ETA {_clock(eta)}")

    return advance


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
