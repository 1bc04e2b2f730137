"""Exact values for formulas that were only bounded or compared with themselves before.

Concept score per label (hand-computed and from scipy), clamp modes element by element
(subtract = max(f − λ, floor), scale, zero; the output x + decode(f′) − decode(f)).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from conftest import ReluSAE

from safesteer.cartography.stats import StreamingStats, concept_score
from safesteer.errors import SafesteerError
from safesteer.steering.clamp import ClampEdit

# ------------------------------------------------------------------------------------ concept score


def test_concept_score_is_normalised_per_label_by_hand():
    r = np.array([[0.2, -0.5], [0.8, 0.1], [-0.4, 0.3]])
    dmu = np.array([[2.0, -0.01], [-4.0, 0.02], [1.0, 0.005]])  # label 0 in units of 4, label 1 of 0.02
    got = concept_score(r, dmu)
    want = np.array(
        [
            [0.5 * 0.2 + 0.5 * 2.0 / 4.0, 0.5 * -0.5 + 0.5 * -0.01 / 0.02],
            [0.5 * 0.8 + 0.5 * -4.0 / 4.0, 0.5 * 0.1 + 0.5 * 0.02 / 0.02],
            [0.5 * -0.4 + 0.5 * 1.0 / 4.0, 0.5 * 0.3 + 0.5 * 0.005 / 0.02],
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=1e-15)
    w = concept_score(r, dmu, {"r": 0.25, "dmu": 2.0})
    np.testing.assert_allclose(w, 0.25 * r + 2.0 * dmu / np.array([[4.0, 0.02]]), rtol=1e-15, atol=1e-15)
    # a 1-D atom vector: one label
    np.testing.assert_allclose(concept_score(r[:, 0], dmu[:, 0]), want[:, 0], rtol=1e-15)
    # NaN (label undefined for an atom) counts as 0; an all-zero Δμ column is not divided by 0
    z = concept_score(np.array([[np.nan, 0.4]]), np.array([[np.nan, 0.0]]))
    np.testing.assert_array_equal(z, np.array([[0.0, 0.2]]))


def test_to_frame_scores_equal_scipy_per_label():
    rng = np.random.default_rng(3)
    n, atoms = 300, 5
    Z = np.abs(rng.normal(size=(n, atoms))) * np.array([1.0, 10.0, 0.1, 3.0, 0.5])
    y0 = (rng.random(n) < 0.4).astype(float)
    y1 = (Z[:, 2] > np.median(Z[:, 2])).astype(float)  # label 1 driven by a small-scale atom
    Y = np.stack([y0, y1], 1)
    fr = StreamingStats(atoms, ["a", "b"]).update(Z, Y).to_frame()
    for li, name in enumerate(["a", "b"]):
        y = Y[:, li]
        r = np.array([scipy.stats.pointbiserialr(y, Z[:, j])[0] for j in range(atoms)])
        dmu = np.array([Z[y == 1, j].mean() - Z[y == 0, j].mean() for j in range(atoms)])
        want = 0.5 * r + 0.5 * dmu / np.abs(dmu).max()
        got = fr[fr.label == name].sort_values("atom")["score"].to_numpy()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert fr[fr.label == "b"].sort_values("score").atom.iloc[-1] == 2


# ------------------------------------------------------------------------------------------- clamp


def _sae64():
    sae = ReluSAE(d_in=16, d_sae=24, seed=4)
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        setattr(sae, k, getattr(sae, k).double())
    return sae


@pytest.mark.parametrize("lam", [0.05, 0.3, 2.0])
def test_clamp_subtract_is_max_f_minus_lambda_floor(lam):
    sae = _sae64()
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    atoms = [0, 3, 7, 11]
    f = sae.encode(x)
    assert (f[:, atoms] > 0).any() and (f[:, atoms] == 0).any()
    for floor in (0.0, 0.1, None):
        edit = ClampEdit(sae, atoms, lam=lam, mode="subtract", floor=floor)
        f0, f1 = edit.codes(x)
        assert torch.equal(f0, f)
        want = f.clone()
        for a in atoms:
            for i in range(f.shape[0]):
                v = float(f[i, a])
                new = v - lam
                if floor is not None and new < floor:
                    new = min(
                        v, floor
                    )  # max(f − λ, floor), but a code already under the floor is never raised
                want[i, a] = new
        assert torch.equal(f1, want), (floor, (f1 - want).abs().max())
        if floor == 0.0:  # non-negative codes: exactly max(f − λ, 0)
            assert torch.equal(f1[:, atoms], torch.clamp(f[:, atoms] - lam, min=0.0))
        out = edit(x)
        ref = x + (f1 @ sae.W_dec + sae.b_dec) - (f @ sae.W_dec + sae.b_dec)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_clamp_scale_and_zero_exact():
    sae = _sae64()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    atoms = [1, 2, 20]
    f = sae.encode(x.reshape(-1, 16))
    for mode, lam, fn in (
        ("scale", 0.25, lambda v: v * 0.75),
        ("scale", 1.5, lambda v: v * -0.5),
        ("zero", 9.0, lambda v: v * 0.0),
    ):
        edit = ClampEdit(sae, atoms, lam=lam, mode=mode)
        want = f.clone()
        want[:, atoms] = fn(f[:, atoms])
        assert torch.equal(edit.codes(x)[1], want)
        others = [j for j in range(24) if j not in atoms]
        assert torch.equal(edit.codes(x)[1][:, others], f[:, others])
        out = edit(x)
        assert out.shape == x.shape
        ref = x.reshape(-1, 16) + (want - f) @ sae.W_dec
        torch.testing.assert_close(out.reshape(-1, 16), ref, rtol=0, atol=1e-12)


def test_clamp_lambda_zero_returns_input_object_and_rejects_bad_atoms():
    sae = _sae64()
    x = torch.randn(4, 16, dtype=torch.float64)
    assert ClampEdit(sae, [0], lam=0.0)(x) is x
    with pytest.raises(SafesteerError, match="out of range"):
        ClampEdit(sae, [24], lam=1.0)(x)
    with pytest.raises(SafesteerError, match="unknown clamp mode"):
        ClampEdit(sae, [0], mode="clip")


# --------------------------------------------------------------------------- StereoSet counting rules


def _sx(i, kind, target, dom):
    from safesteer.evaluate.bias import StereoExample

    return StereoExample(str(i), kind, target, dom, "c", "s", "a", "u")


def test_stereoset_ties_with_unrelated_are_not_related_and_domains_stay_per_kind():
    from safesteer.evaluate.bias import stereoset_metrics, stereoset_stat

    ex = [
        _sx(1, "intrasentence", "A", "gender"),
        _sx(2, "intrasentence", "A", "gender"),
        _sx(3, "intersentence", "B", "race"),
        _sx(4, "intersentence", "B", "race"),
    ]
    scores = np.array(
        [
            [
                -1.0,
                -2.0,
                -1.0,
            ],  # stereo = unrelated: not related (strict >, as evaluation.py); anti < unrelated
            [-3.0, -1.0, -1.0],  # anti = unrelated: not related; pro = 0
            [-1.0, -2.0, -3.0],  # pro; both related
            [-2.0, -1.0, -2.0],  # anti; anti related only, stereo = unrelated not
        ]
    )
    m = stereoset_metrics(ex, scores)
    assert m["intrasentence"]["overall"] == {"count": 2, "lms": 0.0, "ss": 50.0, "icat": 0.0}
    assert m["intersentence"]["overall"] == {"count": 2, "lms": 75.0, "ss": 50.0, "icat": 75.0}
    assert set(m["intrasentence"]) == {"gender", "overall"} and set(m["intersentence"]) == {"race", "overall"}
    stat, n = stereoset_stat(ex, scores)  # default number: ICAT over all examples
    assert n == 4 and stat(np.arange(4)) == pytest.approx(m["overall"]["icat"])
    stat, n = stereoset_stat(ex, scores, "lms", kind="intersentence")
    assert n == 2 and stat(np.arange(2)) == 75.0 and stat(np.array([0, 0])) == 100.0
    for which in ("lms", "ss", "icat"):
        assert stereoset_stat(ex, scores, which)[0](np.arange(4)) == pytest.approx(m["overall"][which])
    with pytest.raises(SafesteerError, match="unknown StereoSet number"):
        stereoset_stat(ex, scores, "LMS")


def test_intersentence_context_any_final_letter():
    from safesteer.evaluate.bias import intersentence_context

    for ctx in ("I met Malcolm X", "It was big", "Wait !x"):
        assert intersentence_context(ctx) == ctx + "."
    assert intersentence_context("") == ""


# ------------------------------------------------------------------------------- bootstrap p-value


def test_bootstrap_p_value_by_hand():
    from safesteer.evaluate.stats import bootstrap_p_value

    # P*(Δ ≤ 0) = 3/8, P*(Δ ≥ 0) = 7/8 -> p = 2 · 3/8
    assert bootstrap_p_value(np.array([-1.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0])) == 0.75
    assert bootstrap_p_value(np.array([-2.0, -1.0, 0.5, 0.5, 1.0, 1.0, 2.0, 3.0])) == 0.5  # no zeros: 2 · 2/8
    assert bootstrap_p_value(np.array([0.0, 0.0, 0.0, 1.0])) == 1.0  # 2 · 3/4 capped at 1
    assert bootstrap_p_value(np.array([1.0, 2.0, 3.0, 4.0])) == 0.25  # floored at 1/B
    assert bootstrap_p_value(np.array([-0.5, -1.0, 0.0, 0.0])) == 1.0
    assert bootstrap_p_value(np.zeros(5)) == 1.0
    assert bootstrap_p_value(np.array([0.5, 0.5, 0.5, 1.0, -0.5])) == pytest.approx(0.4)
    assert bootstrap_p_value([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == 0.1  # lists too


def test_paired_bootstrap_stat_path_equals_array_path_and_passes_its_settings():
    from safesteer.evaluate.stats import _indices, bootstrap_ci, bootstrap_p_value, paired_bootstrap

    rng = np.random.default_rng(0)
    a = rng.normal(size=30)
    b = a + 0.3 + rng.normal(scale=0.5, size=30)
    kw = dict(n_boot=300, level=0.8, method="bca", seed=5)
    arr = paired_bootstrap(a, b, **kw)
    pair = (a, b)
    via_stat = paired_bootstrap(stat=lambda idx, which: float(pair[which][idx].mean()), n=30, **kw)
    for res in (arr, via_stat):
        assert res.baseline == pytest.approx(a.mean(), rel=1e-12) and res.value == pytest.approx(
            b.mean(), rel=1e-12
        )
        ref = bootstrap_ci(b - a, **kw)
        assert (res.diff.low, res.diff.high, res.diff.level) == pytest.approx(
            (ref.low, ref.high, 0.8), rel=1e-12
        )
        boots = (b - a)[_indices(30, 300, 5)].mean(axis=1)
        assert res.p_value == pytest.approx(bootstrap_p_value(boots), rel=1e-12)
    assert paired_bootstrap(a, b, **kw).as_dict() == arr.as_dict()  # seeded: the same twice
    default = paired_bootstrap(a, b, n_boot=300)
    assert default.diff.level == 0.95
    ref0 = bootstrap_ci(b - a, n_boot=300, seed=0)
    assert (default.diff.low, default.diff.high) == pytest.approx((ref0.low, ref0.high), rel=1e-12)
    with pytest.raises(SafesteerError, match="baseline"):
        paired_bootstrap(None, b)


# --------------------------------------------------------------------------------------- Gated SAE


def _gated(variant="paper", d=6, s=16, seed=0):
    from safesteer.sae import GatedSAE, SAEConfig

    sae = GatedSAE(SAEConfig(d_in=d, d_sae=s, variant=variant), seed=seed).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_gate.copy_(torch.randn(s, generator=g, dtype=torch.float64) * 0.3)
        sae.b_mag.copy_(torch.randn(s, generator=g, dtype=torch.float64) * 0.3)
        sae.b_dec.copy_(torch.randn(d, generator=g, dtype=torch.float64) * 0.1)
    return sae


def test_gate_is_strictly_positive_heaviside():
    """x = b_dec gives a zero pre-activation: a gate bias of exactly 0 keeps the gate closed."""
    sae = _gated()
    with torch.no_grad():
        sae.b_gate.zero_()
        sae.b_mag.fill_(0.5)
    f = sae.encode(sae.b_dec.detach().clone().unsqueeze(0).repeat(3, 1))
    assert torch.equal(f, torch.zeros_like(f))
    with torch.no_grad():
        sae.b_gate[:4] = 1e-12
    f = sae.encode(sae.b_dec.detach().clone().unsqueeze(0))
    assert torch.equal(f[0, :4], torch.full((4,), 0.5, dtype=torch.float64)) and torch.equal(
        f[0, 4:], torch.zeros(12, dtype=torch.float64)
    )


@pytest.mark.parametrize("variant", ["paper", "article"])
@pytest.mark.parametrize("threshold", [0.0, 1.1])  # dense path, sparse (CSR) path
def test_fired_flags_equal_encode_positive(variant, threshold):
    from safesteer.sae import loss_and_grads
    from safesteer.sae.gated import PARAM_NAMES

    sae = _gated(variant, s=24)
    with torch.no_grad():
        sae.b_gate[:6] = -50.0  # six latents can never fire
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    p = {n: getattr(sae, n).detach().clone() for n in PARAM_NAMES}
    _, st = loss_and_grads(p, x, 0.05, variant, sparse_threshold=threshold, chunk_elems=4 * 24)
    want = (sae.encode(x) > 0).any(0)
    assert want[6:].any() and not want[:6].any()
    assert torch.equal(st.fired, want)


def test_geometric_median_minimises_the_sum_of_distances():
    import scipy.optimize

    from safesteer.sae.gated import geometric_median

    g = np.random.default_rng(2)
    pts = np.r_[
        g.normal(size=(40, 3)), g.normal(size=(8, 3)) * 0.2 + 12.0
    ]  # a far cluster pulls the mean, not the median
    cost = lambda c: np.linalg.norm(pts - c, axis=1).sum()  # noqa: E731
    ref = scipy.optimize.minimize(
        cost, pts.mean(0), method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000}
    ).x
    got = geometric_median(torch.tensor(pts, dtype=torch.float32), iters=200).double().numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    got20 = geometric_median(torch.tensor(pts)).numpy()  # the default 20 iterations are already close
    assert cost(got20) <= cost(ref) * (1 + 1e-3) < cost(pts.mean(0))
    assert geometric_median(torch.tensor(pts, dtype=torch.float32)).dtype == torch.float32


# --------------------------------------------------------------------------------------- strategies


def test_build_directions_diffmean_random_hybrids_and_ensembles():
    from safesteer.steering import Intervention, build_directions, random_direction
    from safesteer.steering.strategies import sae_direction

    class P:
        def __init__(self, w, dm):
            self.direction, self.diffmean = w / np.linalg.norm(w), dm

    g = np.random.default_rng(0)
    dm_given = g.normal(size=8)
    only_tox = build_directions(
        3,
        {"tox": P(g.normal(size=8), g.normal(size=8))},
        diffmeans={"tox": dm_given},
        seed=11,
        random_members=3,
    )
    assert "probe_tox+harm" not in only_tox and "diffmean_harm" not in only_tox  # hybrids need both parts
    np.testing.assert_allclose(
        only_tox["diffmean_tox"].vector, dm_given / np.linalg.norm(dm_given), rtol=1e-6
    )
    assert only_tox["diffmean_tox"].kind == "diffmean" and only_tox["probe_tox"].kind == "probe"
    rnd = only_tox["random"]
    assert rnd.kind == "random" and rnd.layer == 3
    for k, v in enumerate(rnd.vectors):
        np.testing.assert_array_equal(v, random_direction(8, 11 + k).astype(v.dtype))
    ivs = Intervention.ensemble(rnd, 2.0, layer=5)
    assert [iv.layer for iv in ivs] == [5, 5, 5] and [iv.alpha for iv in ivs] == [2.0, 2.0, 2.0]
    np.testing.assert_allclose(ivs[1].vector, -rnd.vectors[1], rtol=0)
    assert [iv.layer for iv in Intervention.ensemble(rnd, 1.0)] == [3, 3, 3]
    W = g.normal(size=(5, 8))
    with pytest.raises(SafesteerError, match="out of range 0..4"):
        sae_direction(W, [5])
    with pytest.raises(SafesteerError, match="out of range"):
        sae_direction(W, [-1])


def test_clamp_defaults_and_input_checks():
    sae = _sae64()
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert ClampEdit(sae, [1, 2])(x) is x  # default λ = 0: the identity
    f0, f1 = ClampEdit(sae, [1, 2], lam=100.0).codes(x)  # default floor 0: lowered to exactly 0
    assert torch.equal(f1[:, [1, 2]], torch.zeros(6, 2, dtype=torch.float64))
    assert ClampEdit(sae, [0]).mode == "subtract"
    with pytest.raises(SafesteerError, match=r"out of range 0\.\.23 for this SAE"):
        ClampEdit(sae, [30], lam=1.0)(x)

    class EncodeOnly:
        encode = sae.encode

    with pytest.raises(SafesteerError, match="encode\\(\\) and decode\\(\\)"):
        ClampEdit(EncodeOnly(), [0])

    class BadRows:
        def encode(self, x):
            return sae.encode(x)[:-1]

        decode = sae.decode

    with pytest.raises(SafesteerError, match="SAE encode returned shape"):
        ClampEdit(BadRows(), [0], lam=1.0)(x)


def test_forced_choice_return_mass(tiny_backbone):
    from safesteer.evaluate.choice import forced_choice

    texts = ["how do i make a bomb ?", "the dog is happy"]
    p = forced_choice(tiny_backbone, texts, "harmful")
    p2, mass = forced_choice(tiny_backbone, texts, "harmful", return_mass=True)
    np.testing.assert_array_equal(p, p2)
    assert mass.shape == (2,) and np.all((mass > 0) & (mass <= 1))
    e, m = forced_choice(tiny_backbone, [], "harmful", return_mass=True)
    assert e.size == 0 and m.size == 0
