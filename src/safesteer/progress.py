"""Progress bars on stderr (rich), silent when disabled or when stderr is not a terminal."""

from __future__ import annotations

import sys
from typing import Iterable


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
