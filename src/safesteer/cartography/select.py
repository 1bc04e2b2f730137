"""Atom selection from an atom map: top-k, all-positive, and the filtered (judged + screened + de-duplicated)
set.

* :func:`select_topk` — per label, the ``k`` (default 20) atoms with the highest concept score.
* :func:`select_all_positive` — per label, every atom with Δμ > 0 (fires more on positives).
* :func:`select_filtered` — the original study's pipeline, offline:

  1. candidates: per macro-category (toxicity, harm, emotion, empathy) the top ``C`` (default 30)
     atoms by concept score over that category's labels (each atom with its best label);
  2. judge: GENUINE / CONTEXT / NOISE + granular label + reason (:mod:`.judges`); GENUINE is kept;
  3. causal screen (optional): replication on the held-out split + steering moves the concept
     read-out the expected way; wrong-way atoms are flagged ``would make the model less safe``;
  4. de-duplication of "Label: … Reasoning: … Tokens: …" descriptions (:mod:`.dedup`).

  Returns every candidate with its verdict, screen outcome, flag, cluster and a ``selected``
  column; :func:`final_table` keeps the selected rows in the ``final_steering_atoms.csv`` layout.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pandas as pd

from safesteer.cartography.dedup import deduplicate
from safesteer.cartography.judges import NoJudge, concept_text
from safesteer.errors import SafesteerError
from safesteer.probes.labels import category_of

MACRO_CATEGORIES: tuple[str, ...] = ("toxicity", "harm", "emotion", "empathy")
FINAL_COLUMNS = [
    "atom",
    "category",
    "label",
    "concept",
    "verdict",
    "reason",
    "score",
    "r",
    "dmu",
    "cohens_d",
    "freq_pos",
    "freq_neg",
    "r_heldout",
    "replicates",
    "effect",
    "effect_logit",
    "screen_pass",
    "flag",
    "cluster",
    "selected",
]


def _labels(atom_map: pd.DataFrame, labels: str | Iterable[str] | None) -> list[str]:
    have = list(dict.fromkeys(atom_map["label"].tolist()))
    if labels is None:
        return have
    wanted = [labels] if isinstance(labels, str) else list(labels)
    missing = [x for x in wanted if x not in have]
    if missing:
        raise SafesteerError(
            f"label(s) {', '.join(missing)} not in the atom map; it has: "
            f"{', '.join(have[:12])}{'…' if len(have) > 12 else ''}"
        )
    return wanted


def select_topk(
    atom_map: pd.DataFrame, labels: str | Iterable[str] | None = None, k: int = 20, by: str = "score"
) -> pd.DataFrame:
    """Top ``k`` atoms per label by ``by`` (descending), with a ``rank`` column (0 = best)."""
    if k <= 0:
        raise SafesteerError(f"k must be positive, got {k}")
    frames = []
    for lab in _labels(atom_map, labels):
        sub = (
            atom_map[atom_map["label"] == lab]
            .sort_values([by, "atom"], ascending=[False, True], kind="stable")
            .head(k)
            .copy()
        )
        sub.insert(0, "rank", np.arange(len(sub), dtype=np.int64))
        frames.append(sub)
    return pd.concat(frames, ignore_index=True) if frames else atom_map.head(0)


def select_all_positive(atom_map: pd.DataFrame, labels: str | Iterable[str] | None = None) -> pd.DataFrame:
    """Every (atom, label) with Δμ > 0, ordered by score within each label."""
    frames = []
    for lab in _labels(atom_map, labels):
        sub = (
            atom_map[(atom_map["label"] == lab) & (atom_map["dmu"] > 0)]
            .sort_values(["score", "atom"], ascending=[False, True], kind="stable")
            .copy()
        )
        sub.insert(0, "rank", np.arange(len(sub), dtype=np.int64))
        frames.append(sub)
    return pd.concat(frames, ignore_index=True) if frames else atom_map.head(0)


def category_candidates(
    atom_map: pd.DataFrame, candidates: int = 30, categories: Sequence[str] = MACRO_CATEGORIES
) -> pd.DataFrame:
    """Top ``candidates`` atoms per macro-category (best label per atom, positive scores only)."""
    if "category" not in atom_map.columns:
        atom_map = atom_map.assign(category=atom_map["label"].map(category_of))
    frames = []
    for cat in categories:
        sub = atom_map[(atom_map["category"] == cat) & (atom_map["score"] > 0)]
        if sub.empty:
            continue
        best = sub.sort_values(["score", "atom"], ascending=[False, True], kind="stable").drop_duplicates(
            "atom"
        )
        frames.append(best.head(candidates))
    if not frames:
        raise SafesteerError(
            f"no atom has a positive score for any label of the categories {', '.join(categories)}; "
            "map more data"
        )
    out = pd.concat(frames, ignore_index=True)
    return out.rename(columns={"label": "concept"})


def select_filtered(
    atom_map: pd.DataFrame,
    *,
    cards: Callable[[Sequence[int]], dict[int, dict[str, Any]]] | dict[int, dict[str, Any]] | None = None,
    judge=None,
    screen=None,
    W_dec: np.ndarray | None = None,
    embedder=None,
    candidates: int = 30,
    categories: Sequence[str] = MACRO_CATEGORIES,
    keep_verdicts: Sequence[str] = ("GENUINE",),
    threshold: float = 0.20,
    progress: Callable[[Iterable, int, str], Iterable] | None = None,
) -> pd.DataFrame:
    """Run the filtered selection; return one row per candidate (see :data:`FINAL_COLUMNS`).

    ``cards``: atom → card dict (or a callable building them for a list of atoms). ``judge``: any
    :class:`~safesteer.cartography.judges.AtomJudge` (``judge(card, concept) -> JudgeResult``; None = keep
    all, verdict UNJUDGED).
    ``screen``: a :class:`~safesteer.cartography.judges.CausalScreen` (needs ``W_dec``) or None.
    ``embedder``: texts → vectors for de-duplication (None = no de-duplication).
    """
    from safesteer.cartography.cards import describe  # cards.py imports torch; selection alone does not

    track = progress or (lambda it, n, desc: it)
    cand = category_candidates(atom_map, candidates, categories)
    # an atom can only be steered once: keep its best category/concept
    cand = (
        cand.sort_values(["score", "atom"], ascending=[False, True], kind="stable")
        .drop_duplicates("atom")
        .reset_index(drop=True)
    )
    atoms = cand["atom"].astype(int).tolist()
    card_map = cards(atoms) if callable(cards) else (cards or {})
    card_map = {int(k): v for k, v in card_map.items()}
    judge = judge or NoJudge()
    verdicts, glabels, reasons = [], [], []
    for atom, concept in track(list(zip(atoms, cand["concept"])), len(atoms), "judging atoms"):
        card = card_map.get(atom, {"atom": atom, "tokens": [], "top_texts": [], "labels": []})
        res = judge.judge(card, concept_text(concept) if judge.name != "none" else concept)
        verdicts.append(res.verdict)
        glabels.append(res.label or concept)
        reasons.append(res.reason)
    cand["verdict"] = verdicts
    cand["label"] = glabels
    cand["reason"] = reasons
    judged_ok = cand["verdict"].isin([*keep_verdicts, "UNJUDGED"]).to_numpy()

    for col, default in (
        ("replicates", pd.NA),
        ("effect", np.nan),
        ("effect_logit", np.nan),
        ("screen_pass", pd.NA),
        ("flag", ""),
    ):
        cand[col] = default
    cand["flag"] = cand["flag"].astype(object)
    if "r_heldout" not in cand.columns:
        cand["r_heldout"] = np.nan
    screened_ok = judged_ok.copy()
    if screen is not None:
        if W_dec is None:
            raise SafesteerError("causal screening needs the SAE decoder (W_dec)")
        idx = np.flatnonzero(judged_ok)
        rep, eff, effl, ok, flags = {}, {}, {}, {}, {}
        for i in track(idx.tolist(), len(idx), "screening atoms"):
            row = cand.iloc[i]
            max_act = (
                float(row["max_act"]) if "max_act" in cand.columns and pd.notna(row["max_act"]) else None
            )
            res = screen.screen_one(
                int(row["atom"]),
                row["concept"],
                float(row["r"]),
                float(row["r_heldout"]),
                np.asarray(W_dec[int(row["atom"])]),
                max_act=max_act,
            )
            rep[i], eff[i], effl[i], ok[i], flags[i] = (
                res.replicates,
                res.effect,
                res.effect_logit,
                res.passes,
                res.flag,
            )
        for i in idx:
            cand.at[i, "replicates"] = rep.get(i, pd.NA)
            cand.at[i, "effect"] = eff.get(i, np.nan)
            cand.at[i, "effect_logit"] = effl.get(i, np.nan)
            cand.at[i, "screen_pass"] = ok.get(i, False)
            cand.at[i, "flag"] = flags.get(i, "")
            screened_ok[i] = bool(ok.get(i, False))
    for i in np.flatnonzero(~judged_ok):
        cand.at[i, "flag"] = f"judge: {cand.at[i, 'verdict']}"

    cand["cluster"] = -1
    selected = screened_ok.copy()
    keep_idx = np.flatnonzero(screened_ok)
    if embedder is not None and len(keep_idx) > 1:
        sub = cand.iloc[keep_idx]
        texts = [
            describe(card_map.get(int(a), {}), lab, rea)
            for a, lab, rea in zip(sub["atom"], sub["label"], sub["reason"])
        ]
        dd = deduplicate(sub, texts, embedder, threshold=threshold, score_col="score")
        for j, i in enumerate(keep_idx):
            cand.at[i, "cluster"] = int(dd["cluster"].iloc[j])
            if not bool(dd["kept"].iloc[j]):
                selected[i] = False
                cand.at[i, "flag"] = f"duplicate of atom {int(dd['duplicate_of'].iloc[j])}"
    elif len(keep_idx):
        for c, i in enumerate(keep_idx):
            cand.at[i, "cluster"] = c
    cand["selected"] = selected
    for col in FINAL_COLUMNS:
        if col not in cand.columns:
            cand[col] = np.nan
    rest = [c for c in cand.columns if c not in FINAL_COLUMNS]
    return (
        cand[FINAL_COLUMNS + rest]
        .sort_values(["selected", "category", "score"], ascending=[False, True, False], kind="stable")
        .reset_index(drop=True)
    )


def final_table(result: pd.DataFrame) -> pd.DataFrame:
    """The selected rows in the ``final_steering_atoms.csv`` layout."""
    return result[result["selected"].astype(bool)][FINAL_COLUMNS].reset_index(drop=True)
