"""Where safesteer keeps caches and where it finds offline data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of safesteer's cache (``SAFESTEER_CACHE`` or ``~/.cache/safesteer``)."""
    root = os.environ.get("SAFESTEER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "safesteer"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_data_dir() -> Path | None:
    """The local data directory from ``SAFESTEER_DATA_DIR``, if set and present."""
    value = os.environ.get("SAFESTEER_DATA_DIR")
    if value and Path(value).is_dir():
        return Path(value)
    return None
