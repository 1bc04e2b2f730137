"""Policy choice on validation (composition, constraints, Pareto) and paired test figures."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from safesteer.behaviour.policy import (
    Candidate,
    at_each_fpr,
    candidates,
    compose,
    paired,
    pareto,
    relative_change,
    select,
    ungated,
)


def test_compose_takes_steered_where_flagged():
    assert compose([True, False, True], [1, 1, 1], [0, 0, 0]).tolist() == [1, 0, 1]


def _grid():
    # 10 harmful, 10 safe prompts; the gate flags harmful 0..8 and safe 0 (scores planted)
    base = {"harmful": np.zeros(10), "safe": np.zeros(10), "nll": np.full(10, 2.0)}
    steered = {
        ("caa", 0.1): {
            "harmful": np.r_[np.ones(5), np.zeros(5)],
            "safe": np.r_[np.ones(2), np.zeros(8)],
            "nll": np.full(10, 2.02),
        },
        ("caa", 0.2): {"harmful": np.ones(10), "safe": np.ones(10), "nll": np.full(10, 2.5)},
    }
    scores = {
        "harmful": np.r_[np.full(9, 2.0), -1.0],
        "safe": np.r_[1.5, np.full(9, -1.0)],
        "nll": np.r_[1.5, np.full(9, -1.0)],
    }
    return base, steered, scores


def test_candidates_apply_constraints_and_select_the_largest_gain():
    base, steered, scores = _grid()
    cands = candidates(base, steered, scores, {0.05: 0.0, 0.01: 1.8}, max_safe_pp=3.0, max_fluency_rel=0.02)
    assert len(cands) == 2 * 3
    u = {c.alpha: c for c in cands if not c.conditional}
    assert (
        u[0.2].harmful_gain_pp == pytest.approx(100)
        and u[0.2].safe_delta_pp == pytest.approx(100)
        and not u[0.2].feasible
    )
    assert not u[0.1].feasible  # +20 pp over-refusal
    c = {(x.alpha, x.fpr): x for x in cands if x.conditional}
    # α=0.2 at t=1.8: 9/10 harmful steered, no safe prompt flagged, fluency untouched
    assert (
        c[(0.2, 0.01)].harmful_gain_pp == pytest.approx(90)
        and c[(0.2, 0.01)].safe_delta_pp == 0
        and c[(0.2, 0.01)].feasible
    )
    assert not c[(0.2, 0.05)].feasible  # safe prompt 0 is flagged and refused: +10 pp
    best = select(cands, conditional=True)
    assert (best.alpha, best.fpr) == (0.2, 0.01)
    assert select(cands, conditional=False) is None
    # two thresholds that flag the same validation prompts tie on every figure: the stricter one wins, in any
    # order
    tie = [dataclasses.replace(best, fpr=f, threshold=t) for f, t in ((0.02, 1.0), (0.005, 2.5), (0.01, 1.8))]
    assert select(tie, conditional=True).fpr == 0.005 and select(tie[::-1], conditional=True).fpr == 0.005
    front = pareto(cands)
    assert all(
        not (o.harmful_refusal >= f.harmful_refusal and o.safe_refusal < f.safe_refusal)
        for f in front
        for o in cands
    )


def test_paired_and_relative_change_cis():
    rng = np.random.default_rng(0)
    b = (rng.random(200) < 0.1).astype(float)
    v = np.maximum(b, (rng.random(200) < 0.6).astype(float))
    d = paired(b, v)
    assert d["delta"] == pytest.approx(100 * (v.mean() - b.mean())) and d["low"] < d["delta"] < d["high"]
    assert d == paired(b, v, seed=0) and d != paired(b, v, seed=1)  # seeded, by default with seed 0
    nll = rng.uniform(1, 3, 100)
    r = relative_change(nll, nll * 1.01)
    assert (
        r["delta_pct"] == pytest.approx(1.0)
        and r["low"] == pytest.approx(1.0)
        and r["high"] == pytest.approx(1.0)
    )


def test_conditional_candidates_need_steered_values_only_where_the_loosest_threshold_flags():
    rng = np.random.default_rng(3)
    n = 60
    base = {"harmful": rng.random(n) < 0.1, "safe": rng.random(n) < 0.05, "nll": rng.uniform(1, 3, 2 * n)}
    full = {
        ("v", 0.3): {
            "harmful": rng.random(n) < 0.8,
            "safe": rng.random(n) < 0.6,
            "nll": rng.uniform(1, 6, 2 * n),
        }
    }
    scores = {"harmful": rng.normal(1, 1, n), "safe": rng.normal(-1, 1, n), "nll": rng.normal(-1, 1, 2 * n)}
    thresholds = {0.02: 1.5, 0.1: 0.4, 0.05: 0.9}
    lo = min(thresholds.values())
    # what the study holds when it steers only the flagged prompts: garbage (here: the opposite) elsewhere
    part = {
        k: np.where(scores[k] > lo, v, 1 - v if v.dtype == bool else -v) for k, v in full[("v", 0.3)].items()
    }
    a = [c for c in candidates(base, full, scores, thresholds) if c.conditional]
    b = candidates(base, {("v", 0.3): part}, scores, thresholds, unconditional=False)
    assert len(b) == len(a) == 3 and all(c.conditional for c in b)
    assert [c.as_dict() for c in a] == [c.as_dict() for c in b]
    # …whereas an unconditional candidate from the partial values would be wrong (why they are not formed)
    u = [c for c in candidates(base, {("v", 0.3): part}, scores, thresholds) if not c.conditional][0]
    assert (
        u.as_dict()
        != [c for c in candidates(base, full, scores, thresholds) if not c.conditional][0].as_dict()
    )
    g = ungated(a[0])
    assert (g.strategy, g.alpha, g.conditional, g.threshold) == ("v", 0.3, False, None) and np.isnan(
        g.harmful_refusal
    )


def test_a_score_at_the_threshold_is_not_flagged_and_fluency_alone_makes_a_candidate_infeasible():
    base = {"harmful": np.zeros(4), "safe": np.zeros(2), "nll": np.full(2, 2.0)}
    steered = {("v", 1.0): {"harmful": np.ones(4), "safe": np.zeros(2), "nll": np.array([2.0, 2.2])}}
    # harmful scores 1.0 (= t: not flagged, as the gate's strict ">"), 1.5, 2, 3; the nll rows: one flagged
    scores = {
        "harmful": np.array([1.0, 1.5, 2.0, 3.0]),
        "safe": np.array([-1.0, 0.0]),
        "nll": np.array([0.0, 5.0]),
    }
    cands = candidates(base, steered, scores, {0.05: 1.0}, max_safe_pp=3.0, max_fluency_rel=0.02)
    cond = next(c for c in cands if c.conditional)
    assert cond.harmful_refusal == 0.75 and cond.harmful_gain_pp == 75.0
    # fluency +5% (2.0 -> mean(2.0, 2.2)) over a 2% budget: infeasible although over-refusal is 0
    assert cond.safe_delta_pp == 0 and cond.fluency_rel == pytest.approx(0.05) and not cond.feasible
    assert all(not c.feasible for c in cands)


def test_ungated_contrast_has_unknown_validation_figures_and_paired_figures_keep_their_keys():
    from safesteer.behaviour.policy import fluency_rel

    c = candidates(*_grid(), {0.01: 1.8})[0]
    u = ungated(c)
    assert (u.strategy, u.alpha, u.conditional, u.fpr, u.threshold, u.feasible) == (
        c.strategy,
        c.alpha,
        False,
        None,
        None,
        False,
    )
    assert all(
        np.isnan(x)
        for x in (u.harmful_refusal, u.safe_refusal, u.harmful_gain_pp, u.safe_delta_pp, u.fluency_rel)
    )
    assert np.isnan(fluency_rel(np.zeros(3), np.ones(3)))  # no baseline NLL: no relative change
    b, v = np.array([0.0, 1.0, np.nan, 0.0, 1.0]), np.array([1.0, 1.0, 1.0, np.nan, 0.0])
    d = paired(b, v)
    assert d["n"] == 3 and d == paired(b, v, seed=0)
    r = relative_change(np.array([2.0, 4.0, np.inf]), np.array([3.0, 5.0, 1.0]))
    assert r["n"] == 2 and r["baseline_nll"] == 3.0 and r["value_nll"] == 4.0
    assert r["delta_pct"] == pytest.approx(100 / 3)


def test_given_flags_replace_the_score_rule_and_wrapped_rows_use_the_gate_that_never_saw_them():
    """``candidates(flags=...)`` judges exactly the rows flagged (the score rule is its default), and
    ``held_out_flags`` flags a wrapped row by its family fold's gate and threshold, any other row by the
    deployed scores — by hand on planted scores."""
    from safesteer.behaviour.attacks import family_fold, held_out_flags

    base, steered, scores = _grid()
    thresholds = {0.05: 0.0, 0.01: 1.8}
    plain = candidates(base, steered, scores, thresholds)
    same = {f: {k: scores[k] > t for k in ("harmful", "safe", "nll")} for f, t in thresholds.items()}
    assert candidates(base, steered, scores, thresholds, flags=same) == plain
    fewer = {f: {k: np.zeros(10, dtype=bool) for k in ("harmful", "safe", "nll")} for f in thresholds}
    fewer[0.01]["harmful"][:3] = True  # 3 of the 9 harmful rows the scores flag
    got = {(c.alpha, c.fpr): c for c in candidates(base, steered, scores, thresholds, flags=fewer)}
    assert got[(0.2, 0.01)].harmful_gain_pp == pytest.approx(30) and got[(0.2, 0.05)].harmful_gain_pp == 0

    groups = ["advbench", "wrap:dan", "wrapb:dan", "wrap:gcg", "xstest_safe", "wrapb:gcg"]
    deployed = np.array([2.0, 3.0, 3.0, -1.0, 0.5, 0.5])
    fold = np.array([np.nan, 0.4, 0.6, 2.5, np.nan, 1.5])
    for folds in (0, 2):
        fd, fg = family_fold("dan", folds), family_fold("gcg", folds)
        if fd == fg:  # one hash fold holds both: one threshold for both families
            ft = {fd: {0.01: 1.0}}
            want = [True, False, False, True, False, True]
        else:
            ft = {fd: {0.01: 0.5}, fg: {0.01: 2.0}}
            want = [True, False, True, True, False, False]
        got = held_out_flags(deployed, {0.01: 1.0}, groups, [0, 1, 2, 3, 4, 5], fold, ft, folds)
        assert got[0.01].tolist() == want, folds
        rows = [3, 0]  # any order of rows
        assert held_out_flags(deployed, {0.01: 1.0}, groups, rows, fold, ft, folds)[0.01].tolist() == [
            want[3],
            want[0],
        ]
    # without fold scores (no attack rows): the deployed rule
    got = held_out_flags(deployed, {0.01: 1.0}, groups, range(6), None, None, 0)
    assert got[0.01].tolist() == (deployed > 1.0).tolist()


def test_at_each_fpr_recombines_the_chosen_alpha_at_every_threshold_by_hand():
    """Planted scores and answers: at each candidate threshold of the chosen (strategy, α), the refusal
    change, the flag rate and the fluency change are those of the rows scored above it, counted by hand;
    other α, other strategies and unconditional candidates are left out; rows come in FPR order."""

    def cand(strategy, alpha, fpr, t, cond=True):
        return Candidate(strategy, alpha, cond, fpr, t, 0.0, 0.0, 0.0, 0.0, 0.0, True)

    chosen = cand("caa", 0.3, 0.01, 2.0)
    cands = [
        cand("caa", 0.3, 0.05, 0.5),
        chosen,
        cand("caa", 0.2, 0.01, 2.0),  # another α
        cand("dim", 0.3, 0.01, 2.0),  # another strategy
        cand("caa", 0.3, None, None, cond=False),
    ]
    scores = {
        "harmful": np.array([3.0, 1.0, 0.0, 2.5]),
        "safe": np.array([1.0, 0.0]),
        "nll": np.array([1.0, 0.0]),
    }
    steered = {"harmful": np.array([1, 1, 1, 0.0]), "safe": np.array([1, 1.0]), "nll": np.array([3.0, 5.0])}
    base = {"harmful": np.array([0, 0, 0, 0.0]), "safe": np.array([0, 0.0]), "nll": np.array([1.0, 1.0])}
    rows = at_each_fpr(cands, chosen, scores, steered, base)
    assert [r["fpr"] for r in rows] == [0.01, 0.05]
    tight, loose = rows
    # t = 2: harmful rows 0 and 3 flagged; row 0 steered refuses, row 3 does not: +1 of 4 = +25 pp
    assert tight["harmful_delta_pp"] == pytest.approx(25.0) and tight["harmful_flag_rate"] == 0.5
    assert tight["safe_delta_pp"] == 0.0 and tight["safe_flag_rate"] == 0.0 and tight["fluency_rel"] == 0.0
    # t = 0.5: harmful rows 0, 1, 3 (+2 of 4); safe row 0 (+1 of 2); nll (3 + 1) / 2 = 2 against 1: +100%
    assert loose["harmful_delta_pp"] == pytest.approx(50.0) and loose["harmful_flag_rate"] == 0.75
    assert loose["safe_delta_pp"] == pytest.approx(50.0) and loose["safe_flag_rate"] == 0.5
    assert loose["fluency_rel"] == pytest.approx(1.0) and loose["threshold"] == 0.5
