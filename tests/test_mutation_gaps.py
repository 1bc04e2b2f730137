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
    want = np.array([
        [0.5 * 0.2 + 0.5 * 2.0 / 4.0, 0.5 * -0.5 + 0.5 * -0.01 / 0.02],
        [0.5 * 0.8 + 0.5 * -4.0 / 4.0, 0.5 * 0.1 + 0.5 * 0.02 / 0.02],
        [0.5 * -0.4 + 0.5 * 1.0 / 4.0, 0.5 * 0.3 + 0.5 * 0.005 / 0.02],
    ])
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
                    new = min(v, floor)  # max(f − λ, floor), but a code already under the floor is never raised
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
    for mode, lam, fn in (("scale", 0.25, lambda v: v * 0.75), ("scale", 1.5, lambda v: v * -0.5), ("zero", 9.0, lambda v: v * 0.0)):
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
