"""Probe ↔ dictionary: OMP / non-negative lasso decompositions and logit ↔ atom correlations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.linear_model import orthogonal_mp

from safesteer.cartography.link import LogitAtomCorrelation, decompose, nonneg_lasso, omp
from safesteer.errors import SafesteerError


def _dict(n=300, d=48, seed=0):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(n, d))
    return W / np.linalg.norm(W, axis=1, keepdims=True)


def test_omp_recovers_a_planted_combination():
    W = _dict()
    v = 2.0 * W[10] - 1.0 * W[200] + 0.5 * W[33]
    dec = omp(v, W, k=8)
    assert set(dec.atoms.tolist()) == {10, 200, 33}
    assert dec.cosine == pytest.approx(1.0, abs=1e-9)
    np.testing.assert_allclose(sorted(dec.coefs), sorted([2.0, -1.0, 0.5]), atol=1e-8)
    ref = orthogonal_mp(W.T, v, n_nonzero_coefs=3)
    np.testing.assert_allclose(ref[dec.atoms], dec.coefs, atol=1e-8)


def test_omp_cosine_grows_and_nonneg_variants():
    W = _dict(seed=1)
    v = np.random.default_rng(2).normal(size=48)
    dec = omp(v, W, k=12)
    assert len(dec.cosines_by_k) == 12 and np.all(np.diff(dec.cosines_by_k) >= -1e-12)
    nn = decompose(v, W, method="omp-nonneg", k=12)
    assert (nn.coefs >= 0).all() and 0 < nn.cosine <= 1
    las = nonneg_lasso(v, W, alpha=1e-3)
    assert (las.coefs > 0).all() and las.cosine > 0.5
    assert las.to_frame().shape[1] == 2 and decompose(v, W, method="nnlasso").method == "nonneg-lasso"
    with pytest.raises(SafesteerError):
        decompose(v, W, method="pca")
    with pytest.raises(SafesteerError):
        omp(v[:5], W)


def test_logit_atom_correlation_matches_numpy_across_shards():
    rng = np.random.default_rng(3)
    n, A = 500, 20
    Z = rng.exponential(1.0, (n, A)) * (rng.random((n, A)) < 0.3)
    Z[:, 4] = 0.0  # constant atom → r = 0
    S = np.c_[Z[:, 2] * 2 + rng.normal(size=n), rng.normal(size=n)]
    acc = [
        LogitAtomCorrelation(A, ["p", "q"]).update(sp.csr_matrix(Z[c]), S[c])
        for c in np.array_split(rng.permutation(n), 6)
    ]
    total = acc[5]
    for a in acc[:5]:
        total.merge(a)
    R = total.correlations()
    for j in range(A):
        for p in range(2):
            ref = 0.0 if j == 4 else np.corrcoef(Z[:, j], S[:, p])[0, 1]
            assert R[j, p] == pytest.approx(ref, abs=1e-9)
    top = total.to_frame(top=1)
    assert top[top.probe == "p"].atom.iloc[0] == 2
