"""Logistic probes: raw-space algebra, agreement with scikit-learn, metrics, DiffMean, persistence."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from safesteer.errors import SafesteerError
from safesteer.probes import Probe, diffmean_direction, load_probe, train_probe
from safesteer.probes.logistic import fold_standardisation


def _data(n=600, d=12, seed=0, scales=None, noise=1.0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    w_true = rng.normal(size=d)
    logits = X @ w_true + noise * rng.logistic(size=n)
    y = (logits > 0).astype(int)
    scales = np.geomspace(0.05, 20, d) if scales is None else scales
    H = X * scales + rng.normal(size=d) * 3  # heterogeneous scales and offsets
    return H, y


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_fold_standardisation_algebra_is_exact():
    H, y = _data()
    sc = StandardScaler().fit(H)
    clf = LogisticRegression(C=0.3, max_iter=5000).fit(sc.transform(H), y)
    w, b = fold_standardisation(clf.coef_[0], clf.intercept_[0], sc.mean_, sc.scale_)
    np.testing.assert_allclose(H @ w + b, clf.decision_function(sc.transform(H)), rtol=1e-10, atol=1e-10)
    p = Probe(w=w, b=b)
    np.testing.assert_allclose(p.predict_proba(H), clf.predict_proba(sc.transform(H))[:, 1], atol=1e-12)


def test_trained_probe_equals_standardised_sklearn_in_raw_space():
    H, y = _data()
    C = 0.3
    p = train_probe(H[:400], y[:400], H[400:], y[400:], Cs=(C,))
    sc = StandardScaler().fit(H[:400])
    ref = LogisticRegression(C=C, tol=1e-10, max_iter=5000).fit(sc.transform(H[:400]), y[:400])
    w_ref = ref.coef_[0] / sc.scale_
    b_ref = ref.intercept_[0] - np.dot(ref.coef_[0], sc.mean_ / sc.scale_)
    assert _cos(p.w, w_ref) > 1 - 1e-7
    np.testing.assert_allclose(p.w, w_ref, rtol=1e-3, atol=1e-6)
    assert p.b == pytest.approx(b_ref, rel=1e-3, abs=1e-5)
    np.testing.assert_allclose(
        p.predict_proba(H[400:]), ref.predict_proba(sc.transform(H[400:]))[:, 1], atol=1e-4
    )
    # the raw-space direction differs from the naive standardised-space direction when scales differ
    assert _cos(p.direction, ref.coef_[0]) < 0.9
    assert np.linalg.norm(p.direction) == pytest.approx(1.0)


def test_direction_matches_sklearn_on_raw_data_with_weak_regularisation():
    # the unregularised MLE is affine-equivariant: raw-space fit and standardised fit agree
    H, y = _data(scales=np.geomspace(0.2, 5, 12), noise=3.0)
    p = train_probe(H, y, Cs=(1e6,))
    ref = LogisticRegression(C=1e6, tol=1e-10, max_iter=20000).fit(H, y)
    assert _cos(p.direction, ref.coef_[0]) >= 0.999


def test_unstandardised_training_equals_sklearn():
    H, y = _data(scales=np.ones(12))
    p = train_probe(H, y, Cs=(0.5,), standardize=False)
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=5000).fit(H, y)
    assert _cos(p.direction, ref.coef_[0]) >= 0.9999


def test_direction_points_to_positive_class_and_metrics():
    H, y = _data(n=800, noise=0.3)
    p = train_probe(H[:600], y[:600], H[600:], y[600:])
    m = p.metrics
    assert m["auroc"] > 0.95 and m["accuracy"] > 0.85 and 0 < m["f1"] <= 1
    assert m["n_train"] == 600 and m["n_test"] == 200 and m["C"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    assert set(m["cv_log_loss"]) and "diffmean_auroc" in m
    proj = H @ p.direction
    assert proj[y == 1].mean() > proj[y == 0].mean()
    np.testing.assert_array_equal(p.predict(H[:5]), (p.predict_proba(H[:5]) >= 0.5).astype(int))


def test_balanced_shifts_the_intercept_toward_the_minority():
    rng = np.random.default_rng(1)
    H = rng.normal(size=(500, 4))
    y = ((H[:, 0] + rng.normal(size=500) * 1.5) > 1.6).astype(int)  # ~14% positives
    plain = train_probe(H, y, Cs=(1.0,))
    bal = train_probe(H, y, Cs=(1.0,), balanced=True)
    assert bal.predict_proba(H).mean() > plain.predict_proba(H).mean()
    assert bal.metrics["balanced"] is True


def test_diffmean():
    rng = np.random.default_rng(2)
    H = rng.normal(size=(100, 5))
    y = np.r_[np.ones(40, int), np.zeros(60, int)]
    v = diffmean_direction(H, y)
    ref = H[:40].mean(0) - H[40:].mean(0)
    np.testing.assert_allclose(v, ref / np.linalg.norm(ref))
    with pytest.raises(SafesteerError):
        diffmean_direction(H, np.ones(100, int))


def test_save_load_roundtrip(tmp_path):
    H, y = _data(n=200)
    p = train_probe(H[:150], y[:150], H[150:], y[150:], Cs=(1.0,), meta={"label": "toy"})
    p.save(tmp_path / "pr")
    assert sorted(f.name for f in (tmp_path / "pr").iterdir()) == ["probe.json", "probe.safetensors"]
    q = load_probe(tmp_path / "pr")
    np.testing.assert_array_equal(q.w, p.w)
    np.testing.assert_array_equal(q.diffmean, p.diffmean)
    assert q.b == p.b and q.meta["label"] == "toy" and q.metrics["auroc"] == p.metrics["auroc"]
    np.testing.assert_allclose(q.predict_proba(H), p.predict_proba(H))
    assert isinstance(load_probe(tmp_path / "pr" / "probe.json"), Probe)


def test_errors(tmp_path):
    H, y = _data(n=50)
    with pytest.raises(SafesteerError, match="at least 2"):
        train_probe(H, np.zeros(50, int))
    with pytest.raises(SafesteerError, match="0 and 1"):
        train_probe(H, np.full(50, 2))
    with pytest.raises(SafesteerError):
        train_probe(H, y[:10])
    p = train_probe(H, y, Cs=(1.0,))
    with pytest.raises(SafesteerError, match="expects"):
        p.predict_proba(H[:, :3])
    with pytest.raises(SafesteerError, match="missing file"):
        load_probe(tmp_path)


def test_integer_sample_weights_equal_duplicated_rows():
    # weight 2 on a row == that row twice (same objective), for the fit and for the choice of C
    H, y = _data(n=300, scales=np.ones(12))
    w = np.where(np.arange(300) % 3 == 0, 2.0, 1.0)
    p = train_probe(H, y, Cs=(0.5,), standardize=False, sample_weight=w)
    dup = np.concatenate([np.arange(300), np.flatnonzero(w == 2.0)])
    ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=5000).fit(H[dup], y[dup])
    np.testing.assert_allclose(p.w, ref.coef_[0], rtol=1e-3, atol=1e-5)
    assert p.b == pytest.approx(ref.intercept_[0], rel=1e-3, abs=1e-5)
    plain = train_probe(H, y, Cs=(0.5,), standardize=False)
    assert np.max(np.abs(plain.w - p.w)) > 1e-3  # the weights did change the fit
    with pytest.raises(SafesteerError, match="sample_weight"):
        train_probe(H, y, Cs=(0.5,), sample_weight=np.zeros(300))
