"""The metric registry: a new metric group defined and registered here flows through run_suite unchanged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from safesteer.errors import SafesteerError
from safesteer.evaluate.registry import (
    GROUPS,
    METRICS,
    GroupResult,
    MetricGroup,
    MetricSpec,
    register,
    unregister,
)
from safesteer.evaluate.suite import SuiteConfig, run_suite, write_outputs
from safesteer.steering import build_directions

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = [
    "the dog is happy .",
    "how do i help a friend ?",
    "tell me about the city .",
    "what is a good book ?",
    "the old man went home .",
    "she said yes .",
]


class Projection(MetricGroup):
    """Mean projection of the steered pooled vector at the steering layer onto a fixed unit vector ``u``."""

    name = "projection"
    metrics = (MetricSpec("proj_u", "projection", "lower", "mean projection on u"),)
    u: np.ndarray = np.zeros(0)

    def load(self, split, n, cfg):
        return TEXTS[:n] if split == "test" else TEXTS[::-1][:n]

    def score(self, ctx, items, iv):
        from safesteer.steering import Intervention

        with (iv or Intervention.none()).apply(ctx.bb):
            H = ctx.bb.pooled(list(items), [ctx.cfg.layer])[ctx.cfg.layer].astype(np.float64)
        return GroupResult(self.name, {"proj_u": H @ self.u}, {"n_texts": len(items)})


@pytest.fixture
def projection():
    register(Projection)  # the one line
    yield GROUPS["projection"]
    unregister("projection")


def test_new_group_flows_through_the_suite(tiny_llama, projection, tmp_path):
    layer = 1
    ds = build_directions(layer, d_model=tiny_llama.d_model, random_members=1)
    u = ds["random"].vector.astype(np.float64)
    projection.u = u
    assert "proj_u" in SuiteConfig(layer=layer).metrics  # a registered group is in the defaults at once
    cfg = SuiteConfig(
        layer=layer,
        strategies=["random"],
        alphas=[0.5, 2.0],
        alpha_unit="raw",
        metrics=["proj_u"],
        max_prompts=6,
        n_boot=200,
    )
    res = run_suite(tiny_llama, ds, cfg)
    df = res.table().set_index("strategy")
    assert list(df["metric"]) == ["proj_u", "proj_u"]
    # planted truth: every real token moves by ±α·u at the layer, so the mean projection moves by exactly α
    rnd = df.loc["random"]
    assert rnd["alpha"] == 2.0 and rnd["n"] == len(TEXTS)
    assert abs(rnd["delta"]) == pytest.approx(2.0, rel=1e-4)
    # and the suite's numbers are the plain mean over items of what the group scored
    H0 = tiny_llama.pooled(TEXTS, [layer])[layer].astype(np.float64) @ u
    assert df.loc["unsteered", "value"] == pytest.approx(H0.mean(), rel=1e-9)
    assert rnd["baseline"] == pytest.approx(H0.mean(), rel=1e-9)
    assert rnd["ci_low"] <= rnd["value"] <= rnd["ci_high"] and rnd["p_value"] < 0.05
    assert res.extras["strategies"]["random"]["groups"]["projection"] == {"n_texts": 6}
    write_outputs(res, tmp_path, plots=False)
    assert set(pd.read_csv(tmp_path / "results.csv")["metric"]) == {"proj_u"}


def test_registry_rules(projection):
    assert METRICS["proj_u"].group == "projection"
    with pytest.raises(SafesteerError, match="already registered"):
        register(Projection)

    class Clash(Projection):
        name = "clash"
        metrics = (MetricSpec("fluency", "clash", "higher", "x"),)

    with pytest.raises(SafesteerError, match="fluency"):
        register(Clash)

    class WrongGroup(Projection):
        name = "wrong"
        metrics = (MetricSpec("w", "other", "higher", "x"),)

    with pytest.raises(SafesteerError, match="another group"):
        register(WrongGroup)
    with pytest.raises(SafesteerError, match="no metric group"):
        unregister("nope")


def test_builtin_metrics_in_order():
    assert list(METRICS)[:12] == [
        "harm_probe",
        "tox_probe",
        "yes_harmful",
        "yes_toxic",
        "no_safe",
        "refusal_harmful",
        "refusal_safe",
        "fluency",
        "crows",
        "stereoset_lms",
        "stereoset_ss",
        "stereoset_icat",
    ]
    assert METRICS["stereoset_ss"].better == "fifty" and METRICS["refusal_harmful"].causal_only
    assert "proj_u" not in METRICS  # the fixture cleaned up
    assert SuiteConfig(layer=0).metrics == [
        m for m in METRICS if m not in ("refusal_harmful", "refusal_safe")
    ]


def test_random_control_policy():
    from safesteer.evaluate.calibrate import random_control

    assert {k: c.alpha for k, c in random_control([0.5, -1.0, 0.0], [0.1, 2.0], "max", 0.1).items()} == {
        "random": -1.0
    }
    assert {k: c.alpha for k, c in random_control([0.5, -1.0], [2.0], "each", 0.1).items()} == {
        "random@0.5": 0.5,
        "random@-1": -1.0,
    }
    assert {k: c.alpha for k, c in random_control([0.5, 0.5], [2.0], "each", 0.1).items()} == {"random": 0.5}
    assert {k: c.alpha for k, c in random_control([0.0], [0.1, -3.0], "max", 0.1).items()} == {"random": -3.0}
    assert {k: c.alpha for k, c in random_control([1.0], [1.0], 0.7, 0.1).items()} == {"random": 0.7}
