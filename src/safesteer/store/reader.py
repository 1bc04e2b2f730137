"""Streaming reader used by every stage after extraction (bounded memory)."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pandas as pd

from safesteer.errors import SafesteerError
from safesteer.io import load_npy, read_json
from safesteer.store.layout import FORMAT

Split = Literal["all", "train", "val"]


def is_validation_id(ids: np.ndarray | list[str], fraction: float) -> np.ndarray:
    """Deterministic split by id hash: True where the id falls in the validation fraction."""
    out = np.empty(len(ids), dtype=bool)
    for i, x in enumerate(ids):
        h = int.from_bytes(hashlib.blake2b(str(x).encode(), digest_size=8).digest(), "little")
        out[i] = h / 2.0**64 < fraction
    return out


@dataclass
class Batch:
    H: np.ndarray  # rows × d, float32
    ids: np.ndarray  # rows, str
    labels: pd.DataFrame  # one column per label (+ dataset, split, source); empty if not requested

    def __len__(self) -> int:
        return len(self.ids)


class ActivationStore:
    """Read a layer folder written by ``safesteer extract``.

    ``path`` is a layer folder (with ``manifest.json``) or an extraction root holding exactly one
    ``layer-*`` folder.
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        if not (path / "manifest.json").is_file():
            layers = (
                sorted(p for p in path.glob("layer-*") if (p / "manifest.json").is_file())
                if path.is_dir()
                else []
            )
            if len(layers) == 1:
                path = layers[0]
            elif layers:
                raise SafesteerError(
                    f"{path} holds several layers ({', '.join(p.name for p in layers)}); pass one of "
                    "those folders"
                )
            else:
                raise SafesteerError(
                    f"{path} is not an activation store (no manifest.json); run 'safesteer extract' first"
                )
        self.path = path
        self.manifest = read_json(path / "manifest.json")
        if self.manifest.get("format") != FORMAT:
            raise SafesteerError(
                f"{path}/manifest.json has format {self.manifest.get('format')!r}, expected {FORMAT!r}"
            )
        self.d = int(self.manifest["d"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self.layer = int(self.manifest["layer"])
        self.shards = sorted(self.manifest["shards"], key=lambda s: s["index"])
        self.shard_names = [s["files"]["H"] for s in self.shards]
        self.n_rows = int(sum(s["rows"] for s in self.shards))
        if self.manifest.get("complete") is False:
            print(
                f"[safesteer] warning: {path} is incomplete ({self.n_rows} rows so far); re-run "
                "extract to finish it",
                file=sys.stderr,
            )

    def __len__(self) -> int:
        return self.n_rows

    def iter_shards(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(shard index, memory-mapped rows × d activations, ids) for each shard."""
        for s in self.shards:
            H = load_npy(self.path / s["files"]["H"], mmap=True)
            ids = load_npy(self.path / s["files"]["ids"])
            yield s["index"], H, ids

    def shard_meta(self, shard: dict) -> pd.DataFrame:
        return pd.read_parquet(self.path / shard["files"]["meta"])

    def label_names(self) -> list[str]:
        return list(self.manifest.get("labels", []))

    def iter_batches(
        self,
        batch_size: int,
        *,
        split: Split = "all",
        val_fraction: float = 0.05,
        shuffle_buffer: int = 0,
        seed: int = 0,
        epoch: int = 0,
        with_labels: bool = True,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """Batches of float32 activations over all shards with bounded memory.

        ``split`` selects rows by id hash (:func:`is_validation_id`). With ``shuffle_buffer`` > 0
        shards are visited in a seeded order and rows are shuffled inside a buffer of that many
        rows; the order is a deterministic function of (seed, epoch).
        """
        if batch_size <= 0:
            raise SafesteerError("batch size must be positive")
        rng = np.random.default_rng([seed, epoch])
        order = list(range(len(self.shards)))
        if shuffle_buffer > 0:
            rng.shuffle(order)
        pend_H: list[np.ndarray] = []
        pend_ids: list[np.ndarray] = []
        pend_lab: list[pd.DataFrame] = []
        n_pend = 0
        threshold = max(shuffle_buffer, batch_size)

        def emit(final: bool) -> Iterator[Batch]:
            nonlocal pend_H, pend_ids, pend_lab, n_pend
            H = np.concatenate(pend_H) if pend_H else np.zeros((0, self.d), np.float32)
            ids = np.concatenate(pend_ids) if pend_ids else np.zeros(0, dtype=str)
            lab = (
                pd.concat(pend_lab, ignore_index=True)
                if with_labels and pend_lab
                else pd.DataFrame(index=range(len(ids)))
            )
            if shuffle_buffer > 0:
                perm = rng.permutation(len(ids))
                H, ids, lab = H[perm], ids[perm], lab.iloc[perm].reset_index(drop=True)
            n_full = len(ids) // batch_size
            for b in range(n_full):
                sl = slice(b * batch_size, (b + 1) * batch_size)
                yield Batch(H[sl], ids[sl], lab.iloc[sl].reset_index(drop=True))
            rest = slice(n_full * batch_size, len(ids))
            if final:
                if len(ids) > n_full * batch_size and not drop_last:
                    yield Batch(H[rest], ids[rest], lab.iloc[rest].reset_index(drop=True))
                pend_H, pend_ids, pend_lab, n_pend = [], [], [], 0
            else:
                pend_H, pend_ids = [H[rest]], [ids[rest]]
                pend_lab = [lab.iloc[rest].reset_index(drop=True)]
                n_pend = len(pend_ids[0])

        for k in order:
            s = self.shards[k]
            H = load_npy(self.path / s["files"]["H"], mmap=True)
            ids = load_npy(self.path / s["files"]["ids"])
            if split != "all":
                keep = is_validation_id(ids, val_fraction)
                if split == "train":
                    keep = ~keep
                idx = np.flatnonzero(keep)
            else:
                idx = np.arange(len(ids))
            if len(idx) == 0:
                continue
            pend_H.append(np.asarray(H[idx], dtype=np.float32))
            pend_ids.append(ids[idx])
            if with_labels:
                pend_lab.append(self.shard_meta(s).iloc[idx].reset_index(drop=True))
            n_pend += len(idx)
            if n_pend >= threshold:
                yield from emit(final=False)
        yield from emit(final=True)

    def load_all(self, split: Split = "all", val_fraction: float = 0.05, with_labels: bool = True) -> Batch:
        """Everything of a split in memory (for probes on modest stores)."""
        parts = list(
            self.iter_batches(
                max(self.n_rows, 1), split=split, val_fraction=val_fraction, with_labels=with_labels
            )
        )
        if not parts:
            return Batch(np.zeros((0, self.d), np.float32), np.zeros(0, dtype=str), pd.DataFrame())
        return Batch(
            np.concatenate([p.H for p in parts]),
            np.concatenate([p.ids for p in parts]),
            pd.concat([p.labels for p in parts], ignore_index=True),
        )
