"""The segmented gate in the study (safesteer.behaviour.segments and the ``pieces`` arguments of the
calibration scorers): which pieces become training rows, and that every calibration score of a prompt
is the largest of its own and its pieces' by a gate that never saw the prompt or its pieces — by brute
force against refits done by hand."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import planted_prompts

from safesteer.behaviour.attacks import family_fold, family_fold_scores
from safesteer.behaviour.gate import cross_fit_scores, train_gate
from safesteer.behaviour.prompts import Prompts
from safesteer.behaviour.segments import with_pieces
from safesteer.probes.logistic import train_probe
from safesteer.steering.segments import segment_max


def _with_piece_vectors(n=40, seed=0):
    """Planted prompts, each with 0–3 pieces: harmless pieces near the harmless mean, and in each
    harmful prompt one piece carrying the harm shift (the request) among harmless ones (the wrapper)."""
    H, P = planted_prompts(n, 12, seed, shift=3.0, groups=("ha", "hb", "sa", "sb", "sc"), style=2.0)
    rng = np.random.default_rng(seed + 1)
    text, owner, V = [], [], []
    for i in range(len(P)):
        k = int(rng.integers(0, 4))
        for j in range(k):
            v = rng.normal(size=H.shape[1])
            if P.harmful[i] and j == k - 1:
                v[0] += 3.0
            text.append(f"piece {j} of {P.text[i]}")
            owner.append(i)
            V.append(v)
    return H, P, text, np.array(owner), np.array(V)


def test_with_pieces_adds_every_harmless_piece_and_the_top_harmful_one_of_train_prompts():
    H, P, text, owner, V = _with_piece_vectors()
    score0 = V[:, 0]  # the "whole-prompt gate": reads the harm axis
    Px, Hx = with_pieces(P, H, text, owner, V, score0)
    n = len(P)
    assert Hx.shape == (len(Px), H.shape[1]) and np.array_equal(Hx[:n], H) and Px.text[:n] == P.text
    tr = np.asarray(P.split) == "train"
    want = []
    for i in np.flatnonzero(tr):
        idx = np.flatnonzero(owner == i)
        if not len(idx):
            continue
        want += [int(idx[np.argmax(score0[idx])])] if P.harmful[i] else [int(j) for j in idx]
    assert Px.text[n:] == [text[j] for j in want]
    assert np.array_equal(Hx[n:], V[want])
    assert Px.harmful[n:].tolist() == [int(P.harmful[owner[j]]) for j in want]
    assert Px.origin[n:].tolist() == owner[want].tolist() and Px.aug[n:].all() and not Px.aug[:n].any()
    assert Px.group[n:] == [P.group[owner[j]] for j in want] and set(Px.split[n:]) == {"train"}
    # val/test prompts' pieces never become training rows
    assert not (set(Px.text[n:]) & {text[j] for j in np.flatnonzero(~tr[owner])})


def test_cross_fit_with_pieces_is_the_max_over_pieces_by_the_fold_gate_that_saw_neither():
    H, P, text, owner, V = _with_piece_vectors()
    Px, Hx = with_pieces(P, H, text, owner, V, V[:, 0])
    cond = train_gate(Hx, Px, layer=3, Cs=(0.1,))
    n = len(P)
    s = cross_fit_scores(cond, Hx, Px, folds=4, pieces=(V, owner))[:n]
    plain = cross_fit_scores(cond, Hx, Px, folds=4)[:n]
    rest = np.asarray(P.split) != "train"
    np.testing.assert_allclose(s[rest], segment_max(cond.score(H), cond.score(V), owner)[rest], rtol=1e-12)
    fold = np.array(
        [
            int.from_bytes(hashlib.sha256(f"safesteer-fold|{t}".encode()).digest()[:4], "big") % 4
            for t in Px.text
        ]
    )
    fold[n:] = fold[Px.origin[n:]]  # a piece sits in its prompt's fold
    for f in range(4):
        held = np.flatnonzero((np.asarray(P.split) == "train") & (fold[:n] == f))
        fit = (np.asarray(Px.split) == "train") & (fold != f)
        ref = train_probe(Hx[fit], Px.harmful[fit], balanced=True, Cs=[0.1], folds=2)
        for i in held:
            want = max([ref.decision_function(H[[i]])[0]] + list(ref.decision_function(V[owner == i])))
            assert s[i] == np.float64(want) or abs(s[i] - want) < 1e-9
    changed = np.flatnonzero(np.abs(s - plain) > 1e-9)
    assert len(changed) and (s[changed] > plain[changed]).all()  # pieces only ever raise a score


@pytest.mark.parametrize("folds", [2, 0])
def test_family_fold_scores_with_pieces_score_each_family_by_the_gate_of_the_other_fold(folds):
    rng = np.random.default_rng(3)
    fams = ["dan", "fiction", "roleplay", "gcg", "encoding", "few_shot"]
    assert {family_fold(f) for f in fams} == {0, 1}
    rows = []
    for f in fams:
        for k in range(12):
            rows.append((f"wrap:{f}" if k % 2 else f"wrapb:{f}", k % 2, ["train", "val", "test"][k % 3]))
    rows += [("direct", k % 2, "train") for k in range(60)]
    P = Prompts(
        [f"t{i}" for i in range(len(rows))],
        np.array([r[1] for r in rows]),
        [r[0] for r in rows],
        [r[2] for r in rows],
    )
    H = rng.normal(size=(len(P), 6))
    H[:, 0] += 2.0 * P.harmful
    owner = np.repeat(np.arange(len(P)), 2)
    V = rng.normal(size=(len(owner), 6))
    cond = train_gate(H, P, layer=3, Cs=(0.1,))
    out, th = family_fold_scores(cond, H, P, [0.1], seed=0, pieces=(V, owner), folds=folds)
    ks = sorted({family_fold(f, folds) for f in fams})
    assert len(ks) == (2 if folds == 2 else len(fams)) and sorted(th) == ks  # 0: each family alone
    for k in ks:
        held = np.array([g.startswith("wrap") and family_fold(g.split(":")[1], folds) == k for g in P.group])
        fit = P.mask("train") & ~held
        ref = train_probe(H[fit], P.harmful[fit], balanced=True, Cs=[0.1], folds=2)
        want = np.maximum(ref.decision_function(H), ref.decision_function(V).reshape(-1, 2).max(1))
        np.testing.assert_allclose(out[held], want[held], rtol=1e-9)
    assert np.isnan(out[~np.array([g.startswith("wrap") for g in P.group])]).all()


def test_leave_one_family_out_gives_every_family_its_own_fold_and_bad_counts_are_refused():
    from safesteer.behaviour.config import StudyConfig
    from safesteer.behaviour.wrappers import FAMILIES
    from safesteer.errors import SafesteerError

    assert sorted(family_fold(f, 0) for f in FAMILIES) == list(range(len(FAMILIES)))
    assert {family_fold(f) for f in FAMILIES} == {0, 1} and all(
        family_fold(f, 3) in (0, 1, 2) for f in FAMILIES
    )
    assert family_fold("not_registered", 0) >= len(FAMILIES)
    for bad in (1, -1):
        with pytest.raises(SafesteerError, match="family_folds"):
            StudyConfig(family_folds=bad).validate()
    rec = StudyConfig(attacks=True, family_folds=0).record("m", 1, 0, None)
    assert rec["family_folds"] == 0 and "family_folds" not in StudyConfig(attacks=True).record(
        "m", 1, 0, None
    )
