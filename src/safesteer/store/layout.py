"""File names of the activation store."""

from __future__ import annotations

from pathlib import Path

FORMAT = "safesteer-acts/1"


def layer_dir(root: str | Path, layer: int) -> Path:
    return Path(root) / f"layer-{int(layer)}"


def shard_files(index: int) -> dict[str, str]:
    """The three files of shard ``index``: activations, ids and metadata."""
    return {
        "H": f"shard-{index:05d}.npy",
        "ids": f"ids-{index:05d}.npy",
        "meta": f"meta-{index:05d}.parquet",
    }
