"""Mergeable streaming statistics of sparse atom activations Z against many binary labels at once.

For every atom *j* and label *l* the accumulator keeps, separately for the label's positive rows
(y=1) and negative rows (y=0) — rows where the label is NaN are ignored for that label:

* the row count ``n`` (per label; the same for every atom),
* the mean activation and the centred sum of squares ``M2`` (equivalent to the sum and the sum of
  squares: ``sum = n·mean``, ``sumsq = M2 + n·mean²``, exposed as :attr:`sums`/:attr:`sumsqs`),
* the firing count (rows with ``z > fire_threshold``).

One batch costs three sparse × dense products ``Zᵀ [P N]`` (activations, squares, firing
indicators against the positive/negative masks), i.e. O(nnz(Z) · labels); Z is never densified.
Batches and whole accumulators combine with the pairwise update of Chan, Golub & LeVeque (1979)::

    n = n_a + n_b,  δ = mean_b − mean_a,  mean = mean_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n

which is exact in real arithmetic and numerically stable, so any split of the rows into shards,
merged in any order, gives the single-pass result up to rounding. Memory is O(atoms × labels).
For speed, consecutive batches first add raw float64 sums into a pending buffer that is folded in
with one Chan step every ``flush_rows`` rows (and before any read or merge); rows are grouped by
which labels they define, so a batch costs O(nnz(Z) · labels defined on its rows).

Outputs per (atom, label), :meth:`StreamingStats.to_frame`:

* ``dmu`` = μ₁ − μ₀ (mean activation on positives minus negatives),
* ``r`` = point-biserial correlation = (μ₁ − μ₀)/σ · √(p(1−p)), σ the population std of z over the
  label's rows, p the positive share (equals ``scipy.stats.pointbiserialr``); 0 when σ = 0,
* ``cohens_d`` = (μ₁ − μ₀)/s_pooled, s_pooled² = (M2₁ + M2₀)/(n₁ + n₀ − 2),
* ``freq_pos``/``freq_neg`` = firing frequency on positives/negatives,
* ``score`` — the **concept score**, a weighted combination of the effect size and the correlation
  as in the original study, made scale-free per label::

      score = w_r · r + w_dmu · dmu / max_j |dmu_j|        (defaults w_r = w_dmu = 0.5)

  Both terms lie in [−1, 1]; the Δμ term is normalised by the largest |Δμ| of any atom for the same
  label, so atoms of different activation scales are ranked by both strength and consistency.

The pass over a latent store that feeds these statistics, and the atom table built from them, are in
:mod:`safesteer.cartography.atom_map`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from safetensors.numpy import load_file, save_file

from safesteer.cartography.top import _as_csr
from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, read_json, write_json

SCORE_WEIGHTS = {"r": 0.5, "dmu": 0.5}


def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Pairwise combination of (count, mean, M2); counts broadcast over the atom axis."""
    n = n_a + n_b
    with np.errstate(invalid="ignore", divide="ignore"):
        frac_b = np.where(n > 0, n_b / np.where(n > 0, n, 1), 0.0)
        delta = mean_b - mean_a
        mean = mean_a + delta * frac_b
        m2 = m2_a + m2_b + delta * delta * (n_a * frac_b)
    return n, mean, m2


def _label_groups(Z: sp.csr_matrix, Y: np.ndarray, max_groups: int = 64):
    """Row groups that share which labels are defined (one per dataset, in practice).

    Each label usually covers a few datasets, so a row has few defined labels; computing each
    group against its own labels only costs Σ nnz(Z_g)·|labels_g| instead of nnz(Z)·|labels|.
    Yields ``(rows, cols)`` (``None`` = all); falls back to one group when grouping does not pay.
    """
    defined = ~np.isnan(Y)
    if defined.all() or Y.shape[1] <= 2:
        yield None, None
        return
    patterns, inverse = np.unique(defined, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).ravel()
    if len(patterns) > max_groups:
        yield None, None
        return
    row_nnz = np.diff(Z.indptr)
    grouped_cost = sum(row_nnz[inverse == g].sum() * patterns[g].sum() for g in range(len(patterns)))
    if grouped_cost >= 0.7 * row_nnz.sum() * Y.shape[1]:
        yield None, None
        return
    for g, pat in enumerate(patterns):
        cols = np.flatnonzero(pat)
        if len(cols):
            yield np.flatnonzero(inverse == g), cols


class StreamingStats:
    """Sufficient statistics of atom activations vs binary labels; update per batch, merge across shards.

    Storage is label-major: ``n`` (2 × labels), ``mean``/``m2``/``fire`` (2 × labels × atoms), side 0 =
    negatives, 1 = positives. A batch only touches the labels defined on some of its rows.
    """

    def __init__(
        self, n_atoms: int, label_names: Sequence[str], fire_threshold: float = 0.0, flush_rows: int = 65536
    ):
        if n_atoms <= 0:
            raise SafesteerError(f"n_atoms must be positive, got {n_atoms}")
        self.n_atoms = int(n_atoms)
        self.label_names = [str(x) for x in label_names]
        if len(set(self.label_names)) != len(self.label_names):
            raise SafesteerError("label names must be unique")
        self.fire_threshold = float(fire_threshold)
        L = len(self.label_names)
        self._n = np.zeros((2, L), dtype=np.float64)
        self.mean = np.zeros((2, L, self.n_atoms), dtype=np.float64)
        self.m2 = np.zeros((2, L, self.n_atoms), dtype=np.float64)
        self.fire = np.zeros((2, L, self.n_atoms), dtype=np.float64)
        self.rows_seen = 0
        # raw sums of recent batches, folded in with one Chan step every ``flush_rows`` rows
        self.flush_rows = int(flush_rows)
        self._pn = np.zeros((2, L), dtype=np.float64)
        self._ps: np.ndarray | None = None
        self._pq: np.ndarray | None = None
        self._prows = 0

    def _flush(self) -> None:
        """Fold the pending raw sums into (n, mean, M2) with the pairwise update."""
        if self._ps is None or self._prows == 0:
            return
        touched = np.flatnonzero(self._pn.sum(axis=0) > 0)
        for side in (0, 1):
            n_b = self._pn[side, touched][:, None]
            S, Q = self._ps[side, touched], self._pq[side, touched]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean_b = np.where(n_b > 0, S / np.where(n_b > 0, n_b, 1), 0.0)
            m2_b = np.maximum(Q - S * mean_b, 0.0)
            n_new, mean_new, m2_new = _chan(
                self._n[side, touched][:, None],
                self.mean[side, touched],
                self.m2[side, touched],
                n_b,
                mean_b,
                m2_b,
            )
            self._n[side, touched] = n_new[:, 0]
            self.mean[side, touched] = mean_new
            self.m2[side, touched] = m2_new
        self._pn[:] = 0
        self._ps[:, touched] = 0
        self._pq[:, touched] = 0
        self._prows = 0

    @property
    def n(self) -> np.ndarray:
        """Row counts per (side, label): side 0 = negatives, 1 = positives."""
        self._flush()
        return self._n

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def sums(self) -> np.ndarray:
        """Σ z per (side, atom, label): side 0 = negatives, 1 = positives."""
        self._flush()
        return np.transpose(self.mean * self._n[:, :, None], (0, 2, 1))

    @property
    def sumsqs(self) -> np.ndarray:
        self._flush()
        return np.transpose(self.m2 + self._n[:, :, None] * self.mean**2, (0, 2, 1))

    # ------------------------------------------------------------------ update / merge
    def update(self, Z, Y) -> "StreamingStats":
        """Add a batch: ``Z`` rows × atoms (scipy.sparse, never densified), ``Y`` rows × labels (0/1/NaN)."""
        Z = _as_csr(Z)
        Y = np.asarray(Y, dtype=np.float64)
        if Y.ndim == 1 and self.n_labels == 1:
            Y = Y[:, None]
        if Z.shape[1] != self.n_atoms:
            raise SafesteerError(f"Z has {Z.shape[1]} atoms; these statistics track {self.n_atoms}")
        if Y.shape != (Z.shape[0], self.n_labels):
            raise SafesteerError(
                f"labels have shape {Y.shape}; expected ({Z.shape[0]}, {self.n_labels}) to match Z and "
                "the label names"
            )
        finite = Y[~np.isnan(Y)]
        if finite.size and not np.isin(finite, (0.0, 1.0)).all():
            raise SafesteerError("labels must be 0, 1 or NaN (missing); binarise continuous scores first")
        self.rows_seen += Z.shape[0]
        touched = np.flatnonzero((~np.isnan(Y)).any(axis=0))
        if Z.shape[0] == 0 or touched.size == 0:
            return self
        Y = Y[:, touched]
        T = touched.size
        Z = Z.astype(np.float64)
        if self._ps is None:
            self._ps = np.zeros((2, self.n_labels, self.n_atoms))
            self._pq = np.zeros((2, self.n_labels, self.n_atoms))
        self._pn[0, touched] += (Y == 0).sum(axis=0)
        self._pn[1, touched] += (Y == 1).sum(axis=0)
        for rows, cols in _label_groups(Z, Y):
            Zg = Z if rows is None else Z[rows]
            Yg = Y if rows is None else Y[rows]
            cols = np.arange(T) if cols is None else cols
            Yg = Yg[:, cols]
            lab = touched[cols]
            masks = np.concatenate([(Yg == 0), (Yg == 1)], axis=1).astype(np.float64)  # rows × 2c
            ZT = Zg.T.tocsr()  # atoms × rows
            raw = ZT.data.copy()
            c = len(cols)
            for acc, data in (
                (self._ps, raw),
                (self._pq, raw * raw),
                (self.fire, (raw > self.fire_threshold).astype(np.float64)),
            ):
                ZT.data = data
                prod = np.asarray(ZT @ masks).T  # 2c × atoms
                acc[0, lab] += prod[:c]
                acc[1, lab] += prod[c:]
        self._prows += Z.shape[0]
        if self._prows >= self.flush_rows:
            self._flush()
        return self

    def _check_compatible(self, other: "StreamingStats") -> None:
        if other.n_atoms != self.n_atoms or other.label_names != self.label_names:
            raise SafesteerError("cannot merge statistics over different atoms or labels")
        if other.fire_threshold != self.fire_threshold:
            raise SafesteerError("cannot merge statistics with different firing thresholds")

    def merge(self, other: "StreamingStats") -> "StreamingStats":
        """Fold ``other`` into ``self`` (in place; returns self). Order does not matter."""
        self._check_compatible(other)
        self._flush()
        other._flush()
        for side in (0, 1):
            n_new, self.mean[side], self.m2[side] = _chan(
                self._n[side][:, None],
                self.mean[side],
                self.m2[side],
                other._n[side][:, None],
                other.mean[side],
                other.m2[side],
            )
            self._n[side] = n_new[:, 0]
            self.fire[side] += other.fire[side]
        self.rows_seen += other.rows_seen
        return self

    def copy(self) -> "StreamingStats":
        self._flush()
        out = StreamingStats(self.n_atoms, self.label_names, self.fire_threshold)
        out._n, out.mean, out.m2, out.fire = (
            self._n.copy(),
            self.mean.copy(),
            self.m2.copy(),
            self.fire.copy(),
        )  # label-major
        out.rows_seen = self.rows_seen
        return out

    # ------------------------------------------------------------------ results
    def arrays(self) -> dict[str, np.ndarray]:
        """Per-(atom, label) result arrays (atoms × labels)."""
        self._flush()
        n0, n1 = self._n[0][:, None], self._n[1][:, None]
        mu0, mu1 = self.mean[0], self.mean[1]
        _, _, m2_all = _chan(n0, mu0, self.m2[0], n1, mu1, self.m2[1])
        n = n0 + n1
        with np.errstate(invalid="ignore", divide="ignore"):
            dmu = np.where((n0 > 0) & (n1 > 0), mu1 - mu0, np.nan)
            var = np.where(n > 0, m2_all / np.where(n > 0, n, 1), np.nan)
            sd = np.sqrt(var)
            p = np.where(n > 0, n1 / np.where(n > 0, n, 1), np.nan)
            r = np.where(sd > 0, dmu / np.where(sd > 0, sd, 1) * np.sqrt(p * (1 - p)), 0.0)
            r = np.where(np.isnan(dmu), np.nan, r)
            pooled = np.sqrt((self.m2[0] + self.m2[1]) / np.where(n > 2, n - 2, np.nan))
            d = np.where(pooled > 0, dmu / np.where(pooled > 0, pooled, 1), 0.0)
            d = np.where(np.isnan(dmu) | np.isnan(pooled), np.nan, d)
            f0 = np.where(n0 > 0, self.fire[0] / np.where(n0 > 0, n0, 1), np.nan)
            f1 = np.where(n1 > 0, self.fire[1] / np.where(n1 > 0, n1, 1), np.nan)
        out = {
            "mean_pos": mu1,
            "mean_neg": mu0,
            "dmu": dmu,
            "std": sd,
            "r": r,
            "cohens_d": d,
            "freq_pos": f1,
            "freq_neg": f0,
        }
        return {k: v.T for k, v in out.items()}  # atoms × labels

    def to_frame(
        self, weights: dict[str, float] | None = None, labels: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """One row per (atom, label): counts, means, Δμ, r, Cohen's d, firing frequencies, concept score."""
        a = self.arrays()
        a["score"] = concept_score(a["r"], a["dmu"], weights)
        cols = list(range(self.n_labels)) if labels is None else [self.label_names.index(x) for x in labels]
        frames = []
        for li in cols:
            frames.append(
                pd.DataFrame(
                    {
                        "atom": np.arange(self.n_atoms, dtype=np.int64),
                        "label": self.label_names[li],
                        "n_pos": np.full(self.n_atoms, int(self._n[1, li]), dtype=np.int64),
                        "n_neg": np.full(self.n_atoms, int(self._n[0, li]), dtype=np.int64),
                        **{k: v[:, li] for k, v in a.items()},
                    }
                )
            )
        if not frames:
            return pd.DataFrame(columns=["atom", "label", "n_pos", "n_neg", *a.keys()])
        return pd.concat(frames, ignore_index=True)

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> Path:
        """Write ``stats.safetensors`` + ``stats.json`` (for merging partial passes later)."""
        self._flush()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "stats.safetensors") as tmp:
            save_file({"n": self._n, "mean": self.mean, "m2": self.m2, "fire": self.fire}, str(tmp))
        write_json(
            folder / "stats.json",
            {
                "format": "safesteer-atom-stats",
                "version": 2,
                "layout": "side × label × atom",
                "n_atoms": self.n_atoms,
                "labels": self.label_names,
                "fire_threshold": self.fire_threshold,
                "rows_seen": self.rows_seen,
            },
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "StreamingStats":
        folder = Path(folder)
        meta = read_json(folder / "stats.json")
        if meta.get("format") != "safesteer-atom-stats" or meta.get("version") != 2:
            raise SafesteerError(f"{folder}/stats.json is not a safesteer atom-statistics file")
        t = load_file(str(folder / "stats.safetensors"))
        out = cls(meta["n_atoms"], meta["labels"], meta.get("fire_threshold", 0.0))
        out._n, out.mean, out.m2, out.fire = t["n"], t["mean"], t["m2"], t["fire"]
        out.rows_seen = int(meta.get("rows_seen", 0))
        return out


def concept_score(r: np.ndarray, dmu: np.ndarray, weights: dict[str, float] | None = None) -> np.ndarray:
    """``w_r·r + w_dmu·dmu/max_atoms|dmu|`` per label column (atoms × labels, or a 1-D atom vector)."""
    w = {**SCORE_WEIGHTS, **(weights or {})}
    r = np.asarray(r, dtype=np.float64)
    dmu = np.asarray(dmu, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        scale = (
            np.nanmax(np.abs(dmu), axis=0, keepdims=True) if np.isfinite(dmu).any() else np.ones_like(dmu[:1])
        )
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        return w["r"] * np.nan_to_num(r) + w["dmu"] * np.nan_to_num(dmu / scale)


__all__ = ["SCORE_WEIGHTS", "StreamingStats", "concept_score"]
