"""Stage caching: each stage's outputs live under a key derived from its settings and inputs.

``stages/<name>-<key>/`` holds a stage's outputs; ``DONE.json`` is written last (atomically), so a
folder without it is an interrupted stage that the next run resumes or recomputes. A changed
setting changes the key of that stage and of every stage that consumes it, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safesteer.io import read_json, write_json


def stage_key(name: str, params: dict[str, Any], inputs: dict[str, str]) -> str:
    """Key of a stage: sha256 over its name, settings and the keys of the stages it reads."""
    blob = json.dumps({"stage": name, "params": params, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Stage:
    name: str
    key: str
    dir: Path

    @property
    def done(self) -> bool:
        return (self.dir / "DONE.json").is_file()

    def info(self) -> dict[str, Any]:
        return read_json(self.dir / "DONE.json") if self.done else {}

    def mark_done(self, **info: Any) -> None:
        write_json(
            self.dir / "DONE.json",
            {"stage": self.name, "key": self.key, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info},
        )


class StageCache:
    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        (self.root / "stages").mkdir(parents=True, exist_ok=True)

    def stage(self, name: str, params: dict[str, Any], inputs: dict[str, str] | None = None) -> Stage:
        key = stage_key(name, params, inputs or {})
        folder = self.root / "stages" / f"{name}-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "params.json").is_file():
            write_json(folder / "params.json", {"params": params, "inputs": inputs or {}})
        return Stage(name, key, folder)
