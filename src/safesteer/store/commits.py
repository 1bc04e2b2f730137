"""Per-shard commit records: how several ranks extract into one layer folder without sharing a manifest.

Under ``torchrun`` every rank writes its own shards (atomically) and then one small
``.shard-<index>.json`` record beside them (also atomically): the shard's manifest entry plus
what the manifest aggregates (labels, per-dataset counts, precision). The record is the shard's
commit: written last, so a rank killed mid-shard leaves no record and that shard is recomputed.
After a barrier rank 0 folds every record into ``manifest.json`` and deletes them; a killed run
leaves the records, and any later run -- with any number of ranks -- reuses the shards they vouch
for. The files are hidden (leading dot), like the temporary files of atomic writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safesteer.errors import SafesteerError
from safesteer.io import read_json, write_json

PREFIX = ".shard-"
SUFFIX = ".commit.json"


def commit_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"{PREFIX}{int(index):05d}{SUFFIX}"


def write_commit(
    folder: Path,
    entry: dict[str, Any],
    *,
    labels: list[str],
    datasets: list[tuple[str, int]],
    precision: str | None,
    bf16_min_cosine: float | None,
    identity: dict[str, Any],
) -> None:
    write_json(
        commit_path(folder, entry["index"]),
        {
            "entry": entry,
            "labels": sorted(labels),
            "datasets": [[str(n), int(c)] for n, c in datasets],
            "precision": precision,
            "bf16_min_cosine": bf16_min_cosine,
            "identity": identity,
        },
    )


def read_commits(folder: Path, identity: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Records of ``folder`` written with the same extraction identity, by shard index."""
    out: dict[int, dict[str, Any]] = {}
    for p in sorted(Path(folder).glob(f"{PREFIX}*{SUFFIX}")):
        try:
            rec = read_json(p)
        except SafesteerError:
            continue  # unreadable record: the shard is simply recomputed
        if not isinstance(rec, dict) or rec.get("identity") != identity or "entry" not in rec:
            continue
        out[int(rec["entry"]["index"])] = rec
    return out


def apply_commits(manifest: dict[str, Any], commits: dict[int, dict[str, Any]]) -> None:
    """Fold records into an in-memory manifest (a record replaces an older entry of the same shard)."""
    if not commits:
        return
    by_index = {int(s["index"]): s for s in manifest["shards"]}
    for index in sorted(commits):
        rec = commits[index]
        by_index[index] = rec["entry"]
        manifest["labels"] = sorted(set(manifest["labels"]) | set(rec["labels"]))
        for name, count in rec["datasets"]:
            manifest["datasets"].setdefault(name, {})[str(index)] = int(count)
        if manifest.get("precision") is None and rec.get("precision") is not None:
            manifest["precision"], manifest["bf16_min_cosine"] = rec["precision"], rec.get("bf16_min_cosine")
    manifest["shards"] = [by_index[i] for i in sorted(by_index)]


def canonical_datasets(datasets: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Per-dataset shard counts in a fixed order (names sorted, shards by index): the same bytes
    whatever order the shards were finished in."""
    return {
        name: {k: datasets[name][k] for k in sorted(datasets[name], key=int)} for name in sorted(datasets)
    }


def clear_commits(folder: Path) -> None:
    for p in Path(folder).glob(f"{PREFIX}*{SUFFIX}"):
        p.unlink(missing_ok=True)
