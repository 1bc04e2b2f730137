"""The k highest activations of every atom with their row ids (mergeable, like the statistics)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from safesteer.errors import SafesteerError


def _as_csr(Z) -> sp.csr_matrix:
    if sp.issparse(Z):
        Z = Z.tocsr()
    else:
        Z = sp.csr_matrix(np.asarray(Z))
    return Z


class TopActivations:
    """The ``k`` highest activations of every atom with their row ids; mergeable like the statistics."""

    def __init__(self, n_atoms: int, k: int = 10):
        self.n_atoms = int(n_atoms)
        self.k = int(k)
        self.values = np.full((self.n_atoms, self.k), -np.inf, dtype=np.float64)
        self.ids = np.full((self.n_atoms, self.k), "", dtype=object)

    def _absorb(
        self, cols: np.ndarray, vals: np.ndarray, ids: np.ndarray, rows: np.ndarray | None = None
    ) -> None:
        """Fold candidates in; ``ids`` is indexed by ``rows`` when given (gathered after filtering)."""
        if cols.size == 0:
            return
        keep = vals > self.values[cols, -1]
        cols, vals = cols[keep], vals[keep]
        ids = ids[rows[keep]] if rows is not None else ids[keep]
        if cols.size == 0:
            return
        touched = np.unique(cols)
        all_cols = np.concatenate([cols, np.repeat(touched, self.k)])
        all_vals = np.concatenate([vals, self.values[touched].ravel()])
        all_ids = np.concatenate([ids.astype(object), self.ids[touched].ravel()])
        order = np.lexsort((-all_vals, all_cols))  # stable: ties keep arrival order
        c, v, i = all_cols[order], all_vals[order], all_ids[order]
        starts = np.searchsorted(c, touched)
        rank = np.arange(c.size) - np.repeat(starts, np.diff(np.append(starts, c.size)))
        sel = rank < self.k
        self.values[touched] = -np.inf
        self.ids[touched] = ""
        self.values[c[sel], rank[sel]] = v[sel]
        self.ids[c[sel], rank[sel]] = i[sel]

    def update(self, Z, ids: Sequence[str]) -> "TopActivations":
        Z = _as_csr(Z).tocoo()
        ids = np.asarray(ids, dtype=object)
        if len(ids) != Z.shape[0]:
            raise SafesteerError(f"{len(ids)} ids for {Z.shape[0]} rows")
        pos = Z.data > 0
        self._absorb(Z.col[pos].astype(np.int64), Z.data[pos].astype(np.float64), ids, rows=Z.row[pos])
        return self

    def merge(self, other: "TopActivations") -> "TopActivations":
        if other.n_atoms != self.n_atoms or other.k != self.k:
            raise SafesteerError("cannot merge top activations of different shapes")
        m = np.isfinite(other.values)
        rows, cols = np.nonzero(m)
        self._absorb(rows.astype(np.int64), other.values[m], other.ids[m])
        return self

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, n_atoms: int, k: int) -> "TopActivations":
        """The inverse of :meth:`to_frame` (e.g. to merge maps read back from ``top_activations.parquet``)."""
        out = cls(n_atoms, k)
        atoms, ranks = frame["atom"].to_numpy(), frame["rank"].to_numpy()
        out.values[atoms, ranks] = frame["activation"].to_numpy()
        out.ids[atoms, ranks] = frame["id"].astype(str).to_numpy()
        return out

    def to_frame(self) -> pd.DataFrame:
        m = np.isfinite(self.values)
        atoms, ranks = np.nonzero(m)
        return pd.DataFrame(
            {
                "atom": atoms.astype(np.int64),
                "rank": ranks.astype(np.int64),
                "id": self.ids[m].astype(str),
                "activation": self.values[m],
            }
        )
