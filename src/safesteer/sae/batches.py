"""Activation batches for the SAE trainer: the ``batches(epoch, split)`` contract and an in-memory source.

A :data:`BatchSource` is a callable returning an iterator of float arrays/tensors (rows x d_in), or
objects with ``.H`` (and optionally ``.ids``) such as :class:`safesteer.store.Batch`, for ``split`` in
``"train"``/``"val"``. It must replay the same stream for the same epoch: that is what makes a resumed
run bit-exact (the trainer re-creates epoch *e*'s stream and skips the batches already consumed).
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from safesteer.errors import SafesteerError

BatchSource = Callable[[int, str], Iterable[Any]]


def array_batches(
    X: np.ndarray | torch.Tensor,
    batch_size: int,
    *,
    ids: np.ndarray | list[str] | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    shuffle: bool = True,
) -> BatchSource:
    """A deterministic ``batches(epoch, split)`` over an in-memory array.

    The validation split is chosen by id (the activation store's hash rule), so a row is in the same split
    whatever the order or the number of rows; training order is a fresh permutation per epoch
    drawn from ``(seed, epoch)``.
    """
    Xn = X.numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
    n = Xn.shape[0]
    id_list = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(id_list) != n:
        raise SafesteerError(f"{len(id_list)} ids for {n} rows")
    is_val = np.array([split_of_id(i, val_fraction) == "val" for i in id_list], dtype=bool)
    idx = {"train": np.flatnonzero(~is_val), "val": np.flatnonzero(is_val), "all": np.arange(n)}

    def batches(epoch: int, split: str) -> Iterator[np.ndarray]:
        rows = idx[split]
        if shuffle and split == "train":
            rng = np.random.default_rng([int(seed), int(epoch)])
            rows = rows[rng.permutation(len(rows))]
        for start in range(0, len(rows), batch_size):
            yield Xn[rows[start : start + batch_size]]

    return batches


def split_of_id(row_id: str, val_fraction: float) -> str:
    """``"val"`` for a stable ``val_fraction`` of ids, else ``"train"``.

    Same rule as the activation store (``safesteer.store.is_validation_id``): blake2b-64 of the
    id string, as a fraction of 2**64, below ``val_fraction``.
    """
    if val_fraction <= 0:
        return "train"
    h = int.from_bytes(hashlib.blake2b(str(row_id).encode(), digest_size=8).digest(), "little")
    return "val" if h / 2.0**64 < val_fraction else "train"


def unpack(item: Any) -> tuple[Any, Any]:
    if hasattr(item, "H"):
        return item.H, getattr(item, "ids", None)
    return item, None


__all__ = ["BatchSource", "array_batches", "split_of_id", "unpack"]
