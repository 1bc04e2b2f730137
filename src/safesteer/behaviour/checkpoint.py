"""Each step of the behaviour study keeps its output under ``steps/``, keyed by its inputs, so a
killed study resumes at the step it was in (and, inside the sweep, at the candidate it was on).

A step's output is a JSON record (exact: Python floats round-trip through ``repr``) and a set of
numeric arrays (``.npz``, read back without pickle). The arrays are written first, then the record,
which names the arrays' sha256 and the key: a record that is missing, half-written, of another key
or whose arrays do not match is not used, and the step runs again. Nothing here is pickled.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from safesteer.io import atomic_path, sha256_file, write_json

FORMAT = "safesteer-study-step/1"


def step_key(*parts: Any) -> str:
    """A short stable key of JSON-able parts (settings, upstream keys)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StepStore:
    """The ``steps/`` folder of one study run: ``<name>.json`` + ``<name>.npz`` per step output."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.root / f"{name}.json", self.root / f"{name}.npz"

    def load(self, name: str, key: str) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
        """The record and arrays ``name`` saved under ``key``; None when there is no usable copy."""
        rec_path, arr_path = self._paths(name)
        try:
            rec = json.loads(rec_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if rec.get("format") != FORMAT or rec.get("key") != key:
            return None
        arrays: dict[str, np.ndarray] = {}
        if rec.get("arrays_sha256"):
            if not arr_path.is_file() or sha256_file(arr_path) != rec["arrays_sha256"]:
                return None
            with np.load(arr_path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        return rec["data"], arrays

    def save(
        self, name: str, key: str, data: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None
    ) -> None:
        """Write ``arrays`` then the record (both atomically); the record is the commit."""
        rec_path, arr_path = self._paths(name)
        digest = ""
        if arrays:
            with atomic_path(arr_path, suffix=".npz") as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **{k: np.asarray(v) for k, v in arrays.items()})
            digest = sha256_file(arr_path)
        write_json(rec_path, {"format": FORMAT, "key": key, "arrays_sha256": digest, "data": dict(data)})
