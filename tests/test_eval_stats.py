"""Bootstrap CIs: nominal coverage by simulation, paired comparisons, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from safesteer.errors import SafesteerError
from safesteer.evaluate.stats import bootstrap_ci, coverage_simulation, paired_bootstrap


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_coverage_of_known_normal_mean(method):
    cov = coverage_simulation(
        lambda rng, n: rng.normal(3.0, 2.0, size=n), 3.0, n=80, reps=400, n_boot=1000, method=method, seed=11
    )
    assert 0.92 <= cov <= 0.98, cov


def test_coverage_of_skewed_bernoulli_mean():
    # P(Yes)-like 0/1 outcomes with p = 0.3
    cov = coverage_simulation(
        lambda rng, n: (rng.random(n) < 0.3).astype(float),
        0.3,
        n=100,
        reps=400,
        n_boot=1000,
        method="bca",
        seed=5,
    )
    assert 0.92 <= cov <= 0.98, cov


def test_ci_basic_properties_and_seed():
    x = np.random.default_rng(0).normal(size=200)
    a, b = bootstrap_ci(x, seed=3), bootstrap_ci(x, seed=3)
    assert a == b
    assert a.low < a.estimate < a.high
    assert a.estimate == pytest.approx(x.mean())
    assert a.se == pytest.approx(x.std(ddof=1) / np.sqrt(x.size), rel=0.15)
    const = bootstrap_ci(np.full(10, 2.0), method="bca")
    assert const.low == const.high == 2.0


def test_custom_stat_matches_mean_version():
    x = np.random.default_rng(1).normal(size=50)
    a = bootstrap_ci(x, n_boot=500, seed=2)
    b = bootstrap_ci(stat=lambda idx: float(x[idx].mean()), n=x.size, n_boot=500, seed=2)
    assert a.low == pytest.approx(b.low) and a.high == pytest.approx(b.high)


def test_paired_bootstrap_detects_shift_and_null():
    rng = np.random.default_rng(4)
    base = rng.normal(size=60)
    shifted = base + 0.3 + rng.normal(scale=0.05, size=60)
    pd_ = paired_bootstrap(base, shifted, seed=1)
    assert pd_.diff.low > 0.25 and pd_.diff.high < 0.35 and pd_.p_value < 0.01
    same = paired_bootstrap(base, base.copy())
    assert same.diff.estimate == 0 and same.p_value == 1.0 and same.diff.covers(0.0)
    noise = paired_bootstrap(base, base + rng.normal(scale=1.0, size=60), seed=1)
    assert noise.diff.covers(0.0)


def test_paired_custom_stat():
    a = np.array([0.0, 1, 1, 0, 1])
    b = np.array([1.0, 1, 1, 1, 1])
    res = paired_bootstrap(
        stat=lambda idx, w: float((a if w == 0 else b)[idx].mean()), n=5, n_boot=300, seed=0
    )
    assert res.baseline == pytest.approx(0.6) and res.value == 1.0
    assert res.diff.estimate == pytest.approx(0.4)


def test_errors():
    with pytest.raises(SafesteerError):
        bootstrap_ci([])
    with pytest.raises(SafesteerError):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(SafesteerError):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(SafesteerError):
        bootstrap_ci([1.0, 2.0], method="bogus")


def test_paired_custom_stat_equals_default_path_and_gets_index_arrays():
    """The custom-stat path resamples the same items as the default one: same CI, same p-value."""
    rng = np.random.default_rng(7)
    a = rng.normal(size=40)
    b = a + 0.05 + rng.normal(scale=0.3, size=40)  # a small shift: the p-value is neither floored nor capped
    seen = []

    def stat(idx, which):
        seen.append((idx.dtype.kind, idx.shape))
        return float((a if which == 0 else b)[idx].mean())

    ref = paired_bootstrap(a, b, n_boot=400, seed=3)
    got = paired_bootstrap(stat=stat, n=40, n_boot=400, seed=3)
    assert 0.01 < ref.p_value < 0.99
    assert got.p_value == pytest.approx(ref.p_value, abs=1e-12)
    assert got.diff.low == pytest.approx(ref.diff.low) and got.diff.high == pytest.approx(ref.diff.high)
    assert got.baseline == pytest.approx(a.mean()) and got.value == pytest.approx(b.mean())
    assert set(seen) == {("i", (40,))}  # every call gets an integer index array of n items


def test_paired_p_value_is_seeded():
    rng = np.random.default_rng(8)
    a = rng.normal(size=30)
    b = a + rng.normal(scale=0.5, size=30)
    p = {paired_bootstrap(a, b, n_boot=500, seed=5).p_value for _ in range(3)}
    assert len(p) == 1 and 0.02 < p.pop() < 1.0
    stat = lambda idx, w: float((a if w == 0 else b)[idx].mean())  # noqa: E731
    q = {paired_bootstrap(stat=stat, n=30, n_boot=500, seed=5).p_value for _ in range(3)}
    assert len(q) == 1


def test_paired_errors_name_the_sample_and_as_dict_keys():
    with pytest.raises(SafesteerError, match="empty baseline"):
        paired_bootstrap([], [1.0])
    with pytest.raises(SafesteerError, match="empty steered sample"):
        paired_bootstrap([1.0], [])
    with pytest.raises(SafesteerError, match="steered sample contains NaN"):
        paired_bootstrap([1.0], [float("nan")])
    res = paired_bootstrap([0.0, 1.0, 1.0], [1.0, 1.0, 1.0], n_boot=50)
    d = res.as_dict()
    assert set(d) == {"baseline", "value", "diff", "p_value"}
    assert d["baseline"] == res.baseline and d["value"] == res.value and d["p_value"] == res.p_value
    assert d["diff"]["estimate"] == pytest.approx(1 / 3)


def test_coverage_simulation_counts_exactly():
    """A CI that can never cover the stated mean has coverage exactly 0; the same seed gives the same
    share."""
    far = coverage_simulation(lambda rng, n: rng.normal(size=n), true_mean=100.0, n=10, reps=20, n_boot=50)
    assert far == 0.0
    a = coverage_simulation(
        lambda rng, n: rng.normal(size=n), true_mean=0.0, n=10, reps=20, n_boot=50, seed=3
    )
    assert a == coverage_simulation(
        lambda rng, n: rng.normal(size=n), true_mean=0.0, n=10, reps=20, n_boot=50, seed=3
    )


def _bca_reference(x, rows, level):
    """Efron's BCa interval written out in float64 from the resamples actually drawn (rows)."""
    from scipy.stats import norm

    theta = x.mean()
    boots = np.array([x[r].mean() for r in rows])
    prop = (np.sum(boots < theta) + 0.5 * np.sum(boots == theta)) / boots.size
    z0 = norm.ppf(prop)
    jack = np.array([np.delete(x, i).mean() for i in range(x.size)])
    d = jack.mean() - jack
    a = np.sum(d**3) / (6.0 * np.sum(d**2) ** 1.5)
    alpha = (1 - level) / 2
    q = [norm.cdf(z0 + (z0 + z) / (1 - a * (z0 + z))) for z in (norm.ppf(alpha), norm.ppf(1 - alpha))]
    return np.quantile(boots, q), boots


@pytest.mark.parametrize("level", [0.9, 0.95])
def test_bca_equals_efron_formula_and_scipy(level):
    """BCa on a skewed sample: exactly the textbook formula on the drawn resamples, and close to scipy's."""
    from scipy.stats import bootstrap

    x = np.random.default_rng(21).exponential(size=25) ** 2  # strongly skewed: a != 0, z0 != 0
    rows = []
    got = bootstrap_ci(
        stat=lambda idx: (rows.append(idx.copy()), float(x[idx].mean()))[1],
        n=x.size,
        n_boot=1500,
        level=level,
        method="bca",
        seed=4,
    )
    rows = rows[1:1501]  # the first call is θ̂ on all items, then the 1500 resamples, then the jackknife
    (lo, hi), boots = _bca_reference(x, rows, level)
    assert got.low == pytest.approx(lo, rel=1e-12) and got.high == pytest.approx(hi, rel=1e-12)
    assert got.se == pytest.approx(np.std(boots, ddof=1), rel=1e-12) and got.n == 25 and got.method == "bca"
    mean_path = bootstrap_ci(x, n_boot=1500, level=level, method="bca", seed=4)
    assert mean_path.low == pytest.approx(lo, rel=1e-9) and mean_path.high == pytest.approx(hi, rel=1e-9)
    sp = bootstrap((x,), np.mean, n_resamples=20000, confidence_level=level, method="BCa", random_state=0)
    big = bootstrap_ci(x, n_boot=20000, level=level, method="bca", seed=4)  # Monte Carlo error ~1 %
    assert big.low == pytest.approx(sp.confidence_interval.low, rel=0.03)
    assert big.high == pytest.approx(sp.confidence_interval.high, rel=0.03)
    pct = bootstrap_ci(x, n_boot=1500, level=level, seed=4)
    np.testing.assert_allclose(
        [pct.low, pct.high], np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]), rtol=1e-12
    )
    assert got.high > pct.high  # right skew moves the BCa interval up


def test_every_item_can_be_resampled_and_level_bounds():
    ci = bootstrap_ci([0.0, 1.0], n_boot=2000, level=0.99, seed=0)
    assert ci.low == 0.0 and ci.high == 1.0  # all-zeros and all-ones resamples both occur
    for bad in (0.0, 1.0):
        with pytest.raises(SafesteerError, match=r"CI level must be in \(0, 1\)"):
            bootstrap_ci([1.0, 2.0], level=bad)
    with pytest.raises(SafesteerError, match="cannot bootstrap zero items"):
        bootstrap_ci(stat=lambda idx: 0.0, n=0)
    one = bootstrap_ci(stat=lambda idx: float(idx.size), n=1, n_boot=10, method="bca")
    assert one.estimate == 1.0 and one.low == 1.0


def test_bca_on_tied_samples_counts_ties_half_and_falls_back_when_degenerate():
    """Discrete data: many resamples equal θ̂ exactly, so the tie rule of z0 matters (Efron's
    share below θ̂ with ties counted half); a statistic no resample reaches (θ̂ above every
    resample: prop = 1) falls back to the percentile interval instead of an infinite z0."""
    x = np.array([0.0] * 6 + [1.0] * 4)
    rows = []
    got = bootstrap_ci(
        stat=lambda idx: (rows.append(idx.copy()), float(x[idx].mean()))[1],
        n=x.size,
        n_boot=800,
        level=0.9,
        method="bca",
        seed=2,
    )
    rows = rows[1:801]
    (lo, hi), boots = _bca_reference(x, rows, 0.9)
    assert np.sum(boots == x.mean()) > 100  # the ties are really there
    assert got.low == pytest.approx(lo, rel=1e-12) and got.high == pytest.approx(hi, rel=1e-12)
    distinct = bootstrap_ci(
        stat=lambda idx: float(len(np.unique(idx))), n=12, n_boot=500, level=0.9, method="bca", seed=0
    )
    pct = bootstrap_ci(stat=lambda idx: float(len(np.unique(idx))), n=12, n_boot=500, level=0.9, seed=0)
    assert distinct.estimate == 12.0 and np.isfinite([distinct.low, distinct.high]).all()
    assert (distinct.low, distinct.high) == (pct.low, pct.high)
