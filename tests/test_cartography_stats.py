"""Streaming atom × label statistics: exactness vs scipy/numpy, merge-order invariance, ranking, top rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import scipy.stats as ss

from safesteer.cartography import StreamingStats, TopActivations, atom_table, heldout_mask, map_latents
from safesteer.cartography.atom_map import decode_labels, encode_labels
from safesteer.errors import SafesteerError

LABELS = ["a", "b", "c"]


def _random(n=600, atoms=30, seed=0, density=0.3, offset=0.0):
    rng = np.random.default_rng(seed)
    Z = (rng.exponential(2.0, (n, atoms)) + offset) * (rng.random((n, atoms)) < density)
    Z[:, 0] = rng.exponential(1.0, n) + 1e3  # large mean, small spread: naive sums would lose digits
    Y = (rng.random((n, len(LABELS))) < 0.35).astype(float)
    Y[rng.random(Y.shape) < 0.25] = np.nan
    return Z, Y


def _sharded(Z, Y, n_shards, seed):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(Z))
    cuts = np.sort(rng.choice(np.arange(1, len(Z)), n_shards - 1, replace=False))
    parts = [
        StreamingStats(Z.shape[1], LABELS).update(sp.csr_matrix(Z[p]), Y[p]) for p in np.split(perm, cuts)
    ]
    order = rng.permutation(len(parts))
    total = StreamingStats(Z.shape[1], LABELS)
    for i in order:  # any merge order
        total.merge(parts[i])
    return total


def _rel(a, b):
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))


@pytest.mark.parametrize("n_shards,seed", [(1, 0), (2, 1), (7, 2), (23, 3)])
def test_matches_scipy_and_numpy(n_shards, seed):
    Z, Y = _random(seed=seed)
    st = _sharded(Z, Y, n_shards, seed)
    a = st.arrays()
    for l in range(len(LABELS)):
        m = ~np.isnan(Y[:, l])
        y = Y[m, l]
        for j in range(Z.shape[1]):
            z = Z[m, j]
            r_ref = ss.pointbiserialr(y, z)[0]
            assert abs(a["r"][j, l] - r_ref) <= 1e-6 * abs(r_ref) + 1e-12
            mu1, mu0 = z[y == 1].mean(), z[y == 0].mean()
            assert _rel(a["mean_pos"][j, l], mu1) <= 1e-6 and _rel(a["mean_neg"][j, l], mu0) <= 1e-6
            assert abs(a["dmu"][j, l] - (mu1 - mu0)) <= 1e-6 * max(abs(mu1 - mu0), 1e-9) + 1e-9
            s_pooled = np.sqrt(
                (((z[y == 1] - mu1) ** 2).sum() + ((z[y == 0] - mu0) ** 2).sum()) / (len(z) - 2)
            )
            assert _rel(a["cohens_d"][j, l], (mu1 - mu0) / s_pooled) <= 1e-6
            assert a["freq_pos"][j, l] == pytest.approx((z[y == 1] > 0).mean(), abs=1e-12)
            assert a["freq_neg"][j, l] == pytest.approx((z[y == 0] > 0).mean(), abs=1e-12)
        assert st.n[1, l] == (y == 1).sum() and st.n[0, l] == (y == 0).sum()
        # sums and sums of squares are exposed too
        assert _rel(st.sums[1, :, l], Z[m][y == 1].sum(0)) <= 1e-9
        assert _rel(st.sumsqs[0, :, l], (Z[m][y == 0] ** 2).sum(0)) <= 1e-9


def test_merge_orders_agree_with_single_pass():
    Z, Y = _random(seed=5)
    single = StreamingStats(Z.shape[1], LABELS).update(sp.csr_matrix(Z), Y).to_frame()
    for seed in range(3):
        other = _sharded(Z, Y, 9, seed).to_frame()
        num = single.select_dtypes("number").columns
        np.testing.assert_allclose(
            other[num].to_numpy(float), single[num].to_numpy(float), rtol=1e-9, atol=1e-12
        )


def test_planted_atom_ranks_first():
    rng = np.random.default_rng(3)
    n, A = 2000, 200
    y = (rng.random(n) < 0.3).astype(float)
    Z = rng.exponential(1.0, (n, A)) * (rng.random((n, A)) < 0.05)
    planted = 137
    fire = np.where(y == 1, rng.random(n) < 0.8, rng.random(n) < 0.05)
    for i in np.flatnonzero(fire):
        Z[i, planted] = rng.exponential(1.0) + 0.5
    Z = sp.csr_matrix(Z)
    st = StreamingStats(A, ["toxicity"])
    for chunk in np.array_split(np.arange(n), 5):
        st.update(Z[chunk], y[chunk, None])
    df = atom_table(st)
    assert df.sort_values("score", ascending=False)["atom"].iloc[0] == planted
    assert df.sort_values("r", ascending=False)["atom"].iloc[0] == planted
    row = df[df.atom == planted].iloc[0]
    assert row["freq_pos"] > 0.7 and row["freq_neg"] < 0.15 and row["category"] == "toxicity"


def test_sparse_input_is_never_densified():
    n, A = 3000, 400_000  # dense float64 would need ~9.6 GB
    rng = np.random.default_rng(0)
    nnz = 24_000
    Z = sp.csr_matrix((rng.random(nnz), (rng.integers(0, n, nnz), rng.integers(0, A, nnz))), shape=(n, A))
    Y = (np.arange(n) % 2).astype(float)[:, None]
    st = StreamingStats(A, ["x"]).update(Z, Y)
    assert st.n[:, 0].tolist() == [n / 2, n / 2]
    assert st.mean.shape == (2, 1, A)  # O(atoms × labels) memory


def test_validation_and_persistence(tmp_path):
    Z, Y = _random(n=50, atoms=5)
    st = StreamingStats(5, LABELS)
    with pytest.raises(SafesteerError, match="0, 1 or NaN"):
        st.update(sp.csr_matrix(Z), np.full_like(Y, 0.5))
    with pytest.raises(SafesteerError, match="atoms"):
        st.update(sp.csr_matrix(Z[:, :3]), Y)
    with pytest.raises(SafesteerError, match="different"):
        st.merge(StreamingStats(5, ["x"]))
    st.update(sp.csr_matrix(Z), Y)
    st.save(tmp_path / "s")
    back = StreamingStats.load(tmp_path / "s")
    pd.testing.assert_frame_equal(back.to_frame(), st.to_frame())
    assert back.rows_seen == 50


def test_top_activations_exact_and_mergeable():
    Z, _ = _random(n=300, atoms=12, seed=9)
    Z[:, 0] = 0.0  # an atom that never fires has no rows
    ids = np.array([f"d:{i}" for i in range(len(Z))])
    parts = np.array_split(np.random.default_rng(0).permutation(len(Z)), 4)
    tops = [TopActivations(12, 4).update(sp.csr_matrix(Z[p]), ids[p]) for p in parts]
    t = tops[2].merge(tops[0]).merge(tops[3]).merge(tops[1])
    f = t.to_frame()
    assert not (f.atom == 0).any()
    for j in range(1, 12):
        ref = np.argsort(-Z[:, j], kind="stable")[:4]
        got = f[f.atom == j].sort_values("rank")
        np.testing.assert_allclose(got.activation.to_numpy(), Z[ref, j])
        assert set(got.id) == set(ids[ref])


def test_map_latents_with_heldout_and_label_codes():
    Z, Y = _random(n=400, atoms=10, seed=11)
    ids = np.array([f"ds:{i}" for i in range(400)])
    codes = encode_labels(Y)
    np.testing.assert_array_equal(np.isnan(decode_labels(codes)), np.isnan(Y))
    shards = [(k, sp.csr_matrix(Z[p]), ids[p]) for k, p in enumerate(np.array_split(np.arange(400), 3))]
    shuffled = np.random.default_rng(0).permutation(400)  # label rows in another order than the latents
    res = map_latents(
        iter(shards), 10, ids[shuffled], LABELS, codes[shuffled], heldout_fraction=0.25, top_k=3
    )
    h = heldout_mask(ids, 0.25)
    assert 0.15 < h.mean() < 0.35 and res.n_rows == 400
    ref = StreamingStats(10, LABELS).update(sp.csr_matrix(Z[~h]), Y[~h])
    np.testing.assert_allclose(res.stats.arrays()["r"], ref.arrays()["r"], rtol=1e-9)
    ref_h = StreamingStats(10, LABELS).update(sp.csr_matrix(Z[h]), Y[h])
    df = atom_table(res)
    assert len(df) == 30 and {"r_heldout", "dmu_heldout", "score", "category"} <= set(df.columns)
    np.testing.assert_allclose(df[df.label == "b"].r_heldout.to_numpy(), ref_h.arrays()["r"][:, 1], rtol=1e-9)
    assert (df.category == "other").all()


def test_map_latents_bookkeeping_against_hand_counts():
    """Counts the map reports (rows, unlabelled rows, n_pos/n_neg, held-out columns), checked by hand."""
    Z, Y = _random(n=300, atoms=6, seed=12)
    ids = np.array([f"ds:{i}" for i in range(300)])
    labelled = np.arange(300) % 7 != 3  # every 7th latent row has no label row
    lab_ids, lab_Y = ids[labelled], Y[labelled]
    # a duplicated label id: the first occurrence counts
    lab_ids = np.concatenate([lab_ids, lab_ids[:1]])
    lab_Y = np.concatenate([lab_Y, 1.0 - np.nan_to_num(lab_Y[:1], nan=0.0)])
    logits = np.random.default_rng(1).normal(size=(len(lab_ids), 2))
    shards = [(k, sp.csr_matrix(Z[p]), ids[p]) for k, p in enumerate(np.array_split(np.arange(300), 4))]
    seen = []

    def progress(it):
        seen.append(1)
        return it

    res = map_latents(
        iter(shards),
        6,
        lab_ids,
        LABELS,
        encode_labels(lab_Y),
        heldout_fraction=0.3,
        top_k=2,
        logits=logits,
        probe_names=["p", "q"],
        fire_threshold=0.5,
        progress=progress,
    )
    assert seen == [1] and res.n_rows == 300 and res.heldout_fraction == 0.3
    assert res.n_unlabelled == int((~labelled).sum())
    assert res.stats.fire_threshold == 0.5 and res.heldout.fire_threshold == 0.5
    assert res.top.k == 2 and res.corr.names == ["p", "q"]
    Yfull = np.where(labelled[:, None], Y, np.nan)
    h = heldout_mask(ids, 0.3)
    # the main accumulator equals a direct pass over the non-held-out rows (duplicate ignored)
    ref = StreamingStats(6, LABELS, 0.5).update(sp.csr_matrix(Z[~h]), Yfull[~h])
    np.testing.assert_allclose(res.stats.arrays()["dmu"], ref.arrays()["dmu"], rtol=1e-9)
    # probe-logit correlations over the labelled rows, against numpy's Pearson r
    lg = logits[: labelled.sum()]
    r_ref = np.corrcoef(np.column_stack([Z[labelled][:, 2], lg[:, 1]]).T)[0, 1]
    assert res.corr.correlations()[2, 1] == pytest.approx(r_ref, rel=1e-9)

    df = atom_table(res, weights={"r": 0.0, "dmu": 1.0})
    assert list(df.columns[:3]) == ["atom", "label", "category"] and df.index.equals(pd.RangeIndex(len(df)))
    for li, name in enumerate(LABELS):
        rows = df[df.label == name]
        y_main, y_held = Yfull[~h, li], Yfull[h, li]
        assert (rows.n_pos == np.sum(y_main == 1)).all() and (rows.n_neg == np.sum(y_main == 0)).all()
        assert (rows.n_pos_heldout == np.sum(y_held == 1)).all() and (
            rows.n_neg_heldout == np.sum(y_held == 0)
        ).all()
        dmu_h = np.array([Z[h][y_held == 1, j].mean() - Z[h][y_held == 0, j].mean() for j in range(6)])
        np.testing.assert_allclose(rows.dmu_heldout.to_numpy(), dmu_h, rtol=1e-9)
        # the weights reach the score: with w_r = 0 it is Δμ / max|Δμ| of that label
        dmu = rows.dmu.to_numpy()
        np.testing.assert_allclose(rows.score.to_numpy(), dmu / np.nanmax(np.abs(dmu)), rtol=1e-12)
    # an explicit held-out accumulator replaces the map's own
    other = StreamingStats(6, LABELS, 0.5).update(sp.csr_matrix(Z[:50]), Yfull[:50])
    df2 = atom_table(res, heldout=other)
    assert (df2[df2.label == "a"].n_pos_heldout == np.sum(Yfull[:50, 0] == 1)).all()
    # no held-out fraction: no held-out accumulator, every row in the main one
    res0 = map_latents(iter(shards), 6, lab_ids, LABELS, encode_labels(lab_Y), heldout_fraction=0.0)
    assert res0.heldout is None and res0.stats.rows_seen == 300
    assert atom_table(res0).r_heldout.isna().all()


def test_to_frame_label_subset_merge_count_and_persisted_threshold(tmp_path):
    Z, Y = _random(n=80, atoms=4, seed=13)
    st = StreamingStats(4, LABELS, fire_threshold=0.25).update(sp.csr_matrix(Z[:50]), Y[:50])
    st.merge(StreamingStats(4, LABELS, fire_threshold=0.25).update(sp.csr_matrix(Z[50:]), Y[50:]))
    assert st.rows_seen == 80
    full = st.to_frame()
    sub = st.to_frame(labels=["c", "a"])
    assert sub.label.tolist() == ["c"] * 4 + ["a"] * 4
    np.testing.assert_array_equal(sub.r.to_numpy()[:4], full[full.label == "c"].r.to_numpy())
    st.save(tmp_path / "deep" / "s")  # parent folders are created
    back = StreamingStats.load(tmp_path / "deep" / "s")
    assert back.fire_threshold == 0.25 and back.rows_seen == 80
    np.testing.assert_array_equal(back.arrays()["freq_pos"], st.arrays()["freq_pos"])
    st.save(tmp_path / "deep" / "s")  # saving over an existing folder is fine
    import json

    meta = json.loads((tmp_path / "deep" / "s" / "stats.json").read_text())
    (tmp_path / "deep" / "s" / "stats.json").write_text(json.dumps({**meta, "version": 1}))
    with pytest.raises(SafesteerError, match="not a safesteer atom-statistics file"):
        StreamingStats.load(tmp_path / "deep" / "s")


def test_heldout_rule_is_the_documented_hash():
    """blake2b-64(salt|id), little-endian, as a fraction of 2^64: stable across releases (stored maps stay
    valid)."""
    import hashlib

    ids = [f"ds:{i}" for i in range(400)]
    ref = np.array(
        [
            int.from_bytes(hashlib.blake2b(f"safesteer-map|{x}".encode(), digest_size=8).digest(), "little")
            / 2.0**64
            < 0.3
            for x in ids
        ]
    )
    np.testing.assert_array_equal(heldout_mask(ids, 0.3), ref)
    assert not heldout_mask(ids, 0.0).any()


def test_concept_score_label_without_finite_dmu():
    """A label with no Δμ at all (no positives): its score is w_r·r alone, whatever the atom count."""
    from safesteer.cartography.stats import concept_score

    r = np.array([[0.1, 0.2], [0.3, -0.4], [0.5, 0.0]])
    dmu = np.full((3, 2), np.nan)
    np.testing.assert_allclose(concept_score(r, dmu, {"r": 2.0, "dmu": 1.0}), 2.0 * r)
    np.testing.assert_allclose(concept_score(r[:, 0], dmu[:, 0], {"r": 2.0, "dmu": 1.0}), 2.0 * r[:, 0])


def test_small_and_degenerate_labels_against_numpy():
    """Labels with 0, 1, 2, 3 rows on a side and constant atoms: every result column against a
    float64 NumPy computation (NaN where a quantity is undefined, 0 where the spread is 0)."""
    Z = np.array([[1.0, 2.0, 0.0], [3.0, 2.0, 5.0], [0.5, 2.0, 0.0], [4.0, 2.0, 0.0], [2.0, 2.0, 1.0]])
    nan = np.nan
    Y = np.array(
        [  # l0: 1 pos / 1 neg; l1: 2 pos / 1 neg; l2: no negatives; l3: nothing defined; l4: constant sides
            [1, 1, 1, nan, 1],
            [0, 1, 1, nan, 1],
            [nan, 0, nan, nan, 0],
            [nan, nan, nan, nan, 0],
            [nan, nan, 1, nan, 0],
        ]
    )
    names = ["l0", "l1", "l2", "l3", "l4"]
    Zc = Z.copy()
    Zc[:, 2] = np.where(Y[:, 4] == 1, 7.0, 3.0)  # atom 2 constant within each side of l4
    st = StreamingStats(3, names, fire_threshold=1.5).update(sp.csr_matrix(Zc), Y)
    a = st.arrays()
    assert all(v.dtype == np.float64 for v in a.values())
    for li in range(5):
        y = Y[:, li]
        pos, neg, dfn = Zc[y == 1], Zc[y == 0], Zc[~np.isnan(y)]
        n1, n0 = len(pos), len(neg)
        dmu = pos.mean(0) - neg.mean(0) if n1 and n0 else np.full(3, nan)
        sd = dfn.std(0) if len(dfn) else np.full(3, nan)
        p = n1 / len(dfn) if len(dfn) else nan
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.where(sd > 0, dmu / sd * np.sqrt(p * (1 - p)), 0.0)
            r = np.where(np.isnan(dmu), nan, r)
            m2 = (
                ((pos - pos.mean(0)) ** 2).sum(0) + ((neg - neg.mean(0)) ** 2).sum(0)
                if n1 and n0
                else np.full(3, nan)
            )
            pooled = np.sqrt(m2 / (n1 + n0 - 2)) if n1 + n0 > 2 else np.full(3, nan)
            d = np.where(pooled > 0, dmu / pooled, 0.0)
            d = np.where(np.isnan(dmu) | np.isnan(pooled), nan, d)
        f1 = (pos > 1.5).mean(0) if n1 else np.full(3, nan)
        f0 = (neg > 1.5).mean(0) if n0 else np.full(3, nan)
        for key, ref in (
            ("dmu", dmu),
            ("std", sd),
            ("r", r),
            ("cohens_d", d),
            ("freq_pos", f1),
            ("freq_neg", f0),
        ):
            np.testing.assert_allclose(
                a[key][:, li], ref, rtol=1e-12, atol=1e-12, err_msg=f"{names[li]} {key}"
            )
    assert (
        a["cohens_d"][2, 4] == 0.0 and a["dmu"][2, 4] == 4.0
    )  # perfectly separated constant sides: d = 0 by convention
    assert (
        np.isnan(a["r"][1, 2]) and a["r"][1, 1] == 0.0
    )  # atom 1 is constant: r undefined without Δμ, else 0


def test_pending_sums_flush_often_equals_one_pass():
    """flush_rows=7 folds the pending raw sums many times; the result equals one big update."""
    Z, Y = _random(n=120, atoms=5, seed=14)
    ref = StreamingStats(5, LABELS).update(sp.csr_matrix(Z), Y)
    st = StreamingStats(5, LABELS, flush_rows=7)
    for part in np.array_split(np.arange(120), 17):
        st.update(sp.csr_matrix(Z[part]), Y[part])
    assert st.rows_seen == 120
    for k, v in ref.arrays().items():
        np.testing.assert_allclose(
            st.arrays()[k], v, rtol=1e-8, atol=1e-12, err_msg=k
        )  # atom 0: mean 1e3, sd 1
    np.testing.assert_array_equal(st.n, ref.n)


def test_atom_count_and_one_label_vector():
    with pytest.raises(SafesteerError, match="n_atoms must be positive"):
        StreamingStats(0, ["x"])
    Z = sp.csr_matrix(np.array([[1.0], [0.0], [2.0]]))
    y = np.array([1.0, 0.0, 1.0])
    one = StreamingStats(1, ["x"]).update(Z, y)  # one atom, a 1-D label vector for one label
    two = StreamingStats(1, ["x"]).update(Z, y[:, None])
    np.testing.assert_array_equal(one.arrays()["dmu"], two.arrays()["dmu"])
    assert one.arrays()["dmu"][0, 0] == 1.5
