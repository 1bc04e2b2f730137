"""Integrity check of an activation store: mmap + streaming hash, never a whole shard in RAM."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from safesteer.errors import SafesteerError
from safesteer.io import read_json, sha256_file, write_json
from safesteer.store.layout import FORMAT


@dataclass
class Problem:
    layer_dir: Path
    index: int | None
    file: str
    reason: str

    def line(self) -> str:
        where = f"shard {self.index}" if self.index is not None else "orphan"
        return f"BAD {self.layer_dir.name}/{self.file} ({where}): {self.reason}"


def layer_dirs(path: str | Path) -> list[Path]:
    path = Path(path)
    if (path / "manifest.json").is_file():
        return [path]
    found = (
        sorted(p for p in path.glob("layer-*") if (p / "manifest.json").is_file()) if path.is_dir() else []
    )
    if not found:
        raise SafesteerError(
            f"{path} is not an activation store (no manifest.json); pass the --out folder of "
            "'safesteer extract'"
        )
    return found


def _finite_streaming(arr: np.ndarray, rows_per_chunk: int = 4096) -> bool:
    for start in range(0, arr.shape[0], rows_per_chunk):
        if not np.isfinite(arr[start : start + rows_per_chunk]).all():
            return False
    return True


def check_shard(folder: Path, entry: dict, d: int, dtype: np.dtype) -> list[Problem]:
    """All problems of one shard (empty list = healthy)."""
    problems: list[Problem] = []
    idx = entry["index"]
    for key, name in entry["files"].items():
        f = folder / name
        if not f.is_file():
            problems.append(Problem(folder, idx, name, "missing"))
            continue
        digest = sha256_file(f)
        if digest != entry["sha256"][key]:
            problems.append(Problem(folder, idx, name, "sha256 mismatch (corrupted or modified)"))
        if key in ("H", "ids"):
            try:
                arr = np.load(f, mmap_mode="r", allow_pickle=False)
            except Exception as exc:  # truncated or garbled header
                problems.append(
                    Problem(folder, idx, name, f"unreadable .npy ({str(exc).splitlines()[0][:80]})")
                )
                continue
            if key == "H":
                if arr.shape != (entry["rows"], d):
                    problems.append(
                        Problem(folder, idx, name, f"shape {arr.shape}, expected ({entry['rows']}, {d})")
                    )
                elif arr.dtype != dtype:
                    problems.append(Problem(folder, idx, name, f"dtype {arr.dtype}, expected {dtype}"))
                elif not _finite_streaming(arr):
                    problems.append(Problem(folder, idx, name, "contains NaN/Inf"))
            elif arr.shape != (entry["rows"],):
                problems.append(
                    Problem(
                        folder, idx, name, f"{arr.shape[0] if arr.ndim else 0} ids, expected {entry['rows']}"
                    )
                )
    return problems


def validate(path: str | Path, purge: bool = False) -> tuple[list[Problem], int]:
    """Check every shard of every layer under ``path``; with ``purge`` remove bad shards.

    Returns (problems, number of shards checked). Purged shards disappear from the manifest, so the
    next ``safesteer extract`` with the same settings recomputes them.
    """
    problems: list[Problem] = []
    checked = 0
    for folder in layer_dirs(path):
        manifest = read_json(folder / "manifest.json")
        if manifest.get("format") != FORMAT:
            raise SafesteerError(
                f"{folder}/manifest.json has format {manifest.get('format')!r}, expected {FORMAT!r}"
            )
        d, dtype = int(manifest["d"]), np.dtype(manifest["dtype"])
        bad_idx: set[int] = set()
        known: set[str] = set()
        for entry in manifest["shards"]:
            checked += 1
            known.update(entry["files"].values())
            found = check_shard(folder, entry, d, dtype)
            if found:
                bad_idx.add(entry["index"])
                problems.extend(found)
        orphans = [
            p
            for p in folder.iterdir()
            if p.name != "manifest.json" and p.name not in known and not p.name.startswith(".")
        ]
        problems.extend(Problem(folder, None, p.name, "not listed in manifest.json") for p in orphans)
        temps = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        if purge:
            for entry in manifest["shards"]:
                if entry["index"] in bad_idx:
                    for name in entry["files"].values():
                        (folder / name).unlink(missing_ok=True)
            for p in orphans + temps:
                p.unlink(missing_ok=True)
            if bad_idx:
                manifest["shards"] = [s for s in manifest["shards"] if s["index"] not in bad_idx]
                manifest["complete"] = False
                write_json(folder / "manifest.json", manifest)
    return problems, checked
