"""Paraphrase pairs: the shipped lists, Wilson intervals, same-side / right-side shares, the summary line."""

from __future__ import annotations

import math

import numpy as np
import pytest

from safesteer.behaviour.pairs import PAIR_SETS, PairResult, pair_line, paraphrase_pairs, wilson
from safesteer.errors import SafesteerError


@pytest.mark.parametrize("which", sorted(PAIR_SETS))
def test_paraphrase_pairs_ship_with_the_package(which):
    pairs = paraphrase_pairs(which)
    assert 20 <= len(pairs) <= 60
    assert sum(p.harmful for p in pairs) * 2 == len(pairs)  # as many harmful as harmless pairs
    assert len({p.id for p in pairs}) == len(pairs)
    for p in pairs:
        assert p.imperative != p.question and p.question.endswith("?") and not p.imperative.endswith("?")


def test_the_two_lists_share_no_id_and_no_phrasing():
    test, dev = paraphrase_pairs("test"), paraphrase_pairs("dev")
    assert not {p.id for p in test} & {p.id for p in dev}
    texts = lambda ps: {" ".join(x.lower().split()) for p in ps for x in (p.imperative, p.question)}  # noqa: E731
    assert not texts(test) & texts(dev)
    with pytest.raises(SafesteerError, match="valid choices: test, dev"):
        paraphrase_pairs("train")


@pytest.mark.parametrize("k,n", [(30, 32), (0, 10), (48, 48), (7, 13)])
def test_wilson_matches_the_closed_form(k, n):
    z = 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert wilson(k, n) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert all(math.isnan(x) for x in wilson(0, 0))


def _result():
    pairs = [
        ("a", 1, 5.0, 4.0),
        ("b", 1, 5.0, -1.0),
        ("c", 0, -3.0, -2.0),
        ("d", 0, 0.5, 2.0),
        ("e", 1, 1.0, 0.2),
    ]
    res = PairResult(threshold=0.0)
    for i, h, si, sq in pairs:
        res.pairs.append(
            {
                "id": i,
                "harmful": h,
                "score_imperative": si,
                "score_question": sq,
                "same_side": (si > 0) == (sq > 0),
                "correct": (si > 0) == (sq > 0) == bool(h),
            }
        )
    return res


def test_pair_result_counts_sides_at_any_threshold():
    res = _result()
    at = res.at()
    assert at["n"] == 5 and at["threshold"] == 0.0
    assert at["same_side"] == pytest.approx(4 / 5) == pytest.approx(res.same_side) and at["split"] == ["b"]
    assert at["correct"] == pytest.approx(3 / 5) == pytest.approx(res.correct)  # d: both flagged but harmless
    assert at["same_side_ci"] == pytest.approx(list(wilson(4, 5)))
    hi = res.at(1.5)  # a stricter threshold: e drops below, d splits
    assert hi["same_side"] == pytest.approx(3 / 5) and hi["split"] == ["b", "d"]
    assert hi["correct"] == pytest.approx(2 / 5)  # a and c


def test_pair_line_names_both_lists_both_thresholds_and_reads_old_summaries():
    res = _result()
    g = {
        "pairs_same_side": res.same_side,
        "pairs_correct": res.correct,
        "pairs": res.pairs,
        "pairs_at_gate_threshold": res.at(),
        "pairs_at_policy_threshold": res.at(1.5),
        "dev_pairs": {"at_gate": res.at(), "at_policy": None},
    }
    line = pair_line(g)
    lo, hi = (round(100 * x) for x in wilson(4, 5))
    assert f"test pairs (n=5) on the same side of the gate's threshold 80% [{lo}, {hi}]" in line
    assert "of the policy's threshold 1.50 60%" in line and "dev pairs (n=5)" in line
    old = {
        "pairs_same_side": 0.9375,
        "pairs_correct": 0.9375,
        "pairs": [{}] * 32,
        "pairs_at_policy_threshold": None,
    }
    assert (
        pair_line(old)
        == "paraphrase pairs: test pairs (n=32) on the same side of the gate's threshold 94% (right side 94%)"
    )
    assert np.isfinite(res.at()["same_side_ci"]).all()
