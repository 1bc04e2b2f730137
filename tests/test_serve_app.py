"""Endpoints of the steering service on tiny random models: results equal direct computations."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ReluSAE
from fastapi.testclient import TestClient
from test_serve_common import (  # noqa: F401 - one_torch_thread is an autouse fixture
    KEY,
    TEXTS,
    direct_scores,
    make_app,
    make_directions,
    make_probes,
    one_torch_thread,
    steer_vec,
)

from safesteer.evaluate.choice import forced_choice
from safesteer.serve import Limits, PolicyStore
from safesteer.steering import ClampEdit, Intervention

AUTH = {"X-API-Key": KEY}


@pytest.fixture()
def client(tiny_llama):
    with TestClient(make_app(tiny_llama, api_key=KEY)) as c:
        yield c


def put(c, name, body, headers=AUTH):
    r = c.put(f"/v1/policies/{name}", json=body, headers=headers)
    assert r.status_code in (200, 201), r.text
    return r.json()


def test_healthz_and_openapi(client, tiny_llama):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["kind"] == "causal" and h["n_layers"] == tiny_llama.n_layers
    assert h["probes"] == {"harm": 2, "tox": 1, "early": 0} and set(h["directions"]) == {
        "harm",
        "tox",
        "deep",
    }
    assert h["auth"] is True and h["limits"]["max_texts"] == 32
    spec = client.get("/openapi.json").json()
    for path in (
        "/v1/score",
        "/v1/generate",
        "/v1/choice",
        "/v1/policies",
        "/v1/policies/{name}",
        "/healthz",
        "/metrics",
    ):
        assert path in spec["paths"], path
    assert set(spec["paths"]["/v1/policies/{name}"]) == {"get", "put", "delete"}
    assert "ScoreRequest" in spec["components"]["schemas"] and "PolicyBody" in spec["components"]["schemas"]


def test_score_unsteered_and_steered_equal_direct_computation(client, tiny_llama):
    probes, ds = make_probes(), make_directions()
    r = client.post("/v1/score", json={"texts": TEXTS})
    assert r.status_code == 200
    out = r.json()
    assert out["policy"] is None and out["policy_version"] is None and out["steered"] == [False] * len(TEXTS)
    for name, pr in probes.items():
        assert out["probabilities"][name] == direct_scores(tiny_llama, TEXTS, pr, pr.meta["layer"]).tolist()

    rec = put(client, "away", {"directions": ["harm"], "alpha": 4.0, "alpha_min": 0.0, "alpha_max": 8.0})
    assert rec["version"] >= 1 and rec["policy"]["alpha"] == 4.0
    out = client.post(
        "/v1/score", json={"texts": TEXTS, "policy": "away", "probes": ["harm", "early"]}
    ).json()
    assert set(out["probabilities"]) == {"harm", "early"}
    assert (
        out["policy"] == "away"
        and out["policy_version"] == rec["version"]
        and out["alpha"] == 4.0
        and all(out["steered"])
    )
    v = steer_vec(ds, ["harm"])
    pr = probes["harm"]
    want = direct_scores(tiny_llama, TEXTS, pr, 2, layer=1, vec=v, alpha=4.0)
    assert out["probabilities"]["harm"] == want.tolist()
    assert not np.allclose(want, direct_scores(tiny_llama, TEXTS, pr, 2))  # steering does change the read-out
    # a probe below the steering layer reads the unsteered stream
    assert out["probabilities"]["early"] == direct_scores(tiny_llama, TEXTS, probes["early"], 0).tolist()
    # per-request alpha inside the policy's bounds
    out = client.post("/v1/score", json={"texts": TEXTS[:2], "policy": "away", "alpha": 1.5}).json()
    assert out["alpha"] == 1.5
    assert (
        out["probabilities"]["harm"]
        == direct_scores(tiny_llama, TEXTS[:2], pr, 2, layer=1, vec=v, alpha=1.5).tolist()
    )


def test_multi_direction_policy_uses_normalised_sum(client, tiny_llama):
    ds, pr = make_directions(), make_probes()["harm"]
    put(client, "both", {"directions": ["harm", "tox"], "alpha": 3.0})
    out = client.post("/v1/score", json={"texts": TEXTS, "policy": "both", "probes": ["harm"]}).json()
    want = direct_scores(tiny_llama, TEXTS, pr, 2, layer=1, vec=steer_vec(ds, ["harm", "tox"]), alpha=3.0)
    assert out["probabilities"]["harm"] == want.tolist()
    # an explicit layer overrides the directions' layer
    put(client, "deep0", {"directions": ["deep"], "layer": 0, "alpha": 2.0})
    out = client.post("/v1/score", json={"texts": TEXTS, "policy": "deep0", "probes": ["harm"]}).json()
    want = direct_scores(tiny_llama, TEXTS, pr, 2, layer=0, vec=steer_vec(ds, ["deep"]), alpha=2.0)
    assert out["probabilities"]["harm"] == want.tolist()


def test_choice_equals_forced_choice(client, tiny_llama):
    ds = make_directions()
    base = client.post("/v1/choice", json={"texts": TEXTS, "prompt_type": "toxic"}).json()
    assert base["p_yes"] == forced_choice(tiny_llama, TEXTS, "toxic").tolist()
    assert np.allclose(np.add(base["p_yes"], base["p_no"]), 1.0)
    put(client, "p", {"directions": ["tox"], "alpha": 5.0})
    out = client.post("/v1/choice", json={"texts": TEXTS, "prompt_type": "toxic", "policy": "p"}).json()
    iv = Intervention("tox", 1, steer_vec(ds, ["tox"]), 5.0)
    p_yes, mass = forced_choice(tiny_llama, TEXTS, "toxic", iv, return_mass=True)
    assert out["p_yes"] == p_yes.tolist() and out["answer_mass"] == mass.tolist()
    assert out["p_yes"] != base["p_yes"]


def test_generate_greedy_and_sampled(client, tiny_llama):
    ds = make_directions()
    prompts = TEXTS[:3]
    base = client.post("/v1/generate", json={"prompts": prompts, "max_new_tokens": 6}).json()
    assert base["completions"] == tiny_llama.generate(
        [tiny_llama.chat_prompt(p) for p in prompts], max_new_tokens=6
    )
    put(client, "g", {"directions": ["harm"], "alpha": 30.0})
    out = client.post("/v1/generate", json={"prompts": prompts, "max_new_tokens": 6, "policy": "g"}).json()
    with tiny_llama.steer(1, steer_vec(ds, ["harm"]), alpha=30.0):
        want = tiny_llama.generate(prompts, max_new_tokens=6)
    assert out["completions"] == want and out["completions"] != base["completions"]
    body = {
        "prompts": prompts,
        "max_new_tokens": 6,
        "do_sample": True,
        "seed": 7,
        "temperature": 1.5,
        "policy": "g",
    }
    a, b = client.post("/v1/generate", json=body).json(), client.post("/v1/generate", json=body).json()
    assert a["completions"] == b["completions"]
    raw = client.post(
        "/v1/generate", json={"prompts": ["the man"], "max_new_tokens": 3, "chat": False}
    ).json()
    assert raw["completions"] == tiny_llama.generate(["the man"], max_new_tokens=3)


def test_policy_crud_and_auth(client):
    body = {"directions": ["harm"], "alpha": 1.0}
    assert client.put("/v1/policies/a", json=body).status_code == 401
    assert client.put("/v1/policies/a", json=body, headers={"X-API-Key": "wrong"}).status_code == 401
    r = client.put("/v1/policies/a", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 201 and r.json()["name"] == "a"
    r2 = client.put("/v1/policies/a", json={**body, "alpha": 2.0}, headers=AUTH)
    assert r2.status_code == 200 and r2.json()["version"] > r.json()["version"]
    assert client.get("/v1/policies/a").json()["policy"]["alpha"] == 2.0
    listing = client.get("/v1/policies").json()
    assert [p["name"] for p in listing["policies"]] == ["a"] and listing["version"] == r2.json()["version"]
    assert client.delete("/v1/policies/a").status_code == 401
    d = client.delete("/v1/policies/a", headers=AUTH)
    assert d.status_code == 200 and d.json()["deleted"] == "a"
    assert client.get("/v1/policies/a").status_code == 404
    assert client.delete("/v1/policies/a", headers=AUTH).status_code == 404
    r = client.post("/v1/score", json={"texts": ["x"], "policy": "a"})
    assert r.status_code == 404 and "unknown policy" in r.json()["error"]["message"]


def test_no_api_key_means_open_writes(tiny_llama):
    with TestClient(make_app(tiny_llama)) as c:
        assert c.put("/v1/policies/x", json={"directions": ["harm"]}).status_code == 201


def test_policies_persist_in_folder(tiny_llama, tmp_path):
    with TestClient(make_app(tiny_llama, policy_store=PolicyStore(tmp_path), api_key=KEY)) as c:
        v = put(c, "keep", {"directions": ["tox"], "alpha": 2.5, "description": "kept"})["version"]
        put(c, "gone", {"directions": ["tox"]})
        c.delete("/v1/policies/gone", headers=AUTH)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
    saved = json.loads((tmp_path / "keep.json").read_text())
    assert saved["version"] == v and saved["policy"]["alpha"] == 2.5
    with TestClient(make_app(tiny_llama, policy_store=PolicyStore(tmp_path))) as c:
        got = c.get("/v1/policies/keep").json()
        assert got["version"] == v and got["policy"]["description"] == "kept"
        assert c.post("/v1/score", json={"texts": ["a"], "policy": "keep"}).json()["policy_version"] == v
        # new versions continue after the loaded ones
        assert put(c, "next", {"directions": ["tox"]})["version"] > v


def test_clamp_policy(tiny_llama):
    sae = ReluSAE(d_sae=48)
    pr = make_probes()["harm"]
    with TestClient(make_app(tiny_llama, sae=sae, sae_layer=1)) as c:
        r = c.put(
            "/v1/policies/clamp", json={"clamps": [{"atoms": [1, 2, 3, 5], "lam": 0.5, "mode": "scale"}]}
        )
        assert r.status_code == 201, r.text
        out = c.post("/v1/score", json={"texts": TEXTS, "policy": "clamp", "probes": ["harm"]}).json()
        with tiny_llama.steer(1, edit=ClampEdit(sae, [1, 2, 3, 5], lam=0.5, mode="scale")):
            H = tiny_llama.pooled(TEXTS, [2], batch_size=len(TEXTS))[2]
        assert out["probabilities"]["harm"] == pr.predict_proba(H).tolist()
        assert c.put("/v1/policies/c2", json={"clamps": [{"atoms": [48]}]}).status_code == 422  # out of range
        assert (
            c.put("/v1/policies/c3", json={"clamps": [{"atoms": [1]}], "layer": 2}).status_code == 422
        )  # wrong layer
    with TestClient(make_app(tiny_llama)) as c:
        r = c.put("/v1/policies/clamp", json={"clamps": [{"atoms": [1]}], "layer": 1})
        assert r.status_code == 422 and "--sae" in r.json()["error"]["message"]


def test_masked_model_scores_and_chooses_but_does_not_generate(tiny_roberta):
    with TestClient(make_app(tiny_roberta)) as c:
        put(c, "m", {"directions": ["harm"], "alpha": 2.0}, headers={})
        assert c.post("/v1/score", json={"texts": TEXTS, "policy": "m"}).status_code == 200
        r = c.post("/v1/choice", json={"texts": TEXTS, "policy": "m"})
        assert r.status_code == 200 and len(r.json()["p_yes"]) == len(TEXTS)
        r = c.post("/v1/generate", json={"prompts": ["hi"]})
        assert r.status_code == 400 and "causal" in r.json()["error"]["message"]


def test_server_without_probes_or_directions(tiny_llama):
    with TestClient(make_app(tiny_llama, probes=None, directions=None)) as c:
        r = c.post("/v1/score", json={"texts": ["a"]})
        assert r.status_code == 400 and "--probes" in r.json()["error"]["message"]
        r = c.put("/v1/policies/p", json={"directions": ["harm"]})
        assert r.status_code == 422 and "--directions" in r.json()["error"]["message"]
        assert c.post("/v1/choice", json={"texts": ["a"]}).status_code == 200


def test_limits_are_applied(tiny_llama):
    lim = Limits(max_texts=2, max_text_chars=10, max_new_tokens=4, max_abs_alpha=5.0)
    with TestClient(make_app(tiny_llama, limits=lim)) as c:
        assert c.post("/v1/score", json={"texts": ["a", "b", "c"]}).status_code == 422
        assert c.post("/v1/score", json={"texts": ["a" * 11]}).status_code == 422
        assert c.post("/v1/generate", json={"prompts": ["a"], "max_new_tokens": 5}).status_code == 422
        assert c.put("/v1/policies/big", json={"directions": ["harm"], "alpha": 6.0}).status_code == 422
        assert c.put("/v1/policies/ok", json={"directions": ["harm"], "alpha": 5.0}).status_code == 201
        r = c.post("/v1/score", json={"texts": ["a"], "policy": "ok", "alpha": -5.5})
        assert r.status_code == 422 and "out of bounds" in r.json()["error"]["message"]


def test_storage_failure_is_a_500_and_leaves_the_old_policy(tiny_llama, tmp_path, monkeypatch):
    import safesteer.serve.policies as pol
    from safesteer.errors import SafesteerError

    app = make_app(tiny_llama, policy_store=PolicyStore(tmp_path))
    with TestClient(app, raise_server_exceptions=False) as c:
        put(c, "a", {"directions": ["harm"], "alpha": 1.0}, headers={})

        def full_disk(*a, **k):
            raise SafesteerError("cannot write a.json: No space left on device")

        monkeypatch.setattr(pol, "write_json", full_disk)
        r = c.put("/v1/policies/a", json={"directions": ["harm"], "alpha": 2.0})
        assert r.status_code == 500 and r.json()["error"]["code"] == "storage_error"
        assert c.get("/v1/policies/a").json()["policy"]["alpha"] == 1.0
    # the same app can be served again after a shutdown
    with TestClient(app) as c:
        assert c.post("/v1/score", json={"texts": ["a"], "policy": "a"}).status_code == 200


class _NaNProbe:
    d = 32
    meta = {"layer": 1}

    def predict_proba(self, H):
        return np.full(len(H), np.nan)


def test_non_finite_numbers_become_null(tiny_llama):
    with TestClient(make_app(tiny_llama, probes={"nan": _NaNProbe()})) as c:
        r = c.post("/v1/score", json={"texts": ["a", "b"]})
        assert r.status_code == 200 and r.json()["probabilities"]["nan"] == [None, None]
