"""The report's behaviour sections: the verdict's numbers are the stage's, the figures are embedded."""

from __future__ import annotations

import pandas as pd
import pytest

from safesteer.io import read_json
from safesteer.pipeline.behaviour_report import examples, fluency, pct, sections
from safesteer.pipeline.report import render
from safesteer.serve.bundle import publish, write_bundle

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("recommended", [True, False])
def test_verdict_carries_the_stage_numbers(behaviour_run, tmp_path, recommended):
    out, outputs, _, cfg = behaviour_run
    summary = read_json(out / "summary.json")
    if recommended:
        assert write_bundle(summary, out, tmp_path / "bundle", cfg.model.name, require_gain=False)
        publish(tmp_path / "bundle", tmp_path)
    else:
        publish(outputs.policy, tmp_path)
    secs = sections(out, tmp_path)
    assert [s.title.split(":")[0] for s in secs] == [
        "Verdict",
        "Under attack and on borderline requests",
        "Pareto",
        "Before / after",
        "The harm gate",
    ]
    html, md = render("run", secs, {"seed": 0}, tmp_path)
    page = html.read_text()
    # the attack table carries the study's per-set figures (families, held-out look-alikes, conversations)
    attacks = summary["test"]["attacks"]
    under = page[page.index("<h2 id='s1'>") : page.index("<h2 id='s2'>")]
    assert attacks["per_set"] and any(k.startswith("wrap:") for k in attacks["per_set"])
    for r in list(attacks["per_set"].values()) + [attacks["wrapped_harmful"], attacks["wrapped_benign"]]:
        assert pct(r["refusal"]).replace(">", "&gt;") in under
        assert pct(r["refusal_with_answer_gate"]).replace(">", "&gt;") in under
    assert f"{100 * attacks['chat_turns_flag_rate']['flag_rate']:.1f}%" in under
    verdict = page[page.index("<h2 id='s0'>") : page.index("<h2 id='s1'>")]
    cond = summary["test"]["conditional"]
    if recommended:
        assert f"Recommended: cond:{cond['policy']['strategy']} α={cond['policy']['alpha']:g}" in verdict
        for key in ("harmful_refusal", "safe_refusal", "p_yes"):
            assert pct(cond[key]).replace(">", "&gt;") in verdict
        assert fluency(cond["harmless_fluency"]) in verdict and "serve --run" in verdict
    else:
        assert "No strategy met the constraints" in verdict and "Recommended:" not in verdict
    # the chosen α at each validation FPR, on test: at the chosen FPR it is the test figures themselves
    at = {r["fpr"]: r for r in cond["at_each_fpr"]}
    mine = at[cond["policy"]["fpr"]]
    assert mine["harmful_delta_pp"] == pytest.approx(cond["harmful_refusal"]["delta"], abs=1e-9)
    assert mine["safe_delta_pp"] == pytest.approx(cond["safe_refusal"]["delta"], abs=1e-9)
    assert mine["harmful_flag_rate"] == pytest.approx(cond["gate_flag_rate"]["harmful"], abs=1e-12)
    assert sorted(at) == sorted(cfg.behaviour.fprs) and "on test at each gate FPR" in page
    g = summary["gate"]
    assert (
        f"Held-out test AUROC {g['held_out']['test_auroc']:.3f}" in page
        and f"min AUROC {g['lodo_min_auroc']:.3f}" in page
    )
    assert page.count("data:image/png;base64,") == 2  # the Pareto figure and the gate's ROC
    assert (tmp_path / "plots" / "behaviour_pareto.png").is_file() and (
        tmp_path / "plots" / "gate_roc.png"
    ).is_file()


def test_before_after_examples_pair_each_prompt_with_its_unsteered_answer(behaviour_run):
    out = behaviour_run[0]
    ans = pd.read_csv(out / "answers.csv", keep_default_na=False)
    ex = examples(ans, n=3)
    assert list(ex["set"]) == ["harmful"] * 3 + ["XSTest-safe"] * 3
    # (the attack sets' direct:* rows repeat some of these prompts: the examples read the direct sets)
    base = ans[(ans["policy"] == "unsteered") & ans["set"].isin(["harmful", "safe"])].set_index("prompt")[
        "answer"
    ]
    for _, r in ex.iterrows():
        assert r["unsteered answer"] == str(base[r["prompt"]])[:160]
