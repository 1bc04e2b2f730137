"""Probe ↔ dictionary: how a supervised probe direction is built from SAE atoms.

* :func:`decompose` — a sparse decomposition of a probe direction v over the unit decoder rows
  ``W_dec`` (d_sae × d): orthogonal matching pursuit (greedy, ≤ k atoms, least-squares refit each
  step; ``nonneg=True`` picks only positively aligned atoms and refits with NNLS) or a
  non-negative lasso (scikit-learn ``Lasso(positive=True)``). Reports the reconstruction
  cosine cos(v, Σ cᵢ W_dec[i]) — how much of the probe the dictionary explains with few atoms.
* :class:`LogitAtomCorrelation` — streaming, mergeable Pearson correlation of each probe's logit
  (w·h + b) with each atom's activation, over the same rows (sparse Z never densified).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from safesteer.errors import SafesteerError


@dataclass
class Decomposition:
    atoms: np.ndarray  # selected atom indices, by |coefficient| descending
    coefs: np.ndarray
    cosine: float  # cos(direction, reconstruction)
    method: str
    cosines_by_k: list[float] = field(default_factory=list)  # OMP: reconstruction cosine after each step

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"atom": self.atoms.astype(np.int64), "coef": self.coefs})

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "cosine": float(self.cosine),
            "atoms": self.atoms.tolist(),
            "coefs": [float(c) for c in self.coefs],
            "cosines_by_k": [float(c) for c in self.cosines_by_k],
        }


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def omp(
    v: np.ndarray, W_dec: np.ndarray, k: int = 16, nonneg: bool = False, tol: float = 1e-10
) -> Decomposition:
    """Orthogonal matching pursuit of ``v`` over the rows of ``W_dec`` (k atoms at most)."""
    from scipy.optimize import nnls  # scipy.optimize: safesteer.config loads this module

    D = np.asarray(W_dec, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if D.ndim != 2 or D.shape[1] != v.shape[0]:
        raise SafesteerError(f"decoder has shape {D.shape}; the direction has {v.shape[0]} dims")
    norms = np.linalg.norm(D, axis=1)
    Dn = D / np.where(norms > 0, norms, 1.0)[:, None]
    r = v.copy()
    chosen: list[int] = []
    coefs = np.zeros(0)
    cos_k: list[float] = []
    for _ in range(min(k, D.shape[0])):
        c = Dn @ r
        if chosen:
            c[chosen] = 0.0
        j = int(np.argmax(c)) if nonneg else int(np.argmax(np.abs(c)))
        if (nonneg and c[j] <= tol) or abs(c[j]) <= tol:
            break
        chosen.append(j)
        A = D[chosen].T  # d × s
        if nonneg:
            coefs, _ = nnls(A, v)
        else:
            coefs, *_ = np.linalg.lstsq(A, v, rcond=None)
        recon = A @ coefs
        r = v - recon
        cos_k.append(_cos(v, recon))
        if np.linalg.norm(r) <= tol * max(np.linalg.norm(v), 1.0):
            break
    atoms = np.array(chosen, dtype=np.int64)
    order = np.argsort(-np.abs(coefs), kind="stable") if len(coefs) else np.zeros(0, dtype=np.int64)
    keep = order[np.abs(coefs[order]) > 0] if len(coefs) else order
    recon = D[atoms].T @ coefs if len(atoms) else np.zeros_like(v)
    return Decomposition(atoms[keep], coefs[keep], _cos(v, recon), "omp-nonneg" if nonneg else "omp", cos_k)


def nonneg_lasso(
    v: np.ndarray, W_dec: np.ndarray, alpha: float = 1e-3, max_atoms: int | None = None
) -> Decomposition:
    """Non-negative lasso ``min ½/d‖v − Dᵀc‖² + α‖c‖₁, c ≥ 0`` over decoder rows."""
    from sklearn.exceptions import ConvergenceWarning  # sklearn: heavy, only when fitting
    from sklearn.linear_model import Lasso

    D = np.asarray(W_dec, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if D.ndim != 2 or D.shape[1] != v.shape[0]:
        raise SafesteerError(f"decoder has shape {D.shape}; the direction has {v.shape[0]} dims")
    model = Lasso(alpha=alpha, positive=True, fit_intercept=False, max_iter=5000, tol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(D.T, v)
    c = model.coef_
    nz = np.flatnonzero(c > 0)
    order = nz[np.argsort(-c[nz], kind="stable")]
    if max_atoms is not None:
        order = order[:max_atoms]
    recon = D[order].T @ c[order] if len(order) else np.zeros_like(v)
    return Decomposition(order.astype(np.int64), c[order], _cos(v, recon), "nonneg-lasso")


def decompose(
    v: np.ndarray, W_dec: np.ndarray, method: str = "omp", k: int = 16, alpha: float = 1e-3
) -> Decomposition:
    """``method``: ``omp`` (signed), ``omp-nonneg`` or ``nnlasso``."""
    if method == "omp":
        return omp(v, W_dec, k=k)
    if method == "omp-nonneg":
        return omp(v, W_dec, k=k, nonneg=True)
    if method == "nnlasso":
        return nonneg_lasso(v, W_dec, alpha=alpha, max_atoms=None)
    raise SafesteerError(f"unknown decomposition method '{method}'; valid choices: nnlasso, omp, omp-nonneg")


class LogitAtomCorrelation:
    """Streaming Pearson r between probe logits (rows × P) and sparse atom activations (rows × atoms)."""

    def __init__(self, n_atoms: int, probe_names: Sequence[str]):
        self.n_atoms = int(n_atoms)
        self.names = list(probe_names)
        P = len(self.names)
        self.n = 0.0
        self.mz = np.zeros(self.n_atoms)
        self.m2z = np.zeros(self.n_atoms)
        self.ms = np.zeros(P)
        self.m2s = np.zeros(P)
        self.c = np.zeros((self.n_atoms, P))  # co-moment Σ(z − z̄)(s − s̄)

    def update(self, Z, S) -> "LogitAtomCorrelation":
        Z = (Z.tocsr() if sp.issparse(Z) else sp.csr_matrix(np.asarray(Z))).astype(np.float64)
        S = np.asarray(S, dtype=np.float64)
        if S.ndim == 1:
            S = S[:, None]
        if Z.shape[1] != self.n_atoms or S.shape != (Z.shape[0], len(self.names)):
            raise SafesteerError(
                f"Z {Z.shape} and logits {S.shape} do not match {self.n_atoms} atoms × "
                f"{len(self.names)} probes"
            )
        nb = float(Z.shape[0])
        if nb == 0:
            return self
        sz = np.asarray(Z.sum(axis=0)).ravel()
        mz_b = sz / nb
        Z2 = Z.copy()
        Z2.data = Z2.data**2
        m2z_b = np.maximum(np.asarray(Z2.sum(axis=0)).ravel() - sz * mz_b, 0.0)
        ms_b = S.mean(axis=0)
        Sc = S - ms_b
        m2s_b = (Sc**2).sum(axis=0)
        c_b = np.asarray(Z.T.tocsr() @ Sc)  # Σ z (s − s̄_b) = Σ (z − z̄_b)(s − s̄_b)
        self._combine(nb, mz_b, m2z_b, ms_b, m2s_b, c_b)
        return self

    def _combine(self, nb, mz_b, m2z_b, ms_b, m2s_b, c_b) -> None:
        na = self.n
        n = na + nb
        dz = mz_b - self.mz
        ds = ms_b - self.ms
        f = nb / n
        self.c = self.c + c_b + np.outer(dz, ds) * na * f
        self.m2z = self.m2z + m2z_b + dz * dz * na * f
        self.m2s = self.m2s + m2s_b + ds * ds * na * f
        self.mz = self.mz + dz * f
        self.ms = self.ms + ds * f
        self.n = n

    def merge(self, other: "LogitAtomCorrelation") -> "LogitAtomCorrelation":
        if other.n_atoms != self.n_atoms or other.names != self.names:
            raise SafesteerError("cannot merge correlations over different atoms or probes")
        if other.n:
            self._combine(other.n, other.mz, other.m2z, other.ms, other.m2s, other.c)
        return self

    def correlations(self) -> np.ndarray:
        """atoms × probes Pearson r (0 where an atom never varies)."""
        den = np.sqrt(np.outer(self.m2z, self.m2s))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, self.c / np.where(den > 0, den, 1), 0.0)

    def to_frame(self, top: int | None = None) -> pd.DataFrame:
        R = self.correlations()
        frames = []
        for p, name in enumerate(self.names):
            idx = (
                np.arange(self.n_atoms) if top is None else np.argsort(-np.abs(R[:, p]), kind="stable")[:top]
            )
            frames.append(pd.DataFrame({"probe": name, "atom": idx.astype(np.int64), "corr": R[idx, p]}))
        return (
            pd.concat(frames, ignore_index=True)
            if frames
            else pd.DataFrame(columns=["probe", "atom", "corr"])
        )
