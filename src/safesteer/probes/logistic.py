"""ℓ2 logistic probes on sentence activations H, with held-out metrics and raw-space directions.

Training standardises each feature (z = (h − μ) / σ), chooses C by stratified K-fold cross-validation
(mean held-out log-loss, the proper scoring rule) and refits on the whole training split. The
standardisation is then folded back into the weights, so a saved probe works on *raw* activations::

    logit(h) = w_z · (h − μ)/σ + b_z = (w_z/σ) · h + (b_z − Σ_j w_z,j μ_j/σ_j) = w · h + b

and the steering direction is ``w / ‖w‖`` in the raw space (DESIGN.md, "Probe direction"). The
DiffMean direction (mean of positives − mean of negatives, normalised; AxBench's strongest simple
baseline) is computed from the same training rows.

Probes are saved as ``probe.json`` (metadata, metrics) + ``probe.safetensors`` (w, b, μ, σ,
direction, diffmean) — never pickled.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from safesteer.errors import SafesteerError
from safesteer.io import atomic_path, read_json, write_json

DEFAULT_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
FORMAT_VERSION = 1


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.empty_like(x, dtype=np.float64)
    pos = x >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
    ex = np.exp(x[~pos])
    out[~pos] = ex / (1.0 + ex)
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


def diffmean_direction(H: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Unit vector μ(positives) − μ(negatives) in the raw activation space (float64, d)."""
    H = np.asarray(H, dtype=np.float64)
    y = _check_binary(y, "y")
    if y.sum() == 0 or y.sum() == len(y):
        raise SafesteerError(
            "DiffMean needs both positive and negative rows; the label has only one class here"
        )
    return _unit(H[y == 1].mean(axis=0) - H[y == 0].mean(axis=0))


def _check_binary(y: Any, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise SafesteerError(f"{name} must be a 1-D array of 0/1 labels; got shape {arr.shape}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise SafesteerError(f"{name} must contain only 0 and 1 (drop rows with missing labels first)")
    return arr.astype(np.int64)


@dataclass
class Probe:
    """A linear probe in raw activation space: ``P(y=1 | h) = σ(w·h + b)``.

    ``w`` (d) and ``b`` already include the undone standardisation; ``mean``/``scale`` are kept for
    reference. ``direction`` is ``w/‖w‖`` (points toward the positive class); ``diffmean`` the unit
    DiffMean direction from the training rows (or None).
    """

    w: np.ndarray
    b: float
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None
    diffmean: np.ndarray | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def d(self) -> int:
        return int(self.w.shape[0])

    @property
    def direction(self) -> np.ndarray:
        return _unit(np.asarray(self.w, dtype=np.float64))

    def decision_function(self, H: np.ndarray) -> np.ndarray:
        H = np.asarray(H)
        if H.ndim != 2 or H.shape[1] != self.d:
            raise SafesteerError(f"activations have shape {H.shape}; this probe expects rows × {self.d}")
        return H.astype(np.float64, copy=False) @ self.w + self.b

    def predict_proba(self, H: np.ndarray) -> np.ndarray:
        """P(positive) per row (1-D)."""
        return _sigmoid(self.decision_function(H))

    def predict(self, H: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        return (self.predict_proba(H) >= threshold).astype(np.int64)

    # ------------------------------------------------------------------ I/O
    def save(self, out_dir: str | Path) -> Path:
        """Write ``probe.json`` + ``probe.safetensors`` into ``out_dir`` (atomically); return the folder."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {
            "w": np.ascontiguousarray(self.w, dtype=np.float64),
            "b": np.array([self.b], dtype=np.float64),
            "direction": np.ascontiguousarray(self.direction, dtype=np.float64),
        }
        if self.mean is not None:
            tensors["mean"] = np.ascontiguousarray(self.mean, dtype=np.float64)
        if self.scale is not None:
            tensors["scale"] = np.ascontiguousarray(self.scale, dtype=np.float64)
        if self.diffmean is not None:
            tensors["diffmean"] = np.ascontiguousarray(self.diffmean, dtype=np.float64)
        with atomic_path(out / "probe.safetensors") as tmp:
            save_file(tensors, str(tmp))
        write_json(
            out / "probe.json",
            {
                "format": "safesteer-probe",
                "version": FORMAT_VERSION,
                "d": self.d,
                "b": float(self.b),
                "metrics": self.metrics,
                "meta": self.meta,
            },
        )
        return out


def load_probe(path: str | Path) -> Probe:
    """Load a probe saved by :meth:`Probe.save` (folder, or the ``probe.json`` inside it)."""
    p = Path(path)
    folder = p.parent if p.name == "probe.json" else p
    meta = read_json(folder / "probe.json")
    if meta.get("format") != "safesteer-probe":
        raise SafesteerError(
            f"{folder / 'probe.json'} is not a safesteer probe; point at a folder written by "
            "`safesteer probe`"
        )
    st = folder / "probe.safetensors"
    if not st.is_file():
        raise SafesteerError(f"missing file {st}; re-run `safesteer probe`")
    t = load_file(str(st))
    return Probe(
        w=t["w"],
        b=float(t["b"][0]),
        mean=t.get("mean"),
        scale=t.get("scale"),
        diffmean=t.get("diffmean"),
        metrics=meta.get("metrics", {}),
        meta=meta.get("meta", {}),
    )


# ---------------------------------------------------------------------------------------- training
def _standardise(H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = H.mean(axis=0)
    sd = H.std(axis=0)
    sd = np.where(
        sd > 1e-12 * max(1.0, float(np.abs(mu).max(initial=0.0))), sd, 1.0
    )  # constant features: leave as is
    return mu, sd


def _fit(
    Z: np.ndarray,
    y: np.ndarray,
    C: float,
    balanced: bool,
    seed: int,
    max_iter: int,
    clf=None,
    tol: float = 1e-6,
    sample_weight: np.ndarray | None = None,
):
    """Fit (or warm-start ``clf`` with a new C) an ℓ2 logistic regression (optionally row-weighted)."""
    from sklearn.exceptions import ConvergenceWarning  # sklearn: safesteer.config loads probes
    from sklearn.linear_model import LogisticRegression

    if clf is None:
        clf = LogisticRegression(
            C=C,
            class_weight="balanced" if balanced else None,
            max_iter=max_iter,
            random_state=seed,
            tol=tol,
            warm_start=True,
        )
    else:
        clf.set_params(C=C)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(Z, y, sample_weight=sample_weight)
    return clf


def fold_standardisation(
    w_z: np.ndarray, b_z: float, mean: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, float]:
    """Raw-space (w, b) of a linear model fitted on (h − mean)/scale: w = w_z/scale, b = b_z −
    w_z·(mean/scale)."""
    w_z = np.asarray(w_z, dtype=np.float64)
    return w_z / scale, float(b_z - np.dot(w_z, np.asarray(mean, dtype=np.float64) / scale))


def choose_C(
    Z: np.ndarray,
    y: np.ndarray,
    Cs: Sequence[float],
    *,
    balanced: bool,
    seed: int,
    folds: int = 5,
    max_iter: int = 2000,
    sample_weight: np.ndarray | None = None,
) -> tuple[float, dict[str, float]]:
    """C with the lowest mean held-out log-loss over stratified folds (ties → smaller C); with
    ``sample_weight`` the fits and the held-out log-loss are weighted by it."""
    from sklearn.metrics import log_loss  # sklearn: as in _fit
    from sklearn.model_selection import StratifiedKFold

    n_min = int(min(np.bincount(y, minlength=2)))
    k = min(folds, n_min)
    if len(Cs) == 1 or k < 2:
        return float(Cs[0] if len(Cs) == 1 else 1.0), {}
    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    scores: dict[float, list[float]] = {float(c): [] for c in Cs}
    for tr, va in skf.split(Z, y):
        clf = None  # warm-started along increasing C (the regularisation path)
        for c in sorted(scores):
            clf = _fit(
                Z[tr],
                y[tr],
                c,
                balanced,
                seed,
                max_iter,
                clf=clf,
                tol=1e-4,
                sample_weight=None if sample_weight is None else sample_weight[tr],
            )
            p = clf.predict_proba(Z[va])[:, 1]
            if balanced:  # score as balanced too, so the choice matches the objective
                wts = np.where(y[va] == 1, 0.5 / max(y[va].mean(), 1e-12), 0.5 / max(1 - y[va].mean(), 1e-12))
            else:
                wts = None
            if sample_weight is not None:
                wts = sample_weight[va] if wts is None else wts * sample_weight[va]
            scores[c].append(float(log_loss(y[va], p, labels=[0, 1], sample_weight=wts)))
    mean = {c: float(np.mean(v)) for c, v in scores.items()}
    best = min(sorted(mean), key=lambda c: mean[c])
    return best, {f"{c:g}": v for c, v in mean.items()}


def evaluate(probe: Probe, H: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy, AUROC (NaN with one class), F1 and the positive rate on (H, y)."""
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score  # sklearn: as in _fit

    y = _check_binary(y, "y")
    if len(y) == 0:
        return {"accuracy": float("nan"), "auroc": float("nan"), "f1": float("nan"), "n": 0}
    p = probe.predict_proba(H)
    pred = (p >= 0.5).astype(np.int64)
    auroc = float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "auroc": auroc,
        "f1": float(f1_score(y, pred, zero_division=0)),
        "n": int(len(y)),
        "positive_rate": float(y.mean()),
    }


def train_probe(
    H_train: np.ndarray,
    y_train: np.ndarray,
    H_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    *,
    balanced: bool = False,
    seed: int = 0,
    Cs: Sequence[float] = DEFAULT_CS,
    folds: int = 5,
    standardize: bool = True,
    max_iter: int = 2000,
    meta: dict[str, Any] | None = None,
    sample_weight: np.ndarray | None = None,
) -> Probe:
    """Fit an ℓ2 logistic probe; C by CV on the training rows; metrics on the held-out rows.

    ``metrics`` holds ``accuracy``, ``auroc``, ``f1`` (held-out), ``train_accuracy``, ``train_auroc``,
    ``C``, ``cv_log_loss`` (per C), ``n_train``, ``n_test``, ``balanced``. ``sample_weight`` (one
    positive weight per training row) weights the fit and the choice of C.
    """
    H_train = np.asarray(H_train, dtype=np.float64)
    y_train = _check_binary(y_train, "y_train")
    if H_train.ndim != 2 or H_train.shape[0] != len(y_train):
        raise SafesteerError(f"H_train has shape {H_train.shape} but y_train has {len(y_train)} labels")
    counts = np.bincount(y_train, minlength=2)
    if counts.min() < 2:
        raise SafesteerError(
            f"the training split has {counts[1]} positive and {counts[0]} negative rows; a probe needs "
            "at least 2 of each"
        )
    if not len(Cs):
        raise SafesteerError("Cs is empty; give at least one inverse regularisation strength")
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
        if (
            sample_weight.shape[0] != len(y_train)
            or not np.all(np.isfinite(sample_weight))
            or sample_weight.min() <= 0
        ):
            raise SafesteerError(
                f"sample_weight needs one finite positive weight per training row ({len(y_train)})"
            )
    if standardize:
        mu, sd = _standardise(H_train)
    else:
        mu, sd = np.zeros(H_train.shape[1]), np.ones(H_train.shape[1])
    Z = (H_train - mu) / sd
    C, cv = choose_C(
        Z,
        y_train,
        list(Cs),
        balanced=balanced,
        seed=seed,
        folds=folds,
        max_iter=max_iter,
        sample_weight=sample_weight,
    )
    clf = _fit(Z, y_train, C, balanced, seed, max_iter, sample_weight=sample_weight)
    w, b = fold_standardisation(clf.coef_[0], float(clf.intercept_[0]), mu, sd)
    probe = Probe(
        w=w,
        b=b,
        mean=mu if standardize else None,
        scale=sd if standardize else None,
        diffmean=diffmean_direction(H_train, y_train),
        meta=dict(meta or {}),
    )
    tr = evaluate(probe, H_train, y_train)
    metrics: dict[str, Any] = {
        "C": C,
        "cv_log_loss": cv,
        "balanced": bool(balanced),
        "standardized": bool(standardize),
        "seed": int(seed),
        "n_train": int(len(y_train)),
        "n_train_positive": int(counts[1]),
        "train_accuracy": tr["accuracy"],
        "train_auroc": tr["auroc"],
    }
    if H_test is not None and y_test is not None and len(y_test):
        te = evaluate(probe, np.asarray(H_test), y_test)
        metrics.update(
            {
                "accuracy": te["accuracy"],
                "auroc": te["auroc"],
                "f1": te["f1"],
                "n_test": te["n"],
                "n_test_positive": int(np.asarray(y_test).sum()),
            }
        )
        dm = Probe(w=probe.diffmean, b=0.0)
        try:
            from sklearn.metrics import roc_auc_score  # sklearn: as in _fit

            yt = _check_binary(y_test, "y_test")
            metrics["diffmean_auroc"] = (
                float(roc_auc_score(yt, dm.decision_function(np.asarray(H_test))))
                if 0 < yt.sum() < len(yt)
                else float("nan")
            )
        except ValueError:
            metrics["diffmean_auroc"] = float("nan")
    else:
        metrics.update({"accuracy": float("nan"), "auroc": float("nan"), "f1": float("nan"), "n_test": 0})
    metrics["cos_probe_diffmean"] = float(np.dot(probe.direction, probe.diffmean))
    probe.metrics = metrics
    return probe
