"""Atom selection: top-k, all-positive, and the filtered pipeline with injected judge/screen/embedder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_cartography_dedup import bag_of_words

from safesteer.cartography.judges import UNSAFE_FLAG, JudgeResult, ScreenResult
from safesteer.cartography.select import (
    FINAL_COLUMNS,
    category_candidates,
    final_table,
    select_all_positive,
    select_filtered,
    select_topk,
)
from safesteer.errors import SafesteerError


def _map(n_atoms=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for label, cat in [
        ("toxicity", "toxicity"),
        ("harmfulness", "harm"),
        ("emotion:joy", "emotion"),
        ("empathy:afraid", "empathy"),
        ("identity:women", "identity"),
    ]:
        r = rng.uniform(-0.5, 0.5, n_atoms)
        dmu = r * 2 + rng.normal(0, 0.05, n_atoms)
        rows.append(
            pd.DataFrame(
                {
                    "atom": np.arange(n_atoms),
                    "label": label,
                    "category": cat,
                    "r": r,
                    "dmu": dmu,
                    "score": 0.5 * r + 0.5 * dmu / np.abs(dmu).max(),
                    "cohens_d": r * 3,
                    "freq_pos": 0.5,
                    "freq_neg": 0.2,
                    "r_heldout": r * 0.9,
                }
            )
        )
    return pd.concat(rows, ignore_index=True)


def test_topk_and_all_positive():
    m = _map()
    top = select_topk(m, "toxicity", k=5)
    sub = m[m.label == "toxicity"].sort_values("score", ascending=False)
    assert top["atom"].tolist() == sub["atom"].head(5).tolist() and top["rank"].tolist() == list(range(5))
    assert len(select_topk(m, k=20)) == 5 * 20
    pos = select_all_positive(m, ["toxicity", "emotion:joy"])
    assert (pos["dmu"] > 0).all()
    assert len(pos) == int(((m.label.isin(["toxicity", "emotion:joy"])) & (m.dmu > 0)).sum())
    with pytest.raises(SafesteerError, match="not in the atom map"):
        select_topk(m, "nope")
    with pytest.raises(SafesteerError):
        select_topk(m, k=0)


def test_candidates_per_macro_category():
    c = category_candidates(_map(), candidates=4)
    assert set(c.category) == {
        "toxicity",
        "harm",
        "emotion",
        "empathy",
    }  # identity is not a steering category
    assert c.groupby("category").size().max() <= 4 and (c.score > 0).all()
    assert "concept" in c.columns


class FakeJudge:
    name = "fake"

    def judge(self, card, concept):
        a = card["atom"]
        return JudgeResult(
            ["GENUINE", "GENUINE", "CONTEXT", "NOISE"][a % 4], f"label {a % 3}", f"reason {a % 3}"
        )


class FakeScreen:
    readouts = {"toxicity": None, "harmfulness": None, "emotion:joy": None, "empathy:afraid": None}

    def screen_one(self, atom, label, r, r_heldout, direction, max_act=None):
        wrong = atom % 8 == 1
        flag = f"{UNSAFE_FLAG}: test" if wrong else ""
        return ScreenResult(
            atom,
            label,
            1,
            r,
            r_heldout,
            True,
            -0.1 if wrong else 0.1,
            -1.0 if wrong else 1.0,
            not wrong,
            flag,
        )


def test_filtered_pipeline():
    m = _map()

    def cards(atoms):
        return {a: {"atom": a, "tokens": [f"tok{a % 3}"], "top_texts": [], "labels": []} for a in atoms}

    W = np.eye(40, 8)
    res = select_filtered(
        m, cards=cards, judge=FakeJudge(), screen=FakeScreen(), W_dec=W, embedder=bag_of_words, candidates=6
    )
    assert list(res.columns[: len(FINAL_COLUMNS)]) == FINAL_COLUMNS
    assert res["atom"].is_unique
    judged_out = res[~res.verdict.isin(["GENUINE"])]
    assert (~judged_out.selected).all() and judged_out.flag.str.startswith("judge:").all()
    unsafe = res[res.flag.str.startswith(UNSAFE_FLAG)]
    assert len(unsafe) and (~unsafe.selected).all() and (unsafe.atom % 8 == 1).all()
    final = final_table(res)
    assert (
        final.selected.all() and (final.verdict == "GENUINE").all() and final.screen_pass.astype(bool).all()
    )
    # same label+reason+tokens (a % 3) ⇒ duplicates: one atom per description cluster, the best score
    assert final["cluster"].is_unique
    for _, grp in res[res.cluster >= 0].groupby("cluster"):
        best = grp.sort_values("score", ascending=False).iloc[0]
        assert bool(best.selected) and grp.selected.sum() == 1


def test_filtered_without_judge_or_screen_keeps_candidates():
    res = select_filtered(_map(), candidates=3)
    assert (res.verdict == "UNJUDGED").all() and res.selected.all()
    with pytest.raises(SafesteerError, match="decoder"):
        select_filtered(_map(), screen=FakeScreen(), candidates=3)
