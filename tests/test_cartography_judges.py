"""Judges: constrained verdict parsing, offline judge, OpenAI-compatible endpoint (mocked)."""

from __future__ import annotations

import json
import random
import string

import httpx
import numpy as np
import pytest

from safesteer.cartography.judges import (
    VERDICTS,
    NoJudge,
    OfflineJudge,
    OpenAIAtomJudge,
    card_prompt,
    clean_label,
    concept_text,
    evidence_summary,
    make_judge,
    parse_verdict,
    sanitize_label,
)
from safesteer.errors import SafesteerError

CARD = {
    "atom": 7,
    "tokens": ["idiot", "stupid"],
    "top_texts": [{"id": "t:1", "activation": 3.2, "text": "you are an idiot"}],
    "labels": [{"label": "toxicity", "r": 0.4, "freq_pos": 0.6, "freq_neg": 0.1, "score": 0.3}],
}


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
    assert (
        concept_text("emotion:anger") == "anger (emotion)"
        and concept_text("harm_beavertails") == "harm beavertails"
    )
    assert sanitize_label("Label: Insults and slurs!\nmore") == "insults and slurs"
    assert clean_label(" the presence of toxicity in the text. It") == "toxicity in the text"
    assert clean_label(' whether a prompt asks for "weapons", or') == "prompt asks for weapons"
    ev = evidence_summary(CARD, "toxicity")
    assert (
        "fires on 60% of positives vs 10% of negatives" in ev
        and "idiot" in ev
        and "top text: you are an idiot" in ev
    )


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
    np.testing.assert_allclose(
        judge.verdict_scores([prefix]), judge.verdict_scores([prefix], use_cache=False), rtol=1e-4, atol=1e-4
    )


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
    j = OpenAIAtomJudge(
        transport=_mock(
            '```json\n{"verdict": "context", "label": "Sports talk", "reasoning": "fires on games"}\n```',
            seen=seen,
        )
    )
    res = j.judge(CARD, "toxicity")
    assert (res.verdict, res.label, res.reason) == ("CONTEXT", "sports talk", "fires on games")
    assert seen[0]["model"] == "tiny" and seen[1] == "Bearer k"
    res2 = OpenAIAtomJudge(transport=_mock("I think this is GENUINE.\nLabel: insults")).judge(
        CARD, "toxicity"
    )
    assert res2.verdict == "GENUINE" and res2.label == "insults"
    res3 = OpenAIAtomJudge(transport=_mock("no idea")).judge(CARD, "toxicity")
    assert res3.verdict == "NOISE"
    with pytest.raises(SafesteerError, match="HTTP 500"):
        OpenAIAtomJudge(transport=_mock("x", status=500)).judge(CARD, "toxicity")


def test_make_judge():
    assert isinstance(make_judge("none"), NoJudge) and NoJudge().judge(CARD, "x").verdict == "UNJUDGED"
    with pytest.raises(SafesteerError, match="unknown judge"):
        make_judge("gpt5")
