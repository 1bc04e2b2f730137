"""Judges: constrained verdict parsing, offline judge, OpenAI-compatible endpoint (mocked), causal screen."""

from __future__ import annotations

import json
import random
import string

import httpx
import numpy as np
import pytest

from safesteer.cartography.judges import (
    UNSAFE_FLAG,
    VERDICTS,
    CausalScreen,
    NoJudge,
    OfflineJudge,
    OpenAIJudge,
    card_prompt,
    clean_label,
    concept_text,
    evidence_summary,
    make_judge,
    parse_verdict,
    sanitize_label,
)
from safesteer.errors import SafesteerError
from safesteer.probes import Probe

CARD = {"atom": 7, "tokens": ["idiot", "stupid"], "top_texts": [{"id": "t:1", "activation": 3.2, "text": "you are an idiot"}],
        "labels": [{"label": "toxicity", "r": 0.4, "freq_pos": 0.6, "freq_neg": 0.1, "score": 0.3}]}


def test_parse_verdict_is_constrained():
    assert parse_verdict("Verdict: GENUINE. It detects insults") == "GENUINE"
    assert parse_verdict("context, not noise") == "CONTEXT"  # first verdict word wins
    assert parse_verdict("it is genuinely about slurs") == "GENUINE"
    assert parse_verdict("") == "NOISE" and parse_verdict(None) == "NOISE"
    rng = random.Random(0)
    for _ in range(500):
        s = "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 40)))
        assert parse_verdict(s) in VERDICTS


def test_prompt_and_label_helpers():
    p = card_prompt(CARD, "toxicity")
    assert "idiot" in p and "r=0.400" in p and "GENUINE, CONTEXT or NOISE" in p
    assert concept_text("emotion:anger") == "anger (emotion)" and concept_text("harm_beavertails") == "harm beavertails"
    assert sanitize_label("Label: Insults and slurs!\nmore") == "insults and slurs"
    assert clean_label(" the presence of toxicity in the text. It") == "toxicity in the text"
    assert clean_label(' whether a prompt asks for "weapons", or') == "prompt asks for weapons"
    ev = evidence_summary(CARD, "toxicity")
    assert "fires on 60% of positives vs 10% of negatives" in ev and "idiot" in ev and "top text: you are an idiot" in ev


def test_offline_judge_always_returns_a_verdict(tiny_llama):
    judge = OfflineJudge(tiny_llama, label_tokens=3)
    res = judge.judge(CARD, "toxicity")
    assert res.verdict in VERDICTS
    assert set(res.probs) == set(VERDICTS) and sum(res.probs.values()) == pytest.approx(1.0)
    assert res.label  # never empty: falls back to the concept
    prefix = judge._prefix(CARD, "toxicity")
    scores = judge.verdict_scores([prefix])
    assert scores.shape == (1, 3) and np.isfinite(scores).all()
    # the KV-cached scoring equals scoring the three full sequences
    np.testing.assert_allclose(scores, judge.verdict_scores([prefix], use_cache=False), rtol=1e-4, atol=1e-4)


def test_cached_scoring_with_multi_token_verdicts(tiny_llama, monkeypatch):
    judge = OfflineJudge(tiny_llama)
    monkeypatch.setattr(judge, "_option_ids", lambda: [[10, 11, 12], [13, 14], [15]])
    prefix = judge._prefix(CARD, "toxicity")
    np.testing.assert_allclose(judge.verdict_scores([prefix]), judge.verdict_scores([prefix], use_cache=False), rtol=1e-4, atol=1e-4)


def test_offline_judge_refuses_masked_models(tiny_roberta):
    with pytest.raises(SafesteerError, match="causal"):
        OfflineJudge(tiny_roberta)


def _mock(reply, status=200, seen=None):
    def handler(request: httpx.Request):
        if seen is not None:
            seen.append(json.loads(request.content))
            seen.append(request.headers.get("authorization"))
        return httpx.Response(status, json={"choices": [{"message": {"content": reply}}]})

    return httpx.MockTransport(handler)


def test_openai_judge_json_and_free_text(monkeypatch):
    monkeypatch.setenv("SAFESTEER_JUDGE_BASE_URL", "http://judge.local/v1")
    monkeypatch.setenv("SAFESTEER_JUDGE_MODEL", "tiny")
    monkeypatch.setenv("SAFESTEER_JUDGE_API_KEY", "k")
    seen = []
    j = OpenAIJudge(transport=_mock('```json\n{"verdict": "context", "label": "Sports talk", "reasoning": "fires on games"}\n```', seen=seen))
    res = j.judge(CARD, "toxicity")
    assert (res.verdict, res.label, res.reason) == ("CONTEXT", "sports talk", "fires on games")
    assert seen[0]["model"] == "tiny" and seen[1] == "Bearer k"
    res2 = OpenAIJudge(transport=_mock("I think this is GENUINE.\nLabel: insults")).judge(CARD, "toxicity")
    assert res2.verdict == "GENUINE" and res2.label == "insults"
    res3 = OpenAIJudge(transport=_mock("no idea")).judge(CARD, "toxicity")
    assert res3.verdict == "NOISE"
    with pytest.raises(SafesteerError, match="HTTP 500"):
        OpenAIJudge(transport=_mock("x", status=500)).judge(CARD, "toxicity")


def test_make_judge():
    assert isinstance(make_judge("none"), NoJudge) and NoJudge().judge(CARD, "x").verdict == "UNJUDGED"
    with pytest.raises(SafesteerError, match="unknown judge"):
        make_judge("gpt5")


def _readout(bb, rng):
    w = rng.normal(size=bb.d_model)
    return Probe(w=w, b=0.0)


TEXTS = ["you are a cruel idiot", "the dog is happy", "what a good friend", "make a bomb please"]


def test_screen_same_layer_is_exact(tiny_llama):
    rng = np.random.default_rng(0)
    probe = _readout(tiny_llama, rng)
    scr = CausalScreen(tiny_llama, layer=1, read_layer=1, readouts={"toxicity": (probe, TEXTS)}, alpha=0.5)
    d = probe.w / np.linalg.norm(probe.w)
    dp, dl = scr.effect("toxicity", d)
    assert dl == pytest.approx(0.5 * np.linalg.norm(probe.w), rel=1e-5) and dp > 0
    good = scr.screen_one(3, "toxicity", r=0.3, r_heldout=0.2, direction=d)
    assert good.passes and good.replicates and good.flag == ""
    bad = scr.screen_one(4, "toxicity", r=0.3, r_heldout=0.2, direction=-d)
    assert not bad.passes and bad.flag.startswith(UNSAFE_FLAG)
    norep = scr.screen_one(5, "toxicity", r=0.3, r_heldout=-0.2, direction=d)
    assert not norep.passes and "replicate" in norep.flag
    weak = scr.screen_one(6, "toxicity", r=0.3, r_heldout=0.01, direction=d)
    assert not weak.replicates


def test_screen_step_and_weak_readouts(tiny_llama):
    rng = np.random.default_rng(2)
    probe = _readout(tiny_llama, rng)
    probe.metrics = {"auroc": 0.55}
    good = _readout(tiny_llama, rng)
    good.metrics = {"auroc": 0.95}
    scr = CausalScreen(tiny_llama, layer=1, read_layer=1, readouts={"weak": (probe, TEXTS), "good": (good, TEXTS)}, alpha_scale=2.0)
    assert scr.alpha_for(3.0) == 6.0 and scr.alpha_for(None) == pytest.approx(scr.alpha) and scr.alpha > 0
    d = good.w / np.linalg.norm(good.w)
    _, dl = scr.effect("good", d, alpha=scr.alpha_for(3.0))
    assert dl == pytest.approx(6.0 * np.linalg.norm(good.w), rel=1e-5)
    res = scr.screen_one(1, "weak", 0.3, 0.3, d)
    assert not res.passes and "too weak" in res.flag and np.isnan(res.effect)
    missing = scr.screen_one(1, "other", 0.3, 0.3, d)
    assert not missing.passes and "no read-out" in missing.flag


def test_screen_through_later_layers_runs_the_model(tiny_llama):
    rng = np.random.default_rng(1)
    probe = _readout(tiny_llama, rng)
    scr = CausalScreen(tiny_llama, layer=0, read_layer=2, readouts={"toxicity": (probe, TEXTS)}, alpha_scale=0.5)
    assert scr.alpha > 0
    d = rng.normal(size=tiny_llama.d_model)
    dp, dl = scr.effect("toxicity", d)
    dp2, dl2 = scr.effect("toxicity", -d)
    assert dl == pytest.approx(-dl2, rel=1e-4) and dl != 0  # central difference is odd in d
    res = scr.screen_one(1, "toxicity", 0.2 * np.sign(dl), 0.2 * np.sign(dl), d)
    assert res.passes
    with pytest.raises(SafesteerError):
        CausalScreen(tiny_llama, layer=2, read_layer=1, readouts={}, alpha=1.0)
