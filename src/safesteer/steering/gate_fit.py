"""The MLP gate's fit (:class:`~safesteer.steering.gates.MLPGate`): an average of seeded
one-hidden-layer ReLU MLPs of scikit-learn, class-balanced, the members fitted in worker processes
with single-threaded BLAS (:func:`~safesteer.workers.parallel_map`: the same bits for any core count).
"""

from __future__ import annotations

import warnings

import numpy as np

from safesteer.errors import SafesteerError
from safesteer.workers import parallel_map


def _fit_member(
    Z: np.ndarray, y: np.ndarray, sw: np.ndarray, hidden: int, alpha: float, max_iter: int, seed: int
):
    from sklearn.exceptions import ConvergenceWarning  # sklearn: only when an MLP gate is fit
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier((hidden,), alpha=alpha, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(Z, y, sample_weight=sw)
    return clf.coefs_, clf.intercepts_


def fit_mlp(
    H: np.ndarray,
    y: np.ndarray,
    hidden: int = 128,
    members: int = 5,
    alpha: float = 1.0,
    seed: int = 0,
    weight: np.ndarray | None = None,
    max_iter: int = 200,
    jobs: int | None = None,
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """An average of ``members`` one-hidden-layer ReLU MLPs (scikit-learn, seeds ``seed…``), class-
    balanced, on standardised ``H``; returned in raw space as ``(w, b, W1, b1)`` of
    ``score(h) = w·relu(W1 h + b1) + b`` — the mean of the members' logits, their hidden units side
    by side, the standardisation folded into ``W1`` / ``b1``. The members train in parallel
    (:func:`parallel_map`, ``jobs`` processes; 1 = in this process)."""
    if hidden < 1 or members < 1:
        raise SafesteerError(f"an MLP gate needs hidden >= 1 and members >= 1, got {hidden} and {members}")
    H = np.asarray(H, dtype=np.float64)
    y = np.asarray(y).astype(np.int64)
    if len(np.unique(y)) < 2:
        raise SafesteerError(
            "the gate's training rows hold one class only; it needs harmful and harmless prompts"
        )
    mu, sd = H.mean(0), H.std(0)
    sd[sd < 1e-12] = 1.0
    Z = (H - mu) / sd
    from sklearn.utils.class_weight import compute_sample_weight  # sklearn: as above

    sw = compute_sample_weight("balanced", y) * (
        1.0 if weight is None else np.asarray(weight, dtype=np.float64)
    )
    W1s, b1s, ws, bs = [], [], [], []
    fitted = parallel_map(
        _fit_member, [(Z, y, sw, hidden, alpha, max_iter, seed + i) for i in range(members)], jobs
    )
    for coefs, intercepts in fitted:
        A, a = coefs[0] / sd[:, None], intercepts[0]  # (d × k), (k,) in raw space
        W1s.append(A.T)
        b1s.append(a - mu @ A)
        ws.append(coefs[1][:, 0] / members)
        bs.append(float(intercepts[1][0]) / members)
    return np.concatenate(ws), float(sum(bs)), np.concatenate(W1s), np.concatenate(b1s)
