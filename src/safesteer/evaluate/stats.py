"""Bootstrap confidence intervals and paired comparisons (seeded, vectorised).

* :func:`bootstrap_ci` — percentile or BCa (Efron 1987) interval of a statistic of one sample.
  The default statistic is the mean (vectorised over all resamples); any ``stat(idx) -> float``
  over resampled *indices* is accepted (e.g. StereoSet's per-target macro averages).
* :func:`paired_bootstrap` — interval of ``stat(steered) − stat(baseline)`` where both are
  resampled with the **same** indices (the items are paired: same prompt with and without
  steering), plus a two-sided bootstrap p-value for "no difference".

Everything takes a ``seed``; the same seed gives the same interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.stats import norm

from safesteer.errors import SafesteerError

METHODS = ("percentile", "bca")
DEFAULT_N_BOOT = 2000


@dataclass(frozen=True)
class CI:
    """A point estimate with a bootstrap interval."""

    estimate: float
    low: float
    high: float
    se: float
    n: int
    level: float = 0.95
    method: str = "percentile"

    def covers(self, value: float) -> bool:
        return self.low <= value <= self.high

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PairedDiff:
    """``stat(b) − stat(a)`` over paired items, with its bootstrap interval and p-value."""

    baseline: float
    value: float
    diff: CI
    p_value: float

    def as_dict(self) -> dict:
        return {
            "baseline": self.baseline,
            "value": self.value,
            "diff": self.diff.as_dict(),
            "p_value": self.p_value,
        }


def _check(x: Sequence[float] | np.ndarray, what: str = "sample") -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise SafesteerError(f"cannot bootstrap an empty {what}")
    if not np.all(np.isfinite(arr)):
        raise SafesteerError(f"{what} contains NaN or infinite values; drop them before bootstrapping")
    return arr


def _indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(
    theta: float, boots: np.ndarray, jack: np.ndarray | None, level: float, method: str
) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    boots = boots[np.isfinite(boots)]
    if boots.size == 0:
        return float("nan"), float("nan")
    if method == "percentile" or jack is None:
        lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
        return float(lo), float(hi)
    # BCa: bias correction z0 from the share of resamples below θ̂ (ties count half), acceleration
    # from the jackknife skewness.
    prop = (np.sum(boots < theta) + 0.5 * np.sum(boots == theta)) / boots.size
    if prop <= 0.0 or prop >= 1.0:  # degenerate (e.g. constant sample): fall back to percentiles
        lo, hi = np.quantile(boots, [alpha, 1.0 - alpha])
        return float(lo), float(hi)
    z0 = norm.ppf(prop)
    d = jack.mean() - jack
    den = 6.0 * (np.sum(d**2) ** 1.5)
    a = float(np.sum(d**3) / den) if den > 0 else 0.0
    qs = []
    for z in (norm.ppf(alpha), norm.ppf(1.0 - alpha)):
        adj = z0 + (z0 + z) / (1.0 - a * (z0 + z))
        qs.append(float(norm.cdf(adj)))
    lo, hi = np.quantile(boots, qs)
    return float(lo), float(hi)


def _jackknife_mean(x: np.ndarray) -> np.ndarray:
    n = x.size
    if n < 2:
        return np.array([x.mean()])
    return (x.sum() - x) / (n - 1)


def _jackknife_stat(stat: Callable[[np.ndarray], float], n: int) -> np.ndarray:
    all_idx = np.arange(n)
    return np.array([stat(np.delete(all_idx, i)) for i in range(n)], dtype=np.float64)


def bootstrap_ci(
    x: Sequence[float] | np.ndarray | None = None,
    stat: Callable[[np.ndarray], float] | None = None,
    n: int | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    method: str = "percentile",
    seed: int = 0,
) -> CI:
    """Bootstrap interval of the mean of ``x``, or of ``stat(idx)`` over ``n`` items.

    Either pass ``x`` (statistic = mean, vectorised) or ``stat`` + ``n`` where ``stat`` maps an
    array of item indices (a resample) to a float.
    """
    if method not in METHODS:
        raise SafesteerError(f"unknown CI method '{method}'; valid choices: {', '.join(METHODS)}")
    if not 0.0 < level < 1.0:
        raise SafesteerError(f"CI level must be in (0, 1), got {level}")
    if stat is None:
        arr = _check(x)
        size = arr.size
        theta = float(arr.mean())
        idx = _indices(size, n_boot, seed)
        boots = arr[idx].mean(axis=1)
        jack = _jackknife_mean(arr) if method == "bca" else None
    else:
        if n is None:
            if x is None:
                raise SafesteerError("bootstrap_ci with a custom stat needs n (the number of items)")
            n = len(x)  # type: ignore[arg-type]
        size = int(n)
        if size == 0:
            raise SafesteerError("cannot bootstrap zero items")
        theta = float(stat(np.arange(size)))
        idx = _indices(size, n_boot, seed)
        boots = np.array([stat(row) for row in idx], dtype=np.float64)
        jack = _jackknife_stat(stat, size) if method == "bca" and size >= 2 else None
    lo, hi = _interval(theta, boots, jack, level, method)
    se = float(np.std(boots[np.isfinite(boots)], ddof=1)) if boots.size > 1 else float("nan")
    return CI(theta, lo, hi, se, size, level, method)


def paired_bootstrap(
    baseline: Sequence[float] | np.ndarray | None = None,
    steered: Sequence[float] | np.ndarray | None = None,
    stat: Callable[[np.ndarray, np.ndarray], float] | None = None,
    n: int | None = None,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    method: str = "percentile",
    seed: int = 0,
) -> PairedDiff:
    """Interval of ``stat(steered) − stat(baseline)`` with shared resampling indices.

    Default: mean of per-item differences (``steered − baseline`` must have equal length). With
    ``stat(idx, which)`` (``which`` is 0 for baseline, 1 for steered) any paired statistic works.
    The p-value is two-sided: 2·min(P*(Δ ≤ 0), P*(Δ ≥ 0)), floored at 1/n_boot.
    """
    if stat is None:
        a, b = _check(baseline, "baseline"), _check(steered, "steered sample")
        if a.shape != b.shape:
            raise SafesteerError(
                f"paired samples differ in length ({a.size} vs {b.size}); score the same items"
            )
        d = b - a
        ci = bootstrap_ci(d, n_boot=n_boot, level=level, method=method, seed=seed)
        boots = d[_indices(d.size, n_boot, seed)].mean(axis=1)
        base_v, val_v = float(a.mean()), float(b.mean())
    else:
        if n is None:
            raise SafesteerError("paired_bootstrap with a custom stat needs n")
        diff_stat = lambda idx: stat(idx, 1) - stat(idx, 0)  # noqa: E731
        ci = bootstrap_ci(stat=diff_stat, n=n, n_boot=n_boot, level=level, method=method, seed=seed)
        boots = np.array([diff_stat(row) for row in _indices(int(n), n_boot, seed)])
        all_idx = np.arange(int(n))
        base_v, val_v = float(stat(all_idx, 0)), float(stat(all_idx, 1))
    return PairedDiff(base_v, val_v, ci, bootstrap_p_value(boots))


def coverage_simulation(
    sampler: Callable[[np.random.Generator, int], np.ndarray],
    true_mean: float,
    n: int,
    reps: int = 400,
    n_boot: int = 1000,
    level: float = 0.95,
    method: str = "percentile",
    seed: int = 0,
) -> float:
    """Share of ``reps`` simulated samples whose bootstrap CI covers ``true_mean``."""
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(reps):
        x = sampler(rng, n)
        ci = bootstrap_ci(x, n_boot=n_boot, level=level, method=method, seed=int(rng.integers(2**31)))
        hits += ci.covers(true_mean)
    return hits / reps


def fmt_ci(ci: CI, digits: int = 3) -> str:
    """``0.123 [0.100, 0.150]``."""
    if math.isnan(ci.low):
        return f"{ci.estimate:.{digits}f}"
    return f"{ci.estimate:.{digits}f} [{ci.low:.{digits}f}, {ci.high:.{digits}f}]"


def ensemble_bootstrap(
    stats: Sequence[Callable[[np.ndarray], float]],
    n: int,
    n_boot: int = DEFAULT_N_BOOT,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[CI, np.ndarray]:
    """Two-level percentile bootstrap for an ensemble (e.g. K random directions) scored on ``n`` items.

    ``stats[k](idx)`` is member k's statistic on the item resample ``idx``. Each replicate draws K
    members with replacement *and* n items with replacement and averages the members' statistics,
    so the interval reflects both which items were scored and which directions were drawn.
    Returns the CI and the replicate values (for p-values).
    """
    K = len(stats)
    if K == 0 or n <= 0:
        raise SafesteerError("ensemble bootstrap needs at least one member and one item")
    rng = np.random.default_rng(seed)
    all_idx = np.arange(n)
    theta = float(np.mean([s(all_idx) for s in stats]))
    boots = np.empty(n_boot)
    for b in range(n_boot):
        kk = rng.integers(0, K, size=K)
        ii = rng.integers(0, n, size=n)
        boots[b] = np.mean([stats[k](ii) for k in kk])
    lo, hi = _interval(theta, boots, None, level, "percentile")
    se = float(np.std(boots, ddof=1)) if n_boot > 1 else float("nan")
    return CI(theta, lo, hi, se, int(n), level, "percentile-2level"), boots


def bootstrap_p_value(boots: np.ndarray) -> float:
    """Two-sided p-value for 'no difference' from bootstrap replicates of a difference."""
    boots = np.asarray(boots, dtype=np.float64)
    if np.all(boots == 0.0):
        return 1.0
    p = 2.0 * min(np.mean(boots <= 0.0), np.mean(boots >= 0.0))
    return float(min(1.0, max(p, 1.0 / boots.size)))


def format_ci(value: float, low: float, high: float, signed: bool = False) -> str:
    """``value [low, high]`` to 4 decimals (``signed``: with a leading +/−, for differences)."""
    f = "{:+.4f}" if signed else "{:.4f}"
    return f"{f.format(value)} [{f.format(low)}, {f.format(high)}]"
