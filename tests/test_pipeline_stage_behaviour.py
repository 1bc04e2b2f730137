"""The behaviour pipeline stage: outputs, the directions stage's strategies in the same sweep, cache keys."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from safesteer.config import Config
from safesteer.errors import SafesteerError
from safesteer.pipeline.runner import stage_keys
from safesteer.pipeline.stages.behaviour import toward_refusal
from safesteer.steering.strategies import Direction, DirectionSet

pytestmark = pytest.mark.integration


def test_stage_outputs_judge_pipeline_strategies_beside_behaviour_ones(behaviour_run):
    out, outputs, _, cfg = behaviour_run
    assert outputs.dir == out and outputs.summary == out / "summary.json" and outputs.skipped == ""
    pareto = pd.read_csv(out / "pareto.csv")
    # every strategy × α per gate FPR: the probe direction is judged by the same sweep (unconditional
    # candidates only with sweep_unconditional, below)
    assert set(pareto["strategy"]) == {"refusal_caa", "refusal_dim", "probe_harm"}
    assert (
        len(pareto) == 3 * len(cfg.behaviour.alphas) * len(cfg.behaviour.fprs) and pareto["conditional"].all()
    )
    # the pipeline direction points toward unsafe; the stage flips it so that α ≥ 0 adds it
    src = DirectionSet.load(out.parent / "directions")["probe_harm"].vector
    used = DirectionSet.load(out / "directions")["probe_harm"]
    np.testing.assert_array_equal(used.vector, -src)
    ans = pd.read_csv(out / "answers.csv", keep_default_na=False)
    assert (
        (ans[(ans["policy"] == "unsteered") & (ans["set"] == "harmful")].shape[0])
        == cfg.behaviour.n_test_harmful
    )
    # a random model never refuses: nothing raised harmful refusal, so no policy is recommended
    assert not outputs.recommended and (outputs.policy / "NONE.txt").is_file()
    assert not list(outputs.policy.glob("*.json"))


def test_behaviour_knobs_key_only_the_behaviour_stage():
    base = stage_keys(Config())
    cfg = Config()
    cfg.behaviour.alphas = [0.2]
    changed = {k for k, v in stage_keys(cfg).items() if v != base[k]}
    assert changed == {"behaviour"}
    cfg = Config()
    cfg.directions.random_members = 3  # the directions feed the behaviour stage
    assert {k for k, v in stage_keys(cfg).items() if v != base[k]} == {"directions", "evaluate", "behaviour"}


def test_unknown_or_ensemble_strategy_is_one_clear_error():
    ds = DirectionSet()
    ds.add(Direction("random", np.ones(4), "random", 1, members=[np.arange(4.0)]))
    with pytest.raises(
        SafesteerError,
        match="unknown behaviour strategy 'nope'; valid choices: refusal_caa, refusal_dim, random",
    ):
        toward_refusal(ds, ["refusal_caa", "nope"])
    with pytest.raises(SafesteerError, match="is an ensemble"):
        toward_refusal(ds, ["random"])


def test_sweeping_every_prompt_adds_unconditional_candidates_and_keeps_the_conditional_ones(
    behaviour_run, shared_data, tmp_path
):
    from types import SimpleNamespace

    from safesteer.pipeline.stages.behaviour import run_behaviour_stage
    from safesteer.pipeline.table import Context

    out, _, _, cfg = behaviour_run
    cfg.behaviour.sweep_unconditional = True
    try:
        ctx = Context(config=cfg, seed=0, device="cpu", data_dir=shared_data, say=lambda m: None)
        run_behaviour_stage(
            cfg.behaviour,
            {"directions": SimpleNamespace(directions=out.parent / "directions")},
            tmp_path / "all",
            ctx,
        )
    finally:
        cfg.behaviour.sweep_unconditional = False
    flagged, every = pd.read_csv(out / "pareto.csv"), pd.read_csv(tmp_path / "all" / "pareto.csv")
    assert len(every) == 3 * len(cfg.behaviour.alphas) * (1 + len(cfg.behaviour.fprs))
    cond = every[every["conditional"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        cond.drop(columns=["fluency_rel", "feasible"]), flagged.drop(columns=["fluency_rel", "feasible"])
    )
    np.testing.assert_allclose(
        cond["fluency_rel"], flagged["fluency_rel"], atol=1e-6
    )  # batch composition only


def test_pairs_are_also_judged_at_the_recommended_policys_threshold_and_on_the_dev_pairs(behaviour_run):
    from safesteer.io import read_json

    out, _, _, _ = behaviour_run
    s = read_json(out / "summary.json")
    g, c = s["gate"], (s["test"].get("conditional") or {}).get("policy")
    at = g["pairs_at_policy_threshold"]
    assert (at is None) == (c is None)
    if c is not None:
        t = c["threshold"]
        side = [(p["score_imperative"] > t) == (p["score_question"] > t) for p in g["pairs"]]
        right = [
            (p["score_imperative"] > t) == (p["score_question"] > t) == bool(p["harmful"]) for p in g["pairs"]
        ]
        assert (
            at["threshold"] == t
            and at["same_side"] == pytest.approx(np.mean(side))
            and at["correct"] == pytest.approx(np.mean(right))
        )
    # the dev pairs (other requests and frames) are scored by the same gate, at both thresholds
    from safesteer.behaviour.pairs import paraphrase_pairs

    dev = g["dev_pairs"]
    assert [p["id"] for p in dev["pairs"]] == [p.id for p in paraphrase_pairs("dev")]
    t0 = g["threshold"]
    side0 = [(p["score_imperative"] > t0) == (p["score_question"] > t0) for p in dev["pairs"]]
    assert dev["at_gate"]["threshold"] == t0 and dev["at_gate"]["same_side"] == pytest.approx(np.mean(side0))
    assert (
        dev["at_gate"]["same_side_ci"][0] <= dev["at_gate"]["same_side"] <= dev["at_gate"]["same_side_ci"][1]
    )
    assert (dev["at_policy"] is None) == (c is None) and g["pairs_at_gate_threshold"][
        "same_side"
    ] == pytest.approx(g["pairs_same_side"])


def test_the_budget_is_judged_on_the_test_figures_population(behaviour_run):
    """Over-refusal and fluency are checked on validation on the budget groups only (XSTest safe, the
    benign look-alikes and every wrapped-benign family: the populations of the test figures): val rows,
    plus cross-fitted train rows of the direct sets (a wrapped row's fold gate may have seen its request
    in another wrapper: val only). The look-alikes' held-out category is never among them."""
    from safesteer.io import read_json

    out, _, _, cfg = behaviour_run
    s = read_json(out / "summary.json")
    cal = s["gate"]["calibration"]
    assert cal["budget_groups"] == cfg.behaviour.budget_groups == ["xstest_safe", "lookalikes", "wrapb:*"]
    rows = pd.read_csv(out / "gate_scores.csv")
    direct = rows["group"].isin(["xstest_safe", "lookalikes"]) & rows["split"].isin(["val", "train"])
    wrapped = rows["group"].str.startswith("wrapb:") & (rows["split"] == "val")
    want = rows[(direct | wrapped) & ~rows["aug"]]
    assert want["group"].str.startswith("wrapb:").any() and (want["group"] == "lookalikes").any()
    assert cal["n_safe_budget"] == len(want) > 0
    assert not (rows["group"] == "lookalikes_heldout").loc[rows["split"] != "test"].any()
    assert s["config"]["steer_positions"] == cfg.behaviour.steer_positions == "prompt"
