"""The OpenAI-compatible endpoints, driven by the official ``openai`` client against a live uvicorn server on
loopback (random free port, shut down at the end of the module): plain and streaming chat completions,
the policy by model name or extra body field, a policy swap between requests, conditional steering."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import test_serve_common as common
from test_serve_common import make_app, make_directions, steer_vec

from safesteer.serve import PolicyStore
from safesteer.serve.openai_api import ChatMessage, render_messages
from safesteer.serve.policies import Policy

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

MESSAGES = [
    {"role": "system", "content": "you are kind"},
    {"role": "user", "content": "how do i build a bomb"},
]


class LiveServer(common.LiveServer):
    """The shared live server with an OpenAI client on it."""

    def __init__(self, app):
        super().__init__(app)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)


def _policies():
    return [
        Policy(name="away", directions=["harm"], alpha=6.0),
        Policy(name="never", directions=["harm"], alpha=6.0, condition={"probe": "harm", "threshold": 1.0}),
    ]


@pytest.fixture(scope="module")
def live(tiny_llama):
    srv = LiveServer(make_app(tiny_llama, policy_store=PolicyStore(policies=_policies())))
    yield srv
    srv.stop()


def direct(bb, lock, messages, n, layer=None, vec=None, alpha=0.0):
    """What the endpoint should answer: greedy generation on the chat rendering, steered with the policy
    rule."""
    rendered = render_messages(bb.tokenizer, [ChatMessage(**m) for m in messages])
    with lock:
        if vec is None:
            return bb.generate([rendered], max_new_tokens=n)[0]
        with bb.steer(layer, vec, alpha=alpha):
            return bb.generate([rendered], max_new_tokens=n)[0]


def test_models_lists_the_model_and_each_policy(live):
    ids = [m.id for m in live.client.models.list().data]
    assert ids == ["tiny-llama", "tiny-llama:away", "tiny-llama:never"]
    assert live.client.models.retrieve("tiny-llama:away").id == "tiny-llama:away"
    with pytest.raises(openai.NotFoundError):
        live.client.models.retrieve("tiny-llama:nope")


def test_chat_completion_plain_steered_and_swapped(live, tiny_llama):
    lock = live.app.state.engine.lock
    ds = make_directions(tiny_llama.d_model)
    base = live.client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=6)
    assert base.object == "chat.completion" and base.choices[0].message.role == "assistant"
    assert base.choices[0].message.content == direct(tiny_llama, lock, MESSAGES, 6)
    assert base.safesteer == {
        "policy": None,
        "policy_version": None,
        "alpha": None,
        "steered": False,
        "condition_probability": None,
    }
    assert (
        base.usage.completion_tokens <= 6
        and base.usage.total_tokens == base.usage.prompt_tokens + base.usage.completion_tokens
    )
    assert base.choices[0].finish_reason in ("stop", "length")

    steered = live.client.chat.completions.create(model="tiny-llama:away", messages=MESSAGES, max_tokens=6)
    want = direct(tiny_llama, lock, MESSAGES, 6, 1, steer_vec(ds, ["harm"]), 6.0)
    assert steered.choices[0].message.content == want != base.choices[0].message.content
    assert (
        steered.safesteer["policy"] == "away"
        and steered.safesteer["steered"] is True
        and steered.safesteer["alpha"] == 6.0
    )
    v1 = steered.safesteer["policy_version"]
    # the same policy named in the extra body field; a different alpha within bounds
    extra = live.client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=6, extra_body={"policy": "away", "alpha": -6.0}
    )
    assert extra.choices[0].message.content == direct(
        tiny_llama, lock, MESSAGES, 6, 1, steer_vec(ds, ["harm"]), -6.0
    )

    # swap the policy (new direction) between requests: the next request sees the new version only
    r = httpx.put(f"{live.url}/v1/policies/away", json={"directions": ["tox"], "alpha": 6.0}, timeout=30)
    assert r.status_code == 200
    swapped = live.client.chat.completions.create(model="tiny-llama:away", messages=MESSAGES, max_tokens=6)
    assert swapped.safesteer["policy_version"] > v1
    assert swapped.choices[0].message.content == direct(
        tiny_llama, lock, MESSAGES, 6, 1, steer_vec(ds, ["tox"]), 6.0
    )
    httpx.put(f"{live.url}/v1/policies/away", json={"directions": ["harm"], "alpha": 6.0}, timeout=30)


def test_streaming_equals_the_plain_answer_and_reports_the_policy(live, tiny_llama):
    plain = live.client.chat.completions.create(model="tiny-llama:away", messages=MESSAGES, max_tokens=8)
    chunks = list(
        live.client.chat.completions.create(
            model="tiny-llama:away", messages=MESSAGES, max_tokens=8, stream=True
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks) and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content and len(chunks) >= 3
    assert [c.choices[0].finish_reason for c in chunks][-1] == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].safesteer["steered"] is True and chunks[-1].safesteer["policy"] == "away"
    # sampling with a seed is reproducible, streamed or not
    a = live.client.chat.completions.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=7
    )
    b = "".join(
        c.choices[0].delta.content or ""
        for c in live.client.chat.completions.create(
            model="tiny-llama", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=7, stream=True
        )
    )
    assert a.choices[0].message.content == b


def test_conditional_policy_reports_not_steered(live, tiny_llama):
    lock = live.app.state.engine.lock
    r = live.client.chat.completions.create(model="tiny-llama:never", messages=MESSAGES, max_tokens=6)
    assert r.safesteer["steered"] is False and 0.0 <= r.safesteer["condition_probability"] <= 1.0
    assert r.choices[0].message.content == direct(tiny_llama, lock, MESSAGES, 6)


def test_client_mistakes_are_openai_errors(live):
    c = live.client
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        c.chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError, match="unknown policy"):
        c.chat.completions.create(model="tiny-llama:nope", messages=MESSAGES)
    with pytest.raises(openai.UnprocessableEntityError, match="conflicting|names policy"):
        c.chat.completions.create(model="tiny-llama:away", messages=MESSAGES, extra_body={"policy": "never"})
    with pytest.raises(openai.UnprocessableEntityError, match="exceeds the limit"):
        c.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=10_000)
    with pytest.raises(openai.UnprocessableEntityError, match="alpha"):
        c.chat.completions.create(model="tiny-llama", messages=MESSAGES, extra_body={"alpha": 1.0})
    with pytest.raises(openai.UnprocessableEntityError):
        c.chat.completions.create(model="tiny-llama", messages=MESSAGES, n=2)
    with pytest.raises(openai.UnprocessableEntityError, match="user message"):
        c.chat.completions.create(model="tiny-llama", messages=[{"role": "system", "content": "hi"}])


@pytest.mark.integration
def test_smollm2_chat_through_the_openai_client(smollm2):
    rng = np.random.default_rng(0)
    from safesteer.steering import Direction, DirectionSet

    ds = DirectionSet([Direction("harm", rng.normal(size=smollm2.d_model), "custom", 15)])
    app = make_app(
        smollm2,
        directions=ds,
        probes={},
        policy_store=PolicyStore(policies=[Policy(name="recommended", directions=["harm"], alpha=40.0)]),
    )
    srv = LiveServer(app)
    try:
        msgs = [{"role": "user", "content": "How do I make a cake?"}]
        plain = srv.client.chat.completions.create(model="smollm2-135m", messages=msgs, max_tokens=8)
        steered = srv.client.chat.completions.create(
            model="smollm2-135m:recommended", messages=msgs, max_tokens=8
        )
        lock = app.state.engine.lock
        assert plain.choices[0].message.content == direct(smollm2, lock, msgs, 8)
        assert steered.choices[0].message.content == direct(
            smollm2, lock, msgs, 8, 15, ds["harm"].steer_vector, 40.0
        )
        assert (
            steered.choices[0].message.content != plain.choices[0].message.content
            and steered.safesteer["steered"]
        )
    finally:
        srv.stop()
