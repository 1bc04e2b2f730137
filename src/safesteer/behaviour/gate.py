"""The harm gate: a standardised logistic probe or an average of small MLPs (:func:`fit_mlp`) on the
prompts of :mod:`safesteer.behaviour.prompts` at ``prompt`` / ``prompt_end`` of a middle layer
(or any registered gate kind, :mod:`safesteer.steering.gates`, each fitted by its kind's one
``fit``); fitting, cross-fitted calibration scores, and the held-out, leave-one-dataset-out metrics
(paraphrase pairs: :mod:`safesteer.behaviour.pairs`).
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import numpy as np

from safesteer.behaviour.prompts import Prompts
from safesteer.errors import SafesteerError
from safesteer.steering.condition import DEFAULT_FPR, Condition, threshold_for_fpr
from safesteer.steering.gate_fit import fit_mlp  # noqa: F401  (its old import path)
from safesteer.steering.gates import gate_kind, kind_of
from safesteer.steering.segments import segment_max
from safesteer.workers import parallel_map

# ------------------------------------------------------------------------------------------- training
WEIGHTINGS = ("balanced", "groups")


def row_weights(prompts: Prompts, m: np.ndarray, weighting: str = "groups") -> np.ndarray | None:
    """Per-row training weights of the rows ``m`` (on top of class balancing): ``balanced`` → None
    (every row counts the same within its class); ``groups`` → every dataset of a class carries the
    same total weight (mean 1 within each class), so a large source cannot dominate the direction."""
    if weighting not in WEIGHTINGS:
        raise SafesteerError(f"gate weighting '{weighting}' unknown; valid choices: {', '.join(WEIGHTINGS)}")
    if weighting == "balanced":
        return None
    g, y = np.asarray(prompts.group)[m], prompts.harmful[m]
    w = np.ones(len(y))
    for c in (0, 1):
        inc = y == c
        names = np.unique(g[inc])
        for name in names:
            mm = inc & (g == name)
            w[mm] = inc.sum() / (len(names) * mm.sum())
    return w


def _fit(
    H: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray | None,
    meta: Mapping[str, Any],
    seed: int,
    jobs: int | None = None,
    kind: type | None = None,
) -> Condition:
    """A gate of the kind ``meta`` records (:func:`~safesteer.steering.gates.kind_of`; its settings,
    e.g. a linear gate's ``C``, an MLP's ``hidden``), refitted through the registry; threshold 0.
    ``kind``: that kind's class, when the caller looked it up (a worker process is sent the class,
    so a kind registered at run time refits there too)."""
    kind = kind or gate_kind(kind_of(meta))
    fitted = kind.fit(H, y, weight, seed, kind.refit_options(meta), jobs=jobs)
    return Condition.of(fitted.gate, _layers_of(fitted.gate), "prompt_end")


def _layers_of(gate: Any) -> tuple[int, ...]:
    """Placeholder layers for a gate fitted off any backbone (as many as it reads)."""
    return tuple(range(gate.n_layers))


def train_gate(
    H: np.ndarray,
    prompts: Prompts,
    layer: int | Sequence[int],
    position: str = "prompt_end",
    target_fpr: float = DEFAULT_FPR,
    Cs: Sequence[float] = (1e-2, 1e-1),
    seed: int = 0,
    name: str = "harm_gate",
    weighting: str = "balanced",
    hidden: int = 0,
    members: int = 5,
    mlp_alpha: float = 1.0,
    kind: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Condition:
    """Standardised, class-balanced ℓ2 logistic probe on the train rows (``weighting="groups"``:
    each dataset weighted equally within its class, :func:`row_weights`), or with ``hidden`` > 0 an
    average of ``members`` ReLU MLPs (:func:`fit_mlp`, ℓ2 ``mlp_alpha``); threshold at ``target_fpr``
    on the harmless *val* rows; held-out metrics on the test rows in ``meta``.

    ``kind`` picks a registered gate kind by name (:mod:`safesteer.steering.gates`; default
    ``mlp`` when ``hidden`` > 0, else ``linear``), ``options`` adds to its fit options. A gate
    reading several layers (``stacked``) takes ``layer`` = those layers and ``H`` = their pooled
    vectors side by side (:func:`~safesteer.steering.gates.stack_features`)."""
    layers = (int(layer),) if isinstance(layer, (int, np.integer)) else tuple(int(l) for l in layer)
    kind_cls = gate_kind(kind or ("mlp" if hidden else "linear"))
    opts: dict[str, Any] = {
        "Cs": list(Cs),
        "folds": 3,
        "hidden": int(hidden),
        "members": int(members),
        "mlp_alpha": float(mlp_alpha),
        "n_layers": len(layers),
        **(options or {}),
    }
    tr, va, te = (prompts.mask(s) for s in ("train", "val", "test"))
    weight = row_weights(prompts, tr, weighting)
    fitted = kind_cls.fit(
        H[tr], prompts.harmful[tr], weight, seed, opts, held_out=(H[te], prompts.harmful[te])
    )
    cond = Condition.of(fitted.gate, layers, position, 0.0, name, dict(fitted.meta))
    meta = dict(fitted.settings)
    meta["test_auroc"] = (
        fitted.held_out_auroc
        if fitted.held_out_auroc is not None
        else auroc(cond.score(H[te]), prompts.harmful[te])
    )
    neg_val = va & (prompts.harmful == 0)
    cond.threshold = threshold_for_fpr(cond.score(H[neg_val]), target_fpr)
    cond.meta.update(
        {
            "target_fpr": target_fpr,
            "weighting": weighting,
            **meta,
            "n_train": int(tr.sum()),
            "trained_on": sorted(set(prompts.group)),
        }
    )
    return cond


def cross_fit_scores(
    cond: Condition,
    H: np.ndarray,
    prompts: Prompts,
    folds: int = 5,
    seed: int = 0,
    jobs: int | None = None,
    pieces: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Gate scores usable for calibration on *every* non-augmented train and val row: val (and
    test) rows scored by ``cond`` itself; each original train row by a gate fitted on the other
    ``folds − 1`` hash folds of the train rows (same kind, C or MLP settings, weighting,
    standardisation). An augmented copy sits in its original's fold (``Prompts.origin``), so the
    fold gates train on reframed copies as the deployed gate does — and never on a copy of a row
    they score; copies of unknown origin are left out. Augmented rows: NaN. ``folds=0``: train
    rows NaN too. ``pieces`` = (their vectors, the row each came from): a segmented gate's scores,
    each row's the largest of its own and its pieces' by the same gate
    (:mod:`safesteer.steering.segments`)."""
    PH, owner = pieces if pieces is not None else (np.zeros((0, H.shape[1])), np.zeros(0, np.int64))
    out = segment_max(cond.score(H), cond.score(PH) if len(PH) else np.zeros(0), owner)
    tr = prompts.mask("train")
    orig = tr & ~prompts.aug
    out[tr] = np.nan
    if folds < 2:
        return out
    fold = np.array(
        [
            int.from_bytes(hashlib.sha256(f"safesteer-fold|{t}".encode()).digest()[:4], "big") % folds
            for t in prompts.text
        ]
    )
    copy = tr & prompts.aug
    known = copy & (prompts.origin >= 0)
    fold[copy] = -1
    fold[known] = fold[prompts.origin[known]]
    weighting = str(cond.meta.get("weighting", "balanced"))
    kind = gate_kind(kind_of(cond.meta))
    folds_held = [(tr & (fold >= 0) & (fold != f), orig & (fold == f)) for f in range(folds)]
    folds_held = [(fit, held) for fit, held in folds_held if held.any()]
    scored = parallel_map(
        _fit_score,
        [
            (
                H[fit],
                prompts.harmful[fit],
                row_weights(prompts, fit, weighting),
                cond.meta,
                seed,
                np.vstack([H[held], PH[held[owner]]]),
                kind,
            )
            for fit, held in folds_held
        ],
        jobs,
    )
    for (_, held), s in zip(folds_held, scored):
        n_held = int(held.sum())
        at = np.cumsum(held) - 1  # a held row's place among the held rows
        out[held] = segment_max(s[:n_held], s[n_held:], at[owner[held[owner]]])
    return out


def _fit_score(
    H: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray | None,
    meta: Mapping[str, Any],
    seed: int,
    X: np.ndarray,
    kind: type | None = None,
) -> np.ndarray:
    """Scores of ``X`` by a gate fitted on ``H`` (one worker's job: its MLP members in this process)."""
    return _fit(H, y, weight, meta, seed, jobs=1, kind=kind).score(X)


def auroc(scores: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score  # sklearn: heavy, only when scoring

    y = np.asarray(y)
    return float(roc_auc_score(y, scores)) if 0 < y.sum() < len(y) else float("nan")


def gate_report(cond: Condition, H: np.ndarray, prompts: Prompts) -> dict[str, Any]:
    """Held-out (test split) AUROC overall and per dataset (vs the other class's test rows), and the
    flag rate of every dataset's test rows at the gate's threshold."""
    te = prompts.mask("test")
    s = cond.score(H)
    out: dict[str, Any] = {"test_auroc": auroc(s[te], prompts.harmful[te]), "per_dataset": {}}
    for g in dict.fromkeys(prompts.group):
        m = te & prompts.mask(group=g)
        flag = int(prompts.harmful[m][0]) if m.any() else 1
        other = te & (prompts.harmful == 1 - flag)
        both = m | other
        out["per_dataset"][g] = {
            "harmful": flag,
            "n_test": int(m.sum()),
            "auroc": auroc(s[both], prompts.harmful[both]),
            "flag_rate": float(np.mean(s[m] > cond.threshold)) if m.any() else float("nan"),
        }
    return out


def lodo(
    H: np.ndarray,
    prompts: Prompts,
    C: float = 0.01,
    seed: int = 0,
    weighting: str = "balanced",
    model: Mapping[str, Any] | None = None,
    jobs: int | None = None,
) -> dict[str, dict[str, float]]:
    """Leave-one-dataset-out: for each dataset D, a gate trained on the train rows of all other
    datasets scores all of D's rows against the other class's test rows (AUROC). ``model``: the
    gate kind as a trained gate's ``meta`` records it (an MLP gate's ``hidden``, ``members``,
    ``mlp_alpha``); default a logistic probe with ``C``."""
    out: dict[str, dict[str, float]] = {}
    te = prompts.mask("test")
    spec = dict(model or {})
    spec.setdefault("C", C)
    kind = gate_kind(kind_of(spec))
    jobs_in: list[tuple] = []
    evs: list[tuple[str, np.ndarray, dict[str, int]]] = []
    for g in dict.fromkeys(prompts.group):
        inD = prompts.mask(group=g)
        tr = prompts.mask("train") & ~inD
        flag = int(prompts.harmful[inD][0])
        ev = (inD & ~prompts.aug) | (te & ~inD & (prompts.harmful == 1 - flag))
        jobs_in.append(
            (H[tr], prompts.harmful[tr], row_weights(prompts, tr, weighting), spec, seed, H[ev], kind)
        )
        evs.append((g, ev, {"n": int((inD & ~prompts.aug).sum()), "harmful": flag}))
    for (g, ev, info), s in zip(evs, parallel_map(_fit_score, jobs_in, jobs)):
        out[g] = {"auroc": auroc(s, prompts.harmful[ev]), **info}
    return out
