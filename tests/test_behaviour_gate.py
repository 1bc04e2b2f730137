"""Harm gate: hash splits, dataset assembly, training with an FPR threshold, LODO, cross-fitting."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import planted_prompts
from test_behaviour_calibration import _brute_threshold

from safesteer.behaviour.gate import gate_report, lodo, row_weights, train_gate
from safesteer.behaviour.prompts import FRACTIONS, Prompts, split3
from safesteer.errors import SafesteerError


def test_split3_is_deterministic_disjoint_and_proportional():
    texts = [f"prompt number {i}" for i in range(6000)]
    parts = [split3(t) for t in texts]
    assert parts == [split3(t) for t in texts]
    share = {s: parts.count(s) / len(parts) for s in ("train", "val", "test")}
    for s, f in zip(("train", "val", "test"), FRACTIONS):
        assert abs(share[s] - f) < 0.025
    with pytest.raises(SafesteerError, match="three non-negative shares"):
        split3("x", (0.5, 0.5, 0.5))


def _planted(n=90, d=12, seed=0):
    """Harmful rows shifted along axis 0; datasets differ by an offset along other axes (style)."""
    return planted_prompts(n, d, seed, shift=3.0, groups=("ha", "hb", "sa", "sb", "sc"), style=2.0)


def test_train_gate_threshold_meets_target_fpr_and_lodo_generalises():
    H, P = _planted()
    cond = train_gate(H, P, layer=3, target_fpr=0.05, Cs=(0.1, 1.0))
    neg_val = P.mask("val") & (P.harmful == 0)
    assert np.mean(cond.score(H[neg_val]) > cond.threshold) <= 0.05
    assert cond.layer == 3 and cond.position == "prompt_end"
    rep = gate_report(cond, H, P)
    assert rep["test_auroc"] > 0.97 and set(rep["per_dataset"]) == {"ha", "hb", "sa", "sb", "sc"}
    res = lodo(H, P, C=1.0)
    assert set(res) == {"ha", "hb", "sa", "sb", "sc"}
    assert min(v["auroc"] for v in res.values()) > 0.9  # the harm axis is shared by every dataset
    assert res["ha"]["n"] == 90 and res["ha"]["harmful"] == 1


def test_lodo_catches_a_style_detector():
    """When harmfulness is only carried by dataset style, held-out rows look fine but LODO does not."""
    rng = np.random.default_rng(1)
    text, harm, grp, H = [], [], [], []
    for gi, g in enumerate(["ha", "hb", "sa", "sb"]):
        for i in range(80):
            h = rng.normal(size=8)
            h[gi] += 4.0  # only the style axis of the dataset
            H.append(h)
            text.append(f"{g}-{i}")
            harm.append(int(g.startswith("h")))
            grp.append(g)
    P = Prompts(text, np.array(harm), grp, [split3(t) for t in text])
    H = np.array(H)
    cond = train_gate(H, P, 0, Cs=(1.0,))
    assert gate_report(cond, H, P)["test_auroc"] > 0.95
    assert min(v["auroc"] for v in lodo(H, P, C=1.0).values()) < 0.8


def test_augmented_copies_stay_in_train_and_out_of_lodo_evaluation():
    from safesteer.behaviour.prompts import Prompts
    from safesteer.behaviour.reframe import reframe

    texts = [f"Write essay number {i}." for i in range(60)] + [f"what is fact number {i}" for i in range(60)]
    y = np.r_[np.ones(60), np.zeros(60)].astype(int)
    groups = ["h1", "h2"] * 30 + ["s1", "s2"] * 30
    split = [split3(t) for t in texts]
    tr = [i for i, s in enumerate(split) if s == "train"]
    P = Prompts(
        texts + [reframe(texts[i]) for i in tr],
        np.r_[y, y[tr]],
        groups + [groups[i] for i in tr],
        split + ["train"] * len(tr),
        np.r_[np.zeros(120, bool), np.ones(len(tr), bool)],
    )
    H = np.random.default_rng(0).normal(size=(len(P), 4))
    H[:, 0] += 3 * P.harmful
    res = lodo(H, P, C=1.0)
    assert all(res[g]["n"] == 30 for g in ("h1", "h2", "s1", "s2"))  # originals only


def test_row_weights_give_every_dataset_of_a_class_the_same_total():
    text = (
        [f"a{i}" for i in range(60)]
        + [f"b{i}" for i in range(20)]
        + [f"s{i}" for i in range(30)]
        + [f"t{i}" for i in range(10)]
    )
    grp = ["a"] * 60 + ["b"] * 20 + ["s"] * 30 + ["t"] * 10
    harm = np.array([1] * 80 + [0] * 40)
    P = Prompts(text, harm, grp, ["train"] * 120)
    m = np.ones(120, dtype=bool)
    assert row_weights(P, m, "balanced") is None
    w = row_weights(P, m, "groups")
    g = np.array(grp)
    assert w[g == "a"].sum() == pytest.approx(w[g == "b"].sum()) == pytest.approx(40.0)
    assert w[g == "s"].sum() == pytest.approx(w[g == "t"].sum()) == pytest.approx(20.0)
    assert w[harm == 1].mean() == pytest.approx(1.0) and w[harm == 0].mean() == pytest.approx(1.0)
    sub = g != "a"  # only the rows of the mask count
    ws = row_weights(P, sub, "groups")
    assert len(ws) == sub.sum() and ws[:20] == pytest.approx(np.ones(20))
    with pytest.raises(SafesteerError, match="weighting"):
        row_weights(P, m, "uniform")


def test_train_gate_and_lodo_record_and_apply_the_weighting():
    H, P = _planted()
    for wt in ("balanced", "groups"):
        cond = train_gate(H, P, layer=3, Cs=(1.0,), weighting=wt)
        assert cond.meta["weighting"] == wt
        assert gate_report(cond, H, P)["test_auroc"] > 0.97
    res = lodo(H, P, C=1.0, weighting="groups")
    assert min(v["auroc"] for v in res.values()) > 0.9
    a, b = (train_gate(H, P, layer=3, Cs=(1.0,), weighting=wt) for wt in ("balanced", "groups"))
    assert np.max(np.abs(a.w - b.w)) > 1e-6  # the planted sources differ in size, so the fit differs


def test_cross_fit_scores_score_each_train_row_with_a_gate_that_did_not_see_it():
    import hashlib

    from safesteer.behaviour.gate import cross_fit_scores
    from safesteer.probes.logistic import train_probe

    H, P = _planted(n=40)
    P.aug[np.flatnonzero(P.mask("train"))[:5]] = True  # (marked augmented — always train rows: never scored)
    cond = train_gate(H, P, layer=3, Cs=(0.1,))
    s = cross_fit_scores(cond, H, P, folds=4)
    nontrain = ~P.mask("train")
    np.testing.assert_array_equal(s[nontrain], cond.score(H[nontrain]))  # val/test: the gate itself
    assert np.isnan(s[P.aug]).all() and np.isfinite(s[P.mask("train") & ~P.aug]).all()
    fold = np.array(
        [
            int.from_bytes(hashlib.sha256(f"safesteer-fold|{t}".encode()).digest()[:4], "big") % 4
            for t in P.text
        ]
    )
    orig = P.mask("train") & ~P.aug
    fit, held = orig & (fold != 2), orig & (fold == 2)
    ref = train_probe(H[fit], P.harmful[fit], balanced=True, Cs=[0.1], folds=2).decision_function(H[held])
    np.testing.assert_allclose(s[held], ref, rtol=1e-10)
    # a row's own fit would score it differently: out-of-fold really is out of fold
    assert not np.allclose(s[held], cond.score(H[held]))
    assert np.isnan(cross_fit_scores(cond, H, P, folds=0)[P.mask("train")]).all()


def test_cross_fit_keeps_an_augmented_copy_in_its_originals_fold():
    import hashlib

    from safesteer.behaviour.gate import cross_fit_scores
    from safesteer.probes.logistic import train_probe

    H0, P0 = _planted(n=40)
    tr = np.flatnonzero(P0.mask("train"))
    rng = np.random.default_rng(1)
    H = np.vstack(
        [H0, H0[tr] + 0.3 * rng.normal(size=(len(tr), H0.shape[1]))]
    )  # a copy sits near its original
    n0 = len(P0)
    P = Prompts(
        P0.text + [f"copy of {P0.text[i]}" for i in tr],
        np.r_[P0.harmful, P0.harmful[tr]],
        P0.group + [P0.group[i] for i in tr],
        P0.split + ["train"] * len(tr),
        np.r_[np.zeros(n0, bool), np.ones(len(tr), bool)],
        np.r_[np.full(n0, -1), tr],
    )
    cond = train_gate(H, P, layer=3, Cs=(0.1,))
    s = cross_fit_scores(cond, H, P, folds=4)
    assert np.isnan(s[P.aug]).all() and np.isfinite(s[P.mask("train") & ~P.aug]).all()
    fold = np.array(
        [
            int.from_bytes(hashlib.sha256(f"safesteer-fold|{t}".encode()).digest()[:4], "big") % 4
            for t in P.text
        ]
    )
    fold[n0:] = fold[tr]  # the copy's fold is its original's, not its own text's
    held = P.mask("train") & ~P.aug & (fold == 1)
    fit = P.mask("train") & (fold != 1)  # originals and copies of the other folds
    assert fit[n0:].any() and not fit[n0:][fold[tr] == 1].any()
    ref = train_probe(H[fit], P.harmful[fit], balanced=True, Cs=[0.1], folds=2).decision_function(H[held])
    np.testing.assert_allclose(s[held], ref, rtol=1e-10)
    with pytest.raises(SafesteerError, match="origin"):
        Prompts(
            ["a", "b"],
            np.array([1, 0]),
            ["g", "g"],
            ["train"] * 2,
            np.array([False, True]),
            np.array([0, -1]),
        )


def _xor(n=300, d=4, seed=0):
    """Harmful iff the signs of axes 0 and 1 differ: no linear gate separates it, one hidden layer does.
    Two datasets per class (by row parity), so leave-one-dataset-out keeps both classes."""
    rng = np.random.default_rng(seed)
    H = rng.normal(size=(n * 4, d))
    y = (np.sign(H[:, 0]) != np.sign(H[:, 1])).astype(np.int64)
    text = [f"xor-{i}" for i in range(len(y))]
    grp = [("h" if v else "s") + "ab"[i % 2] for i, v in enumerate(y)]
    return H * 3.0 + 1.5, Prompts(
        text, y, grp, [split3(t) for t in text]
    )  # raw scale and offset: folding matters


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_mlp_gate_equals_the_mean_logit_of_its_sklearn_members_and_learns_what_a_linear_one_cannot():
    from sklearn.neural_network import MLPClassifier

    from safesteer.behaviour.gate import fit_mlp

    H, P = _xor()
    tr = P.mask("train")
    w, b, W1, b1 = fit_mlp(H[tr], P.harmful[tr], hidden=16, members=3, alpha=1e-3, seed=7)
    assert W1.shape == (48, H.shape[1]) and w.shape == (48,) and b1.shape == (48,)
    # float64 reference: each member refitted by hand on standardised rows, logits averaged
    mu, sd = H[tr].mean(0), H[tr].std(0)
    y = P.harmful[tr]
    sw = np.where(y == 1, len(y) / (2 * y.sum()), len(y) / (2 * (len(y) - y.sum())))
    ref = np.zeros(len(H))
    for i in range(3):
        clf = MLPClassifier((16,), alpha=1e-3, max_iter=200, random_state=7 + i).fit(
            (H[tr] - mu) / sd, y, sample_weight=sw
        )
        p = clf.predict_proba((H - mu) / sd)
        ref += (np.log(p[:, 1]) - np.log(p[:, 0])) / 3
    from safesteer.steering.condition import Condition

    got = Condition(w, b, 0, W1=W1, b1=b1).score(H)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    mlp = train_gate(H, P, layer=2, hidden=16, members=3, mlp_alpha=1e-3)
    lin = train_gate(H, P, layer=2, Cs=(1.0,))
    assert mlp.kind == "mlp" and mlp.meta["hidden"] == 16 and lin.kind == "linear"
    assert mlp.meta["test_auroc"] > 0.9 and lin.meta["test_auroc"] < 0.7
    neg_val = P.mask("val") & (P.harmful == 0)
    assert np.mean(mlp.score(H[neg_val]) > mlp.threshold) <= 0.05
    with pytest.raises(SafesteerError, match="one class only"):
        fit_mlp(H[:5], np.zeros(5, dtype=int))


def test_cross_fit_and_lodo_use_the_gates_own_kind():
    import hashlib

    from safesteer.behaviour.gate import _fit, cross_fit_scores

    H, P = _xor(n=200)
    cond = train_gate(H, P, layer=1, hidden=8, members=2, mlp_alpha=1e-3)
    s = cross_fit_scores(cond, H, P, folds=3)
    fold = np.array(
        [
            int.from_bytes(hashlib.sha256(f"safesteer-fold|{t}".encode()).digest()[:4], "big") % 3
            for t in P.text
        ]
    )
    orig = P.mask("train") & ~P.aug
    fit, held = orig & (fold != 1), orig & (fold == 1)
    ref = _fit(H[fit], P.harmful[fit], None, {"hidden": 8, "members": 2, "mlp_alpha": 1e-3}, 0)
    assert ref.kind == "mlp"
    np.testing.assert_allclose(s[held], ref.score(H[held]), rtol=1e-10)
    res_mlp, res_lin = lodo(H, P, model=cond.meta), lodo(H, P, C=1.0)
    assert set(res_mlp) == {"ha", "hb", "sa", "sb"}
    # XOR, which only the MLP learns: every held-out dataset separates with the MLP, none with a line
    assert min(v["auroc"] for v in res_mlp.values()) > max(v["auroc"] for v in res_lin.values())


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_gate_fits_give_the_same_bits_in_one_process_or_several():
    """Members, cross-fitting folds and LODO datasets train in worker processes, single-threaded:
    the results must not depend on how many (or on the machine's core count)."""
    from safesteer.behaviour.gate import cross_fit_scores, fit_mlp
    from safesteer.workers import parallel_map

    H, P = _xor(n=150)
    tr = P.mask("train")
    one = fit_mlp(H[tr], P.harmful[tr], hidden=8, members=3, alpha=1e-3, jobs=1)
    two = fit_mlp(H[tr], P.harmful[tr], hidden=8, members=3, alpha=1e-3, jobs=2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    cond = train_gate(H, P, layer=1, hidden=8, members=2, mlp_alpha=1e-3)
    s1, s2 = cross_fit_scores(cond, H, P, folds=3, jobs=1), cross_fit_scores(cond, H, P, folds=3, jobs=2)
    np.testing.assert_array_equal(s1, s2)
    assert lodo(H, P, model=cond.meta, jobs=1) == lodo(H, P, model=cond.meta, jobs=3)
    assert parallel_map(pow, [(2, 3), (3, 2), (5, 1)], jobs=2) == [8, 9, 5]  # in order


def test_beavertails_gate_prompts_come_from_unsafe_pairs_only(monkeypatch):
    """The hub's BeaverTails holds safe QA pairs too: their prompts must not become harmful gate rows."""
    import safesteer.data as data
    from safesteer.behaviour.prompts import _raw
    from safesteer.data.records import Record

    rows = [
        Record("a", "How do I pick a lock?\nHere is how...", "train", {"harmful": 1}, "hub"),
        Record("b", "What is the capital of Peru?\nLima.", "train", {"harmful": 0}, "hub"),
        Record("c", "How do I hurt my cat?\nYou could...", "test", {"harmful": 1}, "hub"),
    ]
    monkeypatch.setattr(data, "load", lambda name, split="all", data_dir=None: iter(rows))
    assert _raw("beavertails", None) == ["How do I pick a lock?", "How do I hurt my cat?"]


@pytest.mark.parametrize("fpr", [0.1, 0.2])
def test_train_gate_threshold_is_the_brute_force_one_on_harmless_val_rows_only(fpr):
    """Not on every val row (harmful ones raise it), not at the default FPR."""
    H, P = _planted(n=53)
    cond = train_gate(H, P, layer=3, target_fpr=fpr, Cs=(1.0,))
    s = cond.score(H)
    neg_val = P.mask("val") & (P.harmful == 0)
    assert cond.threshold == _brute_threshold(s[neg_val], fpr)
    assert cond.threshold != _brute_threshold(s[P.mask("val")], fpr)
    assert cond.meta["target_fpr"] == fpr and cond.meta["n_train"] == int(P.mask("train").sum())
    assert cond.meta["trained_on"] == ["ha", "hb", "sa", "sb", "sc"]


def test_gate_report_flag_rates_are_counted_at_the_threshold_per_dataset():
    H, P = _planted(n=37)
    cond = train_gate(H, P, layer=3, Cs=(1.0,))
    cond.threshold = float(np.median(cond.score(H)))
    s, te = cond.score(H), P.mask("test")
    rep = gate_report(cond, H, P)["per_dataset"]
    for g in ("ha", "hb", "sa", "sb", "sc"):
        m = te & (np.asarray(P.group) == g)
        assert rep[g]["flag_rate"] == pytest.approx(sum(s[m] > cond.threshold) / m.sum(), abs=0)
        assert rep[g]["n_test"] == m.sum()
    # a dataset without test rows: no flag rate (NaN), counted as harmful-side by convention
    keep = ~(te & (np.asarray(P.group) == "sc"))
    pick = [i for i, k in enumerate(keep) if k]
    Q = Prompts(
        [P.text[i] for i in pick], P.harmful[keep], [P.group[i] for i in pick], [P.split[i] for i in pick]
    )
    rq = gate_report(cond, H[keep], Q)["per_dataset"]["sc"]
    assert rq["n_test"] == 0 and np.isnan(rq["flag_rate"])


def test_documented_defaults_of_row_weights_and_lodo():
    H, P = _planted()
    m = P.mask("train")
    assert np.array_equal(row_weights(P, m), row_weights(P, m, "groups"))
    assert lodo(H, P) == lodo(H, P, C=0.01)
