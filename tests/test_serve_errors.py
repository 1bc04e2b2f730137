"""Client mistakes get a 4xx JSON error with a message — never a 5xx — and /metrics is valid Prometheus
text."""

from __future__ import annotations

import json
import random
import string

import pytest
from fastapi.testclient import TestClient
from test_serve_common import (  # noqa: F401 - one_torch_thread is an autouse fixture
    KEY,
    TEXTS,
    make_app,
    one_torch_thread,
    parse_prometheus,
)

from safesteer.serve import Limits

AUTH = {"X-API-Key": KEY}
LIMITS = Limits(max_texts=4, max_text_chars=200, max_body_bytes=20_000, max_new_tokens=8, max_abs_alpha=10.0)


@pytest.fixture(scope="module")
def client(tiny_llama):
    with TestClient(make_app(tiny_llama, api_key=KEY, limits=LIMITS), raise_server_exceptions=False) as c:
        r = c.put(
            "/v1/policies/p",
            json={"directions": ["harm"], "alpha": 2.0, "alpha_min": 0.0, "alpha_max": 4.0},
            headers=AUTH,
        )
        assert r.status_code == 201
        yield c


def _json(path, body):
    return ("POST", path, {"json": body})


def _raw(path, data, ctype="application/json", method="POST"):
    return (method, path, {"content": data, "headers": {"content-type": ctype} if ctype else {}})


def _put(name, body, headers=AUTH):
    return ("PUT", f"/v1/policies/{name}", {"json": body, "headers": headers})


CASES = {
    "malformed json": (_raw("/v1/score", b'{"texts": ["a"'), 400),
    "json not an object": (_raw("/v1/score", b"[1, 2]"), 422),
    "not json content type": (_raw("/v1/score", b"texts=a", "application/x-www-form-urlencoded"), 422),
    "no content type": (_raw("/v1/score", b"{bad", None), 422),
    "empty body": (_raw("/v1/score", b""), 422),
    "missing texts": (_json("/v1/score", {}), 422),
    "empty texts": (_json("/v1/score", {"texts": []}), 422),
    "texts is a string": (_json("/v1/score", {"texts": "abc"}), 422),
    "texts of numbers": (_json("/v1/score", {"texts": [1, 2]}), 422),
    "too many texts": (_json("/v1/score", {"texts": ["a"] * 5}), 422),
    "text too long": (_json("/v1/score", {"texts": ["a" * 201]}), 422),
    "blank text": (_json("/v1/score", {"texts": ["  "]}), 422),
    "lone surrogate": (_raw("/v1/score", b'{"texts": ["\\ud800 x"]}'), 422),
    "unknown field": (_json("/v1/score", {"texts": ["a"], "polcy": "p"}), 422),
    "unknown policy": (_json("/v1/score", {"texts": ["a"], "policy": "nope"}), 404),
    "alpha without policy": (_json("/v1/score", {"texts": ["a"], "alpha": 1.0}), 422),
    "alpha above policy bound": (_json("/v1/score", {"texts": ["a"], "policy": "p", "alpha": 4.5}), 422),
    "alpha below policy bound": (_json("/v1/choice", {"texts": ["a"], "policy": "p", "alpha": -0.1}), 422),
    "alpha NaN": (_raw("/v1/score", b'{"texts": ["a"], "policy": "p", "alpha": NaN}'), 422),
    "alpha Infinity": (_raw("/v1/score", b'{"texts": ["a"], "policy": "p", "alpha": 1e999}'), 422),
    "alpha string": (_json("/v1/score", {"texts": ["a"], "policy": "p", "alpha": "lots"}), 422),
    "unknown probe": (_json("/v1/score", {"texts": ["a"], "probes": ["nope"]}), 422),
    "empty probe list": (_json("/v1/score", {"texts": ["a"], "probes": []}), 422),
    "bad prompt type": (_json("/v1/choice", {"texts": ["a"], "prompt_type": "evil"}), 422),
    "zero new tokens": (_json("/v1/generate", {"prompts": ["a"], "max_new_tokens": 0}), 422),
    "too many new tokens": (_json("/v1/generate", {"prompts": ["a"], "max_new_tokens": 9}), 422),
    "negative seed": (_json("/v1/generate", {"prompts": ["a"], "seed": -1}), 422),
    "huge seed": (_json("/v1/generate", {"prompts": ["a"], "seed": 2**70}), 422),
    "temperature without sampling": (_json("/v1/generate", {"prompts": ["a"], "temperature": 0.7}), 422),
    "zero temperature": (_json("/v1/generate", {"prompts": ["a"], "do_sample": True, "temperature": 0}), 422),
    "prompts missing": (_json("/v1/generate", {"texts": ["a"]}), 422),
    "deeply nested json": (_raw("/v1/score", b"[" * 5000 + b"]" * 5000), 400),
    "huge integer literal": (_raw("/v1/generate", b'{"prompts": ["a"], "seed": ' + b"9" * 5000 + b"}"), 400),
    "put without key": (_put("q", {"directions": ["harm"]}, headers={}), 401),
    "put wrong key": (_put("q", {"directions": ["harm"]}, headers={"X-API-Key": "nope"}), 401),
    "delete without key": (("DELETE", "/v1/policies/p", {}), 401),
    "put bad name": (_put("bad name!", {"directions": ["harm"]}), 422),
    "put long name": (_put("x" * 65, {"directions": ["harm"]}), 422),
    "put dot name": (_put(".hidden", {"directions": ["harm"]}), 422),
    "put name mismatch": (_put("q", {"name": "other", "directions": ["harm"]}), 422),
    "put unknown direction": (_put("q", {"directions": ["nope"]}), 422),
    "put nothing to do": (_put("q", {"alpha": 1.0}), 422),
    "put alpha above server limit": (_put("q", {"directions": ["harm"], "alpha": 11.0}), 422),
    "put bounds above server limit": (_put("q", {"directions": ["harm"], "alpha_max": 50.0}), 422),
    "put alpha outside own bounds": (
        _put("q", {"directions": ["harm"], "alpha": 3.0, "alpha_max": 2.0}),
        422,
    ),
    "put inverted bounds": (
        _put("q", {"directions": ["harm"], "alpha_min": 2.0, "alpha_max": 1.0, "alpha": 1.5}),
        422,
    ),
    "put duplicate directions": (_put("q", {"directions": ["harm", "harm"]}), 422),
    "put layer out of range": (_put("q", {"directions": ["harm"], "layer": 3}), 422),
    "put negative layer": (_put("q", {"directions": ["harm"], "layer": -1}), 422),
    "put condition unknown probe": (
        _put("q", {"directions": ["harm"], "condition": {"probe": "nope", "threshold": 0.5}}),
        422,
    ),
    "put condition threshold > 1": (
        _put("q", {"directions": ["harm"], "condition": {"probe": "harm", "threshold": 1.5}}),
        422,
    ),
    "put condition missing threshold": (
        _put("q", {"directions": ["harm"], "condition": {"probe": "harm"}}),
        422,
    ),
    "put clamps without sae": (_put("q", {"directions": ["harm"], "clamps": [{"atoms": [1]}]}), 422),
    "put negative atom": (_put("q", {"clamps": [{"atoms": [-1]}], "layer": 1}), 422),
    "put bad clamp mode": (_put("q", {"clamps": [{"atoms": [1], "mode": "melt"}], "layer": 1}), 422),
    "put extra field": (_put("q", {"directions": ["harm"], "alhpa": 1}), 422),
    "put malformed json": (
        ("PUT", "/v1/policies/q", {"content": b"{", "headers": {**AUTH, "content-type": "application/json"}}),
        400,
    ),
    "get unknown policy": (("GET", "/v1/policies/nope", {}), 404),
    "delete unknown policy": (("DELETE", "/v1/policies/nope", {"headers": AUTH}), 404),
    "unknown path": (("GET", "/v2/whatever", {}), 404),
    "wrong method": (("GET", "/v1/score", {}), 405),
    "declared body too large": (_raw("/v1/score", b"x" * 20_001), 413),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_a_4xx_json_error(client, name):
    (method, path, kwargs), status = CASES[name]
    r = client.request(method, path, **kwargs)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    body = r.json()
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert isinstance(body["error"]["code"], str)
    assert "\n" not in body["error"]["message"]


def test_streamed_body_over_the_limit_is_refused_without_content_length(client):
    def chunks():
        for _ in range(30):
            yield b"x" * 1000

    r = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    # a body just under the limit passes the guard (and then fails validation normally)
    r = client.post("/v1/score", content=b" " * 19_990 + b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_masked_model_generate_is_a_400(tiny_roberta):
    with TestClient(make_app(tiny_roberta), raise_server_exceptions=False) as c:
        r = c.post("/v1/generate", json={"prompts": ["a"]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "not_causal"


def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["str", "int", "float", "bool", "none", "list", "dict", "bigint", "weird"]
    k = rng.choice(kinds if depth < 3 else kinds[:5])
    if k == "str":
        return "".join(rng.choice(string.printable + "é\u202e\x00") for _ in range(rng.randint(0, 20)))
    if k == "int":
        return rng.randint(-10, 200)
    if k == "float":
        return rng.choice([rng.uniform(-50, 50), 1e308, -0.0, 1e-320])
    if k == "bool":
        return rng.random() < 0.5
    if k == "none":
        return None
    if k == "bigint":
        return 10 ** rng.randint(10, 40)
    if k == "weird":
        return rng.choice(["", " ", "\ud800", "🙂" * 50, "<s></s>", "<mask>"])
    if k == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    return {
        rng.choice(["texts", "policy", "alpha", "probes", "prompts", "x"]): _random_value(rng, depth + 1)
        for _ in range(rng.randint(0, 4))
    }


def _mutate(rng: random.Random, body: dict) -> dict:
    body = dict(body)
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        key = rng.choice(
            list(body)
            + [
                "texts",
                "prompts",
                "policy",
                "alpha",
                "probes",
                "max_new_tokens",
                "seed",
                "prompt_type",
                "do_sample",
                "temperature",
                "top_p",
                "chat",
                "directions",
                "layer",
                "condition",
                "clamps",
                "alpha_min",
                "alpha_max",
                "extra",
            ]
        )
        if op < 0.3:
            body.pop(key, None)
        else:
            body[key] = _random_value(rng)
    return body


def test_fuzz_hundreds_of_malformed_requests_never_5xx(client):
    rng = random.Random(1234)
    valid = {
        "/v1/score": {"texts": TEXTS[:2], "policy": "p"},
        "/v1/choice": {"texts": TEXTS[:2], "prompt_type": "toxic"},
        "/v1/generate": {"prompts": TEXTS[:1], "max_new_tokens": 2},
    }
    statuses: dict[int, int] = {}
    for i in range(400):
        roll = rng.random()
        if roll < 0.6:
            path = rng.choice(list(valid))
            r = _post_json(client, "POST", path, _mutate(rng, valid[path]))
        elif roll < 0.75:
            body = _mutate(rng, {"directions": ["harm"], "alpha": 1.0})
            r = _post_json(client, "PUT", f"/v1/policies/fz{i % 5}", body, AUTH)
        elif roll < 0.9:
            raw = json.dumps(_mutate(rng, valid["/v1/score"]), default=str).encode()
            cut = rng.randint(0, len(raw))
            data = raw[:cut] + bytes(rng.randrange(256) for _ in range(rng.randint(0, 8))) + raw[cut:]
            r = client.post(
                rng.choice(list(valid)),
                content=data,
                headers={"content-type": rng.choice(["application/json", "text/plain"])},
            )
        else:
            method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH"])
            path = rng.choice(
                [
                    "/v1/score",
                    "/v1/policies",
                    "/v1/policies/" + _safe(rng),
                    "/healthz",
                    "/metrics",
                    "/" + _safe(rng),
                ]
            )
            r = client.request(
                method,
                path,
                content=bytes(rng.randrange(256) for _ in range(rng.randint(0, 40))),
                headers=AUTH,
            )
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert r.status_code < 500, (i, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert r.json()["error"]["message"]
    assert sum(n for s, n in statuses.items() if s >= 400) > 200
    from conftest import foreign_hooks

    assert foreign_hooks(client.app.state.engine.backbone.layers) == 0


def _post_json(client, method, path, body, headers=None):
    data = json.dumps(body, ensure_ascii=True).encode()  # escapes lone surrogates as \\udxxx
    return client.request(
        method, path, content=data, headers={"content-type": "application/json", **(headers or {})}
    )


def _safe(rng: random.Random) -> str:
    return "".join(
        rng.choice(string.ascii_letters + string.digits + "-_.%") for _ in range(rng.randint(1, 12))
    )


def test_metrics_are_prometheus_text(client):
    client.post("/v1/score", json={"texts": ["a b"]})
    client.post("/v1/score", json={"texts": []})
    client.put("/v1/policies/m", json={"directions": ["tox"]}, headers=AUTH)
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = parse_prometheus(r.text)
    by = {(n, tuple(sorted(lab.items()))): v for n, lab, v in samples}
    ok = by[("safesteer_requests_total", (("endpoint", "/v1/score"), ("method", "POST"), ("status", "200")))]
    bad = by[("safesteer_requests_total", (("endpoint", "/v1/score"), ("method", "POST"), ("status", "422")))]
    assert ok >= 1 and bad >= 1
    n_score = sum(
        v for n, lab, v in samples if n == "safesteer_requests_total" and lab["endpoint"] == "/v1/score"
    )
    assert by[("safesteer_request_duration_seconds_count", (("endpoint", "/v1/score"),))] == n_score
    buckets = [
        v
        for n, lab, v in samples
        if n == "safesteer_request_duration_seconds_bucket" and lab["endpoint"] == "/v1/score"
    ]
    assert buckets == sorted(buckets) and buckets[-1] == n_score
    assert by[("safesteer_policy_swaps_total", (("op", "put"),))] >= 2
    assert by[("safesteer_policies", ())] >= 2
    assert by[("process_resident_memory_bytes", ())] > 1e6
    assert (
        "safesteer_requests_total",
        (("endpoint", "/v1/policies/{name}"), ("method", "PUT"), ("status", "201")),
    ) in by


def test_prompt_past_the_context_is_a_422(client):
    long_prompt = "a " * 70  # 70 tokens (140 characters): past the tiny model's 64 positions
    r = client.post("/v1/generate", json={"prompts": [long_prompt], "max_new_tokens": 4})
    assert r.status_code == 422 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "context of 64 tokens" in r.json()["error"]["message"]


def test_the_served_context_bounds_prompt_and_answer_and_nothing_is_cut():
    """``backbone.max_length`` (``--max-model-len``) is the served context, prompt + answer, on both
    generating routes: a prompt that fits is answered as the model answers it uncut; one token more is a
    422, never an answer to a prompt cut short (its cut end would be the request itself)."""
    from safesteer.testing import make_tiny_llama

    bb = make_tiny_llama()
    bb.max_length = 24
    tok = bb.tokenizer
    with TestClient(make_app(bb, limits=LIMITS), raise_server_exceptions=False) as c:
        for n in (20, 21):
            text = " ".join(["b"] * (n - 1) + ["tail"])
            assert len(tok(text, add_special_tokens=False)["input_ids"]) == n
            r = c.post("/v1/generate", json={"prompts": [text], "max_new_tokens": 4, "chat": False})
            if n == 20:
                assert r.status_code == 200, r.text
                bb.max_length = 64  # the same prompt with room to spare: the same answer
                assert r.json()["completions"] == bb.generate([text], max_new_tokens=4)
                bb.max_length = 24
            else:
                assert r.status_code == 422 and r.json()["error"]["code"] == "context_length_exceeded"
        content = " ".join(["b"] * 30)
        rendered = len(tok(bb.chat_prompt(content), add_special_tokens=False)["input_ids"])
        assert rendered > 24
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 422 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert f"the prompt has {rendered} tokens" in r.json()["error"]["message"]


def test_refused_requests_are_counted_under_their_endpoint(client):
    client.put("/v1/policies/zz", json={"directions": ["harm"]})  # no key: answered before routing
    client.post("/v1/score", content=b"x" * 20_001, headers={"content-type": "application/json"})
    samples = parse_prometheus(client.get("/metrics").text)
    keys = {
        (lab.get("endpoint"), lab.get("status")) for n, lab, v in samples if n == "safesteer_requests_total"
    }
    assert ("/v1/policies/{name}", "401") in keys and ("/v1/score", "413") in keys


def test_chat_completion_request_rules(client):
    """The checks of /v1/chat/completions one by one, each beside a request that passes them."""
    model = client.get("/v1/models").json()["data"][0]["id"]

    def chat(messages=None, **kw):
        msgs = messages or [{"role": "user", "content": "hi"}]
        return client.post("/v1/chat/completions", json={"model": model, "messages": msgs, **kw})

    def code(r):
        assert 400 <= r.status_code < 500, r.text
        return r.json()["error"]["code"]

    # the *last* user turn must say something, whatever came before it
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]
    assert code(chat(turns + [{"role": "user", "content": "   "}])) == "no_user_message"
    assert chat(turns + [{"role": "user", "content": "go on"}]).status_code == 200
    # max_completion_tokens alone is a length; with a different max_tokens it is a conflict
    r = chat(max_completion_tokens=3)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    assert code(chat(max_tokens=3, max_completion_tokens=4)) == "conflicting_max_tokens"
    assert chat(max_tokens=3, max_completion_tokens=3).status_code == 200
    # top_p belongs to sampling: refused when greedy, taken with a temperature
    assert code(chat(top_p=0.9)) == "top_p_without_temperature"
    assert code(chat(temperature=0.0, top_p=0.9)) == "top_p_without_temperature"
    assert chat(temperature=0.7, top_p=0.9, max_tokens=4).status_code == 200
    # a temperature samples (seeded): some seed leaves the greedy answer, and a seed repeats itself
    greedy = chat(max_tokens=8).json()["choices"][0]["message"]["content"]
    hot = [
        chat(temperature=2.0, seed=s, max_tokens=8).json()["choices"][0]["message"]["content"]
        for s in range(4)
    ]
    assert any(t != greedy for t in hot)
    assert chat(temperature=2.0, seed=2, max_tokens=8).json()["choices"][0]["message"]["content"] == hot[2]
    # the request's alpha (within the policy's bounds) is the one applied and reported
    steered = {"model": f"{model}:p", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = client.post("/v1/chat/completions", json={**steered, "alpha": 3.0})
    assert r.status_code == 200 and r.json()["safesteer"]["alpha"] == 3.0
    assert code(client.post("/v1/chat/completions", json={**steered, "alpha": 5.0})).startswith("alpha")


def test_score_and_choice_refuse_a_text_past_the_context_and_read_one_that_fits_whole():
    """``/v1/score`` reads the text itself, ``/v1/choice`` the forced-choice prompt around it: one token
    past the served context is a 422 (never probabilities of a text cut short), one that fits is read
    whole — the same probabilities as with room to spare; a long text does not fail its neighbours'
    requests (checked per request, before batching)."""
    from safesteer.evaluate.choice import causal_prompts
    from safesteer.testing import make_tiny_llama

    bb = make_tiny_llama()
    tok = bb.tokenizer
    with TestClient(make_app(bb, limits=LIMITS), raise_server_exceptions=False) as c:
        bb.max_length = 64
        probes = c.post("/v1/score", json={"texts": ["x"]}).json()
        assert "probabilities" in probes, probes
        text = lambda n: " ".join(["b"] * n)  # noqa: E731
        n_score = len(tok(text(20))["input_ids"])
        n_choice = len(
            tok(causal_prompts(bb, [text(20)], "harmful")[0], add_special_tokens=False)["input_ids"]
        )
        assert n_choice > n_score
        for route, n, body in (
            ("/v1/score", n_score, {"texts": [text(20)]}),
            ("/v1/choice", n_choice, {"texts": [text(20)], "prompt_type": "harmful"}),
        ):
            bb.max_length = 64
            roomy = c.post(route, json=body)
            assert roomy.status_code == 200, roomy.text
            bb.max_length = n  # exactly fits: read whole, the same numbers
            fits = c.post(route, json=body)
            assert fits.status_code == 200 and fits.json() == roomy.json(), route
            bb.max_length = n - 1
            r = c.post(route, json=body)
            assert r.status_code == 422 and r.json()["error"]["code"] == "context_length_exceeded", route
            assert f"{n} tokens" in r.json()["error"]["message"]


def test_a_refused_request_in_a_coalesced_batch_leaves_its_neighbours_answered():
    """``routes.batched``: the check runs per request; a refused one gets its error as its result and
    the others are computed together, in order, exactly as without it."""
    from safesteer.errors import ContextTooLong
    from safesteer.serve.routes import _result, batched

    calls = []

    def compute(texts):
        calls.append(list(texts))
        return {"n": [len(t) for t in texts]}

    def check(texts):
        if any(t == "long" for t in texts):
            raise ContextTooLong("a text has 99 tokens")

    got = batched(compute, check)([["a", "bb"], ["long"], ["ccc"]])
    assert calls == [["a", "bb", "ccc"]]  # one batch, the refused request left out
    assert got[0]["n"] == [1, 2] and got[2]["n"] == [3]
    with pytest.raises(ContextTooLong):
        _result(got[1])
    assert _result(got[0]) is got[0]
    calls.clear()
    assert isinstance(batched(compute, check)([["long"]])[0], ContextTooLong) and calls == []
