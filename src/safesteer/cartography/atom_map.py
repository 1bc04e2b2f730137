"""The atom map: one streaming pass over the latent shards against the labels, and its table.

:func:`map_latents` reads latent shards ``(index, csr rows × atoms, ids)``, matches their rows by id
to int8 label codes (:func:`encode_labels`; −1 = missing) and accumulates, in one pass:

* :class:`~safesteer.cartography.stats.StreamingStats` of every (atom, label) on the main rows and,
  separately, on a deterministic held-out fraction (:func:`heldout_mask`, salted blake2b of the id)
  used to check that an atom's association replicates;
* the top-activating rows per atom (:class:`~safesteer.cartography.top.TopActivations`);
* optionally probe-logit ↔ atom correlations
  (:class:`~safesteer.cartography.link.LogitAtomCorrelation`).

:func:`atom_table` turns the result into the atom map, one row per (atom, label) with its category
and the held-out replication columns.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np
import pandas as pd

from safesteer.cartography.link import LogitAtomCorrelation
from safesteer.cartography.stats import StreamingStats
from safesteer.cartography.top import TopActivations, _as_csr
from safesteer.errors import SafesteerError
from safesteer.probes.labels import category_of


def heldout_mask(ids: Sequence[str], fraction: float, salt: str = "safesteer-map") -> np.ndarray:
    """Deterministic held-out rows for replication: True where blake2b(salt|id) falls in ``fraction``.

    Salted, so it is independent of the store's own train/val split.
    """
    if fraction <= 0:
        return np.zeros(len(ids), dtype=bool)
    out = np.empty(len(ids), dtype=bool)
    for i, x in enumerate(ids):
        h = int.from_bytes(hashlib.blake2b(f"{salt}|{x}".encode(), digest_size=8).digest(), "little")
        out[i] = h / 2.0**64 < fraction
    return out


def encode_labels(Y: np.ndarray) -> np.ndarray:
    """0/1/NaN float labels → int8 codes (−1 = missing), 8× smaller for millions of rows."""
    out = np.full(Y.shape, -1, dtype=np.int8)
    out[Y == 0] = 0
    out[Y == 1] = 1
    return out


def decode_labels(codes: np.ndarray) -> np.ndarray:
    Y = codes.astype(np.float64)
    Y[codes < 0] = np.nan
    return Y


class MapResult:
    """Everything one pass over the latents accumulates (see :func:`map_latents`)."""

    def __init__(
        self,
        stats: StreamingStats,
        heldout: StreamingStats | None,
        top: TopActivations,
        corr=None,
        n_rows: int = 0,
        n_unlabelled: int = 0,
        heldout_fraction: float = 0.0,
    ):
        self.stats, self.heldout, self.top, self.corr = stats, heldout, top, corr
        self.n_rows, self.n_unlabelled, self.heldout_fraction = n_rows, n_unlabelled, heldout_fraction


def map_latents(
    shards,
    n_atoms: int,
    ids: Sequence[str],
    label_names: Sequence[str],
    codes: np.ndarray,
    *,
    heldout_fraction: float = 0.2,
    top_k: int = 10,
    logits: np.ndarray | None = None,
    probe_names: Sequence[str] | None = None,
    fire_threshold: float = 0.0,
    progress=None,
) -> MapResult:
    """One pass over latent shards ``(index, csr rows × atoms, ids)`` against per-id label codes.

    ``ids``/``codes`` (rows × labels int8, −1 missing) describe the labelled rows (any order);
    latent rows are matched by id. Rows in the held-out fraction (:func:`heldout_mask`) go to a
    separate accumulator, used for replication; with ``heldout_fraction=0`` everything is in the
    main one. ``logits`` (rows × probes, aligned with ``ids``) adds probe-logit ↔ atom correlations.
    """
    index = pd.Index(np.asarray(ids).astype(str))
    if not index.is_unique:
        keep = ~index.duplicated()
        index, codes = index[keep], codes[keep]
        logits = logits[keep] if logits is not None else None
    stats = StreamingStats(n_atoms, label_names, fire_threshold)
    held = StreamingStats(n_atoms, label_names, fire_threshold) if heldout_fraction > 0 else None
    top = TopActivations(n_atoms, top_k)
    corr = LogitAtomCorrelation(n_atoms, list(probe_names or [])) if logits is not None else None
    n_rows = n_unl = 0
    it = progress(shards) if progress is not None else shards
    for _, Z, shard_ids in it:
        Z = _as_csr(Z)
        shard_ids = np.asarray(shard_ids).astype(str)
        if Z.shape[1] != n_atoms:
            raise SafesteerError(f"latent shard has {Z.shape[1]} atoms; expected {n_atoms}")
        pos = index.get_indexer(shard_ids)
        found = pos >= 0
        n_unl += int((~found).sum())
        Y = np.full((len(shard_ids), len(label_names)), np.nan)
        if found.any():
            Y[found] = decode_labels(codes[pos[found]])
        h = heldout_mask(shard_ids, heldout_fraction)
        main_rows = np.flatnonzero(~h)
        stats.update(Z[main_rows], Y[main_rows])
        if held is not None and h.any():
            rows = np.flatnonzero(h)
            held.update(Z[rows], Y[rows])
        top.update(Z, shard_ids)
        if corr is not None and found.any():
            rows = np.flatnonzero(found)
            corr.update(Z[rows], logits[pos[rows]])
        n_rows += Z.shape[0]
    return MapResult(stats, held, top, corr, n_rows, n_unl, heldout_fraction)


def atom_table(
    stats: StreamingStats | MapResult,
    heldout: StreamingStats | None = None,
    weights: dict[str, float] | None = None,
) -> pd.DataFrame:
    """The atom map: :meth:`StreamingStats.to_frame` + ``category`` + held-out replication columns.

    Held-out columns: ``r_heldout``, ``dmu_heldout``, ``n_pos_heldout``, ``n_neg_heldout`` (NaN without
    a held-out accumulator).
    """
    if isinstance(stats, MapResult):
        heldout = stats.heldout if heldout is None else heldout
        stats = stats.stats
    df = stats.to_frame(weights)
    df.insert(2, "category", df["label"].map(lambda x: category_of(x)).astype(str))
    if heldout is not None:
        h = heldout.arrays()
        df["r_heldout"] = h["r"].T.ravel()
        df["dmu_heldout"] = h["dmu"].T.ravel()
        df["n_pos_heldout"] = np.repeat(heldout.n[1].astype(np.int64), stats.n_atoms)
        df["n_neg_heldout"] = np.repeat(heldout.n[0].astype(np.int64), stats.n_atoms)
    else:
        for c in ("r_heldout", "dmu_heldout"):
            df[c] = np.nan
    return df


__all__ = [
    "MapResult",
    "atom_table",
    "decode_labels",
    "encode_labels",
    "heldout_mask",
    "map_latents",
]
