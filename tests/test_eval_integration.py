"""Integration on the embedded SmolLM2 (small: ≤ ~60 prompts per test) with the offline data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from safesteer.data import load
from safesteer.evaluate.bias import (
    crows_pairs_from_records,
    crows_scores,
    crows_summary,
    stereoset_from_records,
    stereoset_metrics,
    stereoset_scores,
)
from safesteer.evaluate.choice import forced_choice
from safesteer.evaluate.suite import SuiteConfig, run_suite
from safesteer.steering import Intervention, build_directions

pytestmark = pytest.mark.integration
LAYER = 15


class _Probe:
    """A logistic probe on standardised pooled vectors, folded back into raw space (like safesteer.probes)."""

    def __init__(self, H, y, layer):
        mu, sd = H.mean(0), H.std(0) + 1e-6
        clf = LogisticRegression(C=0.1, max_iter=5000).fit((H - mu) / sd, y)
        self.w = clf.coef_[0] / sd
        self.b = float(clf.intercept_[0] - (clf.coef_[0] * mu / sd).sum())
        self.meta = {"layer": layer}
        self.diffmean = None

    @property
    def direction(self):
        return self.w / np.linalg.norm(self.w)

    def predict_proba(self, H):
        return 1.0 / (1.0 + np.exp(-(np.asarray(H, dtype=np.float64) @ self.w + self.b)))


def _texts(name, split, shared, n, **filt):
    out = []
    for r in load(name, split=split, data_dir=shared, source="local"):
        if all(r.labels.get(k) == v for k, v in filt.items()):
            out.append(r.text)
    return out[:n]


@pytest.fixture(scope="module")
def harm_probe(smollm2, shared_data):
    harm = [r.text for r in load("advbench", "train", data_dir=shared_data, source="local", max_rows=40)]
    safe = _texts("xstest", "train", shared_data, 40, unsafe=0)
    H = smollm2.pooled(harm + safe, [LAYER])[LAYER].astype(np.float64)
    y = np.r_[np.ones(len(harm)), np.zeros(len(safe))]
    return _Probe(H, y, LAYER)


def test_random_control_ci_covers_zero_where_probe_does_not(smollm2, shared_data, harm_probe):
    """ΔP of the harm probe on held-out harmful prompts: the probe direction lowers it (CI < 0); the random
    control (4 directions of the same norm, two-level bootstrap) has a CI that covers 0."""
    ds = build_directions(LAYER, {"harm": harm_probe}, random_members=4)
    cfg = SuiteConfig(
        layer=LAYER,
        strategies=["probe_harm", "random"],
        metrics=["harm_probe"],
        alphas=[0.05],
        alpha_unit="norm",
        max_prompts=30,
        n_boot=1000,
        data_dir=str(shared_data),
        source="local",
    )
    res = run_suite(smollm2, ds, cfg, probes={"harm": harm_probe})
    df = res.table().set_index("strategy")
    assert 50 < res.scale < 1000  # median token norm of SmolLM2's layer 15 (~180)
    probe, rnd = df.loc["probe_harm"], df.loc["random"]
    assert probe["n"] == 30 and rnd["members"] == 4
    assert probe["delta_high"] < 0, probe.to_dict()
    assert rnd["delta_low"] <= 0 <= rnd["delta_high"], rnd.to_dict()
    assert abs(rnd["delta"]) < abs(probe["delta"]) / 5


def test_forced_choice_sane_and_alpha_zero_exact(smollm2, shared_data):
    harm = [r.text for r in load("advbench", "test", data_dir=shared_data, source="local", max_rows=12)]
    safe = _texts("xstest", "test", shared_data, 12, unsafe=0)
    ph, mass = forced_choice(smollm2, harm, "harmful", return_mass=True)
    ps = forced_choice(smollm2, safe, "safe")
    assert np.all((ph > 0) & (ph < 1))
    assert ph.mean() < ps.mean()  # the instruct model is likelier to agree to help with safe requests
    assert mass.mean() > 0.1  # the answer tokens carry real probability mass after the chat template
    ds = build_directions(LAYER, d_model=smollm2.d_model, random_members=1)
    zero = forced_choice(smollm2, harm, "harmful", Intervention.from_direction(ds["random"], 0.0))
    np.testing.assert_array_equal(ph, zero)


def test_bias_benchmarks_small(smollm2, shared_data):
    pairs = crows_pairs_from_records(
        load("crows_pairs", "test", data_dir=shared_data, source="local", max_rows=20)
    )
    s = crows_scores(smollm2, pairs)
    summ = crows_summary(pairs, s, "causal")
    assert summ["n"] == 20 and 0 <= summ["metric_score"] <= 100 and np.all(np.isfinite(s))
    ex = stereoset_from_records(load("stereoset", "test", data_dir=shared_data, source="local", max_rows=20))
    sc = stereoset_scores(smollm2, ex)
    m = stereoset_metrics(ex, sc)
    o = m["overall"]
    assert o["count"] == 20 and np.all(np.isfinite(sc))
    assert o["icat"] == pytest.approx(o["lms"] * min(o["ss"], 100 - o["ss"]) / 50)
    # a real LM prefers meaningful candidates over unrelated ones
    assert o["lms"] > 60
